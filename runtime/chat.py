"""Chat: the GGUF's chat template rendered with jinja2 as transformers renders it, a session that keeps the
conversation (and reuses its KV cache between turns), and a line-oriented REPL."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Callable, TextIO

from llmq.errors import LlmqError

from .generate import ContextFull, Engine, TextStream, generate
from .sampling import Sampler

# Used when the GGUF has no tokenizer.chat_template (llama.cpp falls back to chatml as well).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise_exception(message):
    raise LlmqError(f"chat template error: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile(template: str):
    """The jinja2 environment transformers uses for chat templates (sandboxed, trim_blocks, lstrip_blocks,
    loop controls, tojson, raise_exception, strftime_now)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise LlmqError(f"the chat template does not compile: {e}") from e


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "", **extra) -> str:
    import jinja2

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token, **extra)
    except jinja2.TemplateError as e:
        raise LlmqError(f"chat template error: {e}") from e


def token_text(tokenizer, token_id) -> str:
    """The text of a (special) token, for the template's bos_token / eos_token."""
    if token_id is None or token_id < 0:
        return ""
    piece = tokenizer.token_to_piece(token_id)
    return piece.decode("utf-8", "replace") if isinstance(piece, bytes) else str(piece)


class ChatSession:
    """The conversation so far; `send(text)` returns the stream of the assistant's answer and records the answer
    in the conversation once the stream is exhausted."""

    def __init__(self, engine: Engine, sampler: Sampler | None = None, *, system: str | None = None,
                 max_tokens: int = -1):
        self.engine, self.sampler, self.system, self.max_tokens = engine, sampler or Sampler(), system, max_tokens
        tok = engine.tokenizer
        self.template = getattr(tok, "chat_template", None) or CHATML_TEMPLATE
        self.bos_token, self.eos_token = token_text(tok, tok.bos_id), token_text(tok, tok.eos_id)
        _compile(self.template)  # fail at start, not at the first message
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.engine.reset()

    def render(self) -> str:
        return render_chat(self.template, self.messages, add_generation_prompt=True, bos_token=self.bos_token,
                           eos_token=self.eos_token)

    def send(self, text: str):
        self.messages.append({"role": "user", "content": text})
        # The template writes bos_token itself, as with transformers' apply_chat_template.
        ids = self.engine.tokenizer.encode(self.render(), add_special=False, parse_special=True)
        stream = generate(self.engine, ids, self.sampler, max_tokens=self.max_tokens)
        return self._record(stream)

    def _record(self, stream: TextStream):
        pieces = []
        try:
            for piece in stream:
                pieces.append(piece)
                yield piece
        except ContextFull:
            self.messages.pop()  # the question did not fit: forget it
            raise
        finally:  # also when the caller stops early (Ctrl-C): keep what was said
            if self.messages and self.messages[-1]["role"] == "user":
                self.messages.append({"role": "assistant", "content": "".join(pieces)})
            self.last_finish_reason = stream.finish_reason


HELP = "commands: /reset (forget the conversation), /exit (quit)"


def run_repl(session: ChatSession, *, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """Read a line, stream the answer, repeat, until /exit or end of input."""
    out.write(f"chat with {session.engine.name} engine, n_ctx {session.engine.n_ctx}; {HELP}\n")
    out.flush()
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            session.reset()
            out.write("[conversation reset]\n")
            out.flush()
            continue
        if text.startswith("/") and " " not in text:
            out.write(f"unknown command {text}; {HELP}\n")
            continue
        try:
            for piece in session.send(text):
                out.write(piece)
                out.flush()
        except ContextFull:
            out.write(f"\n[context is full ({session.engine.n_ctx} tokens): /reset to start a new conversation, "
                      f"or restart with a larger --ctx]\n")
            out.flush()
            continue
        except KeyboardInterrupt:
            out.write("\n[interrupted]\n")
            continue
        if session.last_finish_reason == "context":
            out.write(f"\n[context is full ({session.engine.n_ctx} tokens): the answer was cut; /reset to start "
                      f"a new conversation, or restart with a larger --ctx]")
        out.write("\n")
        out.flush()

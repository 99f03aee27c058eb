"""Tokenizer, chat template and streaming detokenizer; needs only `tokenizers` and jinja2."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from edgert.artifact.manifest import TokenizerSpec
from edgert.errors import ArtifactError, GenerationError

Messages = list[dict[str, str]]


def _raise_exception(message: str):
    raise GenerationError(f"the chat template refused the messages: {message}")


class ChatTemplate:
    """Renders a Jinja chat template the way transformers' ``apply_chat_template`` does."""

    def __init__(self, source: str, bos_token: str | None, eos_token: str | None) -> None:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ArtifactError(f"the artifact's chat template does not parse "
                                f"({_one_line(exc)}); re-export with a valid template") from None
        self._specials = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    def render(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         **self._specials)
        except GenerationError:  # the template's own raise_exception
            raise
        except Exception as exc:  # jinja2's UndefinedError, a TypeError, ...
            raise GenerationError(
                f"the artifact's chat template failed on these messages "
                f"({type(exc).__name__}: {_one_line(exc)}); check the messages' roles and "
                "contents, or fix tokenizer.chat_template (re-export)") from None


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (jinja2's syntax errors quote the source line)."""
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


def validate_messages(messages: Messages) -> None:
    if not messages:
        raise GenerationError("the prompt has no messages; pass a non-empty string or a list "
                              "of {'role', 'content'} dicts")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not {"role", "content"} <= set(msg):
            raise GenerationError(f"message {i} must be a dict with 'role' and 'content' keys, "
                                  f"got {msg!r}")


class Tokenizer:
    """Encode prompts (raw or through the chat template) and decode ids."""

    def __init__(self, directory: Path, spec: TokenizerSpec) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(directory / spec.file))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a bare Exception on bad JSON; on a well-formed but
            # inconsistent file (a BPE merge of unknown tokens), a Rust panic: pyo3's
            # PanicException, a BaseException
            raise ArtifactError(f"cannot load {directory / spec.file} ({_one_line(exc)}); "
                                "re-export the model") from None
        self.spec = spec
        self.template = (ChatTemplate(spec.chat_template, spec.bos_token, spec.eos_token)
                         if spec.chat_template else None)
        self.bos_id = self._tok.token_to_id(spec.bos_token) if spec.bos_token else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode_raw(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=True).ids
        if self.spec.add_bos_token and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def encode_chat(self, messages: Messages) -> list[int]:
        validate_messages(messages)
        if self.template is None:
            raise GenerationError("this artifact has no chat template; pass chat=False "
                                  "(CLI: --raw) to send the prompt as plain text")
        text = self.template.render(messages, add_generation_prompt=True)
        # transformers tokenizes the rendered template without adding special tokens again
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_piece(self, text: str) -> list[int]:
        """``text`` alone, without special tokens or BOS (a piece inside a reply)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_texts(self) -> list[str]:
        """Every token's own text, by id (a partial UTF-8 character decodes to U+FFFD)."""
        return [self._tok.decode([i], skip_special_tokens=False)
                for i in range(self.vocab_size)]

    def special_ids(self) -> set[int]:
        return {i for i, token in self._tok.get_added_tokens_decoder().items() if token.special}


class StreamDecoder:
    """Turns a growing list of ids into text pieces without splitting multi-byte characters.

    Decodes a short window (from ``prefix`` to the end) and emits what extends the text already
    emitted, holding back while the tail is an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids up to here are already emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._tokenizer.decode(self._ids[self._prefix:self._read])
        new_text = self._tokenizer.decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text):]
            self._prefix = self._read
            self._read = len(self._ids)
            return piece
        return ""

    def flush(self) -> str:
        prefix_text = self._tokenizer.decode(self._ids[self._prefix:self._read])
        new_text = self._tokenizer.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):]

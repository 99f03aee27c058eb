"""JSON-schema structured output: the reply is JSON that validates against the schema.

The structure is forced, the model fills the values. Keys, punctuation, ``null`` and the
rest of a chosen literal are appended as tokens without a choice; where the schema leaves a
choice the model makes it, its logits masked to the tokens that keep the text valid:

- string: tokens that may stand inside a JSON string (no quote, backslash or control
  character) and fit ``maxLength`` characters, or the closing quote (at most
  ``MAX_STRING_TOKENS`` tokens);
- integer / number: digit tokens (no leading zero), then more digits, a fraction token
  (``.5``) for numbers, or a stop (the model preferring ``,`` ``}`` ``]`` or a newline);
- boolean, enum: the first tokens of the literals (the rest forced);
- array: after ``[`` or an item, close (``]``) or go on (an item's first token, or ``,``),
  between ``minItems`` and ``maxItems`` (default 8) items;
- object: every declared property, in the schema's order.

Supported keywords: type (one, or a list with null), properties, required,
additionalProperties, items, enum, const, minItems, maxItems, maxLength, and the
annotations title, description, default, examples, $schema. Anything else is refused up front
(:class:`SchemaError`, naming the keyword), rather than producing JSON that might not
validate. Like OpenAI's, a reply cut by ``max_tokens`` (finish reason "length") is
incomplete JSON.

:class:`JsonPolicy` drives the decode loop: ``step(logits)`` returns the tokens to append
(the choice, then what is forced up to the next choice), which the next forward reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from edgert.errors import GenerationError
from edgert.runtime.sampling import SamplingParams, select_token

MAX_STRING_TOKENS = 48
MAX_ITEMS = 8
MAX_DIGIT_TOKENS = 4
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$comment"}
KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "enum",
            "const", "minItems", "maxItems", "maxLength"} | ANNOTATIONS
TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")


class SchemaError(GenerationError):
    """A schema this decoder cannot guarantee (an unsupported keyword or form)."""


@dataclass(frozen=True)
class Force:
    text: str


@dataclass(frozen=True)
class ForceIds:
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Choose:
    mask: np.ndarray  # bool [V]: the tokens allowed here


Program = Generator[Any, int, None]


class VocabMasks:
    """Per-tokenizer token classes, computed once (vectorized masks over the vocabulary)."""

    def __init__(self, tokenizer, size: int) -> None:
        """``size``: the model's vocabulary (its logits' length; ids past the tokenizer's
        are never allowed)."""
        self.tokenizer = tokenizer
        texts = tokenizer.token_texts()[:size]
        self.texts = texts + [""] * (size - len(texts))
        self.special = np.zeros(size, dtype=bool)
        self.special[[i for i in tokenizer.special_ids() if i < size]] = True
        # characters of each token's text (a partial UTF-8 character counts one: decoding
        # several together never gives more characters than decoding them one by one)
        self.lengths = np.array([len(t) for t in self.texts], dtype=np.int64)

    def _matching(self, pattern: str) -> np.ndarray:
        rx = re.compile(pattern)
        mask = np.array([bool(t) and bool(rx.fullmatch(t)) for t in self.texts], dtype=bool)
        return mask & ~self.special

    @cached_property
    def string_body(self) -> np.ndarray:
        return self._matching(r'[^"\\\x00-\x1f]+')

    @cached_property
    def int_start(self) -> np.ndarray:
        return self._matching(r"-?(0|[1-9][0-9]*)")

    @cached_property
    def digits(self) -> np.ndarray:
        return self._matching(r"[0-9]+")

    @cached_property
    def fraction(self) -> np.ndarray:
        return self._matching(r"\.[0-9]+")

    @cached_property
    def stops(self) -> np.ndarray:
        return self._matching(r"\s*[,}\]\n]\s*")

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode_piece(text)

    def only(self, *ids: int) -> np.ndarray:
        mask = np.zeros(len(self.texts), dtype=bool)
        mask[list(ids)] = True
        return mask


def check_schema(schema: Any, where: str = "schema") -> None:
    """Refuse what the decoder cannot guarantee; ``where`` names the place in errors."""
    if not isinstance(schema, dict):
        raise SchemaError(f"{where} must be a JSON object, got {type(schema).__name__}")
    unknown = sorted(set(schema) - KEYWORDS)
    if unknown:
        raise SchemaError(f"{where}: unsupported keyword(s) {unknown}; supported: "
                          f"{sorted(KEYWORDS - ANNOTATIONS)}")
    if "enum" in schema or "const" in schema:
        options = schema.get("enum", [schema.get("const")])
        if not isinstance(options, list) or not options:
            raise SchemaError(f"{where}: enum must be a non-empty list")
        return
    kind = value_type(schema, where)
    if kind == "object":
        for key, sub in (schema.get("properties") or {}).items():
            check_schema(sub, f"{where}.properties.{key}")
        missing = set(schema.get("required", [])) - set(schema.get("properties") or {})
        if missing:
            raise SchemaError(f"{where}: required {sorted(missing)} not in properties")
    elif kind == "array":
        check_schema(schema.get("items", {"type": "string"}), f"{where}.items")
        low, high = schema.get("minItems", 0), schema.get("maxItems", MAX_ITEMS)
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high):
            raise SchemaError(f"{where}: minItems/maxItems must be integers, "
                              f"0 <= minItems <= maxItems")


def value_type(schema: dict, where: str = "schema") -> str:
    """The one type a (sub)schema generates: a list with "null" generates the other."""
    kind = schema.get("type")
    if isinstance(kind, list):
        others = [k for k in kind if k != "null"]
        kind = others[0] if len(others) == 1 else ("null" if not others else None)
    if kind not in TYPES:
        raise SchemaError(f"{where}: type must be one of {list(TYPES)} (or one of them with "
                          f"null), got {schema.get('type')!r}")
    return kind


class JsonPolicy:
    """The structured-output decode policy of one request."""

    def __init__(self, schema: dict, masks: VocabMasks) -> None:
        check_schema(schema)
        self.masks = masks
        self.done = False
        self._program = self._value(schema)
        self._action = next(self._program)

    def step(self, logits: np.ndarray, params: SamplingParams,
             rng: np.random.Generator) -> list[int]:
        """The tokens to append after a forward whose last logits are ``logits``."""
        out: list[int] = []
        while not self.done:
            action = self._action
            if isinstance(action, Choose):
                if out:  # the forced tokens go first: the choice needs their logits
                    return out
                masked = np.where(action.mask, logits, -np.inf).astype(np.float32)
                self._advance(select_token(masked, params, rng))
            elif isinstance(action, Force):
                out += self.masks.ids(action.text)
                self._advance(None)
            else:
                out += list(action.ids)
                self._advance(None)
        return out

    def _advance(self, value) -> None:
        try:
            self._action = self._program.send(value)
        except StopIteration:
            self.done = True

    # -- the JSON program: yields actions, receives the chosen token of each Choose --------
    def _value(self, schema: dict) -> Program:
        if "enum" in schema or "const" in schema:
            yield from self._literal(schema.get("enum", [schema.get("const")]))
            return
        kind = value_type(schema)
        yield from getattr(self, f"_{kind}")(schema)

    def _literal(self, options: list) -> Program:
        texts = [json.dumps(option) for option in options]
        encoded = [self.masks.ids(text) for text in texts]
        token = yield Choose(self.masks.only(*{ids[0] for ids in encoded}))
        chosen = next(i for i, ids in enumerate(encoded) if ids[0] == token)
        yield ForceIds(tuple(encoded[chosen]))

    def _null(self, schema: dict) -> Program:
        yield Force("null")

    def _boolean(self, schema: dict) -> Program:
        yield from self._literal([True, False])

    def _string(self, schema: dict) -> Program:
        m = self.masks
        quote = m.ids('"')
        yield Force('"')
        room = schema.get("maxLength")  # characters; None: any number
        for _ in range(MAX_STRING_TOKENS):
            allowed = m.string_body if room is None else m.string_body & (m.lengths <= room)
            if not allowed.any():
                break
            token = yield Choose(allowed | m.only(quote[0]))
            if token == quote[0]:
                yield ForceIds(tuple(quote))
                return
            yield ForceIds((token,))
            if room is not None:
                room -= int(m.lengths[token])
        yield Force('"')

    def _integer(self, schema: dict, fraction: bool = False) -> Program:
        m = self.masks
        token = yield Choose(m.int_start)
        yield ForceIds((token,))
        if m.texts[token].lstrip("-") != "0":  # no digits after a leading zero
            for _ in range(MAX_DIGIT_TOKENS - 1):
                token = yield Choose(m.digits | m.stops | (m.fraction if fraction else False))
                if not m.digits[token]:
                    break
                yield ForceIds((token,))
        else:
            token = yield Choose(m.stops | (m.fraction if fraction else False))
        if fraction and m.fraction[token]:
            yield ForceIds((token,))

    def _number(self, schema: dict) -> Program:
        yield from self._integer(schema, fraction=True)

    def _object(self, schema: dict) -> Program:
        properties = schema.get("properties") or {}
        yield Force("{")
        for i, (key, sub) in enumerate(properties.items()):
            yield Force((", " if i else "") + json.dumps(key) + ": ")
            yield from self._value(sub)
        yield Force("}")

    def _array(self, schema: dict) -> Program:
        items = schema.get("items", {"type": "string"})
        low, high = schema.get("minItems", 0), min(schema.get("maxItems", MAX_ITEMS), MAX_ITEMS)
        high = max(high, low)
        close = self.masks.ids("]")[0]
        comma = self.masks.ids(",")[0]
        yield Force("[")
        for n in range(high):
            if n >= low:
                go_on = self._first_tokens(items) if n == 0 else self.masks.only(comma)
                token = yield Choose(go_on | self.masks.only(close))
                if token == close:
                    break
            yield from self._value_after(items, n)
        yield Force("]")

    def _value_after(self, items: dict, n: int) -> Program:
        if n:
            yield Force(", ")
        yield from self._value(items)

    def _first_tokens(self, schema: dict) -> np.ndarray:
        """Tokens a value of ``schema`` can start with (for the model's go-on choice)."""
        m = self.masks
        if "enum" in schema or "const" in schema:
            options = schema.get("enum", [schema.get("const")])
            return m.only(*{m.ids(json.dumps(o))[0] for o in options})
        kind = value_type(schema)
        starts = {"object": "{", "array": "[", "string": '"', "null": "null"}
        if kind in starts:
            return m.only(m.ids(starts[kind])[0])
        if kind == "boolean":
            return m.only(m.ids("true")[0], m.ids("false")[0])
        return m.int_start


def parse_response_format(response_format: dict | None) -> dict | None:
    """The JSON schema of an OpenAI ``response_format`` (None for plain text)."""
    if response_format is None or response_format.get("type", "text") == "text":
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema")
        check_schema(schema, "response_format.json_schema.schema")
        return schema
    raise SchemaError(f"response_format type {kind!r} is not supported; use 'text' or "
                      "'json_schema' with a schema")

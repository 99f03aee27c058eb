"""JSON-schema structured output: every reply parses and validates (jsonschema, the reference
validator), greedy and sampled, alone and in parallel slots; unsupported schemas are refused
by keyword."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgert.runtime.batch import BatchDecoder, BatchSequence
from edgert.runtime.sampling import SamplingParams
from edgert.runtime.structured import SchemaError, check_schema, parse_response_format

jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "level": {"enum": ["low", "high", 3, None]},
        "note": {"type": ["string", "null"], "maxLength": 6},
        "nothing": {"type": "null"},
        "origin": {"type": "object", "properties": {"x": {"type": "integer"},
                                                    "y": {"type": "number"}},
                   "required": ["x", "y"], "additionalProperties": False},
    },
    "required": ["name", "age", "origin"],
    "additionalProperties": False,
}
LIST = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 5}
SCHEMAS = [PERSON, LIST, {"type": "string", "maxLength": 5}, {"const": "fixed"},
           {"type": "object", "properties": {}}]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "list", "string", "const", "empty"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_replies_parse_and_validate(tiny_engine, schema, temperature):
    for seed in range(4 if temperature else 1):
        result = tiny_engine.generate("Describe someone", max_new_tokens=400, seed=seed,
                                      temperature=temperature, json_schema=schema)
        assert result.stats["finish_reason"] == "stop"
        jsonschema.validate(json.loads(result.text), schema)


def test_numbers_have_json_form(tiny_engine):
    """Integers without leading zeros; numbers possibly with a fraction: json.loads and the
    schema's types accept every sampled value."""
    schema = {"type": "array", "items": {"type": "number"}, "minItems": 8, "maxItems": 8}
    for seed in range(6):
        text = tiny_engine.generate("numbers", max_new_tokens=200, temperature=1.5, seed=seed,
                                    json_schema=schema).text
        values = json.loads(text)
        jsonschema.validate(values, schema)
        for piece in text.strip("[]").split(", "):
            digits = piece.lstrip("-").split(".")[0]
            assert digits == "0" or not digits.startswith("0"), text


def test_parallel_slots_structured_equals_alone(tiny_engine):
    decoder = BatchDecoder(tiny_engine, slots=3)
    seqs = []
    for i, schema in enumerate([PERSON, LIST, PERSON]):
        seqs.append(BatchSequence(tiny_engine.encode(f"Describe {i}"), 180,
                                  params=SamplingParams(temperature=0.7, seed=i),
                                  policy=tiny_engine.json_policy(schema)))
        decoder.admit(seqs[-1])
    while decoder.active:
        decoder.step()
    for i, (seq, schema) in enumerate(zip(seqs, [PERSON, LIST, PERSON])):
        assert seq.finish_reason == "stop"
        text = tiny_engine.tokenizer.decode(seq.output)
        jsonschema.validate(json.loads(text), schema)
        alone = tiny_engine.generate(f"Describe {i}", max_new_tokens=180, temperature=0.7,
                                     seed=i, json_schema=schema)
        assert seq.output == alone.output_ids


@pytest.mark.parametrize("schema, match", [
    ({"type": "string", "pattern": "a+"}, r"unsupported keyword\(s\) \['pattern'\]"),
    ({"anyOf": [{"type": "string"}]}, "anyOf"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"]},
     r"required \['b'\] not in properties"),
    ({"type": "date"}, "type must be one of"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems"),
    ({"enum": []}, "non-empty"),
    ([1], "must be a JSON object"),
])
def test_unsupported_schemas_refused_by_name(schema, match):
    with pytest.raises(SchemaError, match=match):
        check_schema(schema)


def test_response_format_forms():
    assert parse_response_format({"type": "text"}) is None
    schema = parse_response_format({"type": "json_schema",
                                    "json_schema": {"name": "x", "schema": LIST}})
    assert schema == LIST
    with pytest.raises(SchemaError, match="json_object"):
        parse_response_format({"type": "json_object"})


def test_masks_exclude_quotes_and_specials(tiny_engine):
    masks = tiny_engine.vocab_masks
    texts = masks.texts
    allowed = np.flatnonzero(masks.string_body)
    assert allowed.size > 100
    assert not any('"' in texts[i] or "\\" in texts[i] for i in allowed)
    assert not masks.string_body[list(tiny_engine.tokenizer.special_ids())].any()

"""Fuzzing the load path: damaged artifacts end in an EdgertError or a correct run.

Copies of the tiny artifacts (plain, with Medusa heads, with a DHSA graph) are damaged at
random, then loaded (``edgert.load``, with and without ``verify``: without it the damage
reaches the parsers, the manifest checks and ONNX Runtime) and run for 4 tokens:

* every file: random byte flips, zeroed ranges, truncation, appended bytes, deletion;
* ``edgert.json``, and ``tokenizer.json`` (loaded unverified): at random JSON paths, a value
  of another type, an out-of-range or huge number, a deleted key or list item, an unknown
  key, a duplicated item;
* the Medusa section: head counts, top-k, trees and head-graph shapes that do not fit the
  heads graph.

Each case must end in an ``EdgertError`` with a one-line message, or a run whose tokens are
in the vocabulary; any other exception, or a case running over ``HANG_SECONDS``, fails the
test with the smallest example hypothesis finds (a crash would end the run). ONNX Runtime's
session cache is off here (a damaged graph would otherwise be served from the copy optimized
from the intact one). A damaged graph that loads but fails while it runs (a Gather index out
of range, a negative TopK, heads returning fewer candidates than declared) is an
ArtifactError from the ort backend too.

CI runs a fixed set of examples (``derandomize``: the same ones every run, about 25 s for the
module). A longer search::

    EDGERT_FUZZ_EXAMPLES=3000 .venv/bin/python -m pytest -q tests/artifact/test_fuzz.py \
        --hypothesis-show-statistics

(``EDGERT_FUZZ_SEED=N`` as well: a random search from seed N instead of the fixed examples;
the statistics count each outcome.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, seed, settings
from hypothesis import strategies as st

import edgert
from edgert.artifact.manifest import MANIFEST_NAME
from edgert.errors import EdgertError

EXAMPLES = int(os.environ.get("EDGERT_FUZZ_EXAMPLES", "0"))
SEED = os.environ.get("EDGERT_FUZZ_SEED")
HANG_SECONDS = 60
PROMPT = "Tell me about the sky"
# longer than the tiny DHSA artifact's budget (64 tokens): dhsa=True prefills it sparsely
LONG_PROMPT = " ".join(f"word{i} and more" for i in range(40))


def fuzz(default_examples: int):
    """Hypothesis settings and seed for one fuzz test: ``default_examples`` fixed examples,
    or EDGERT_FUZZ_EXAMPLES (from EDGERT_FUZZ_SEED's random search when that is set)."""
    configured = settings(
        max_examples=EXAMPLES or default_examples, derandomize=SEED is None, deadline=None,
        database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture])

    def decorate(test):
        test = configured(test)
        return seed(int(SEED))(test) if SEED is not None else test

    return decorate


@pytest.fixture(scope="module", autouse=True)
def no_session_cache():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGERT_ORT_CACHE", "0")
        yield


@pytest.fixture(scope="module")
def sources(tiny_artifact, tiny_medusa_artifact, tiny_dhsa_artifact) -> dict[str, Path]:
    return {"plain": tiny_artifact, "medusa": tiny_medusa_artifact, "dhsa": tiny_dhsa_artifact}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "artifact"


def fresh_copy(source: Path, work: Path) -> Path:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work)
    return work


class Hang(Exception):
    """A load or run took longer than HANG_SECONDS (not an EdgertError: fails the test)."""


@contextmanager
def time_limit(seconds: int):
    def expired(signum, frame):
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_kind(kind: str) -> dict:
    """generate()'s arguments that reach each artifact's extra graph (the Medusa artifact's
    default drafters are medusa+lookup)."""
    if kind == "dhsa":
        return {"prompt": LONG_PROMPT, "chat": False, "dhsa": True}
    return {"prompt": PROMPT}


def note(what: str) -> None:
    """Count an outcome in hypothesis' statistics (--hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(what)


def _gist(message: str) -> str:
    """A message without its paths and numbers: the kind of failure (hypothesis statistics)."""
    return re.sub(r"\S*/\S*|\d+", "#", message)[:90]


def outcome(path: Path, verify: bool, kind: str, **options) -> Exception | None:
    """Load ``path`` and generate 4 tokens (``options``: more generate() arguments): None
    after a correct run, the EdgertError when one is raised. Any other exception propagates:
    the fuzzer reports it."""
    with time_limit(HANG_SECONDS):
        try:
            engine = edgert.load(path, verify=verify)
            result = engine.generate(max_new_tokens=4, **run_kind(kind), **options)
        except EdgertError as exc:
            message = str(exc)
            assert message.strip() and "\n" not in message, f"not one line: {message!r}"
            note(f"{type(exc).__name__}: {_gist(message)}")
            return exc
    note("ran")
    vocab = engine.manifest.config.vocab_size
    assert 1 <= len(result.output_ids) <= 4
    assert all(0 <= t < vocab for t in result.output_ids), result.output_ids
    return None


def test_the_intact_artifacts_run(sources, work):
    for kind, source in sources.items():
        for verify in (True, False):
            assert outcome(fresh_copy(source, work), verify, kind) is None


# -- damaged files ----------------------------------------------------------------------------

DAMAGES = ("flip", "zero", "truncate", "append", "delete")


def damage_file(file: Path, damage: str, data) -> None:
    size = file.stat().st_size
    if damage == "delete":
        file.unlink()
        return
    if damage == "truncate":
        with open(file, "r+b") as f:
            f.truncate(data.draw(st.integers(0, max(size - 1, 0)), label="new size"))
        return
    if damage == "append":
        with open(file, "ab") as f:
            f.write(data.draw(st.binary(min_size=1, max_size=64), label="appended"))
        return
    if size == 0:
        return
    blob = bytearray(file.read_bytes())
    if damage == "flip":
        flips = data.draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 255)),
                                   min_size=1, max_size=16), label="flips (offset, xor)")
        for offset, xor in flips:
            blob[offset] ^= xor
    else:  # zero a range
        start = data.draw(st.integers(0, size - 1), label="zeroed from")
        length = data.draw(st.integers(1, 4096), label="zeroed bytes")
        blob[start:start + length] = bytes(len(blob[start:start + length]))
    file.write_bytes(bytes(blob))


@fuzz(250)
@given(data=st.data())
def test_damaged_files_end_in_an_edgert_error_or_a_run(sources, work, data):
    kind = data.draw(st.sampled_from(["plain", "medusa", "dhsa"]), label="artifact")
    path = fresh_copy(sources[kind], work)
    name = data.draw(st.sampled_from(sorted(p.name for p in path.iterdir())), label="file")
    damage = data.draw(st.sampled_from(DAMAGES), label="damage")
    verify = data.draw(st.booleans(), label="verify")
    before = (path / name).read_bytes()
    damage_file(path / name, damage, data)
    changed = not (path / name).exists() or (path / name).read_bytes() != before
    error = outcome(path, verify, kind)
    if verify and changed and name != MANIFEST_NAME:  # the hashes cover every other file
        assert error is not None


# -- manifest edits ---------------------------------------------------------------------------

SCALARS = (st.none() | st.booleans()
           | st.sampled_from([0, 1, -1, 2, 3, 7, 2**31, 2**63, 10**30, -10**30])
           | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.sampled_from(["", "float16", "model.onnx", "n", "q"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


def json_paths(node, prefix=()) -> list[tuple]:
    """Every path into a JSON document (the root excluded), parents before children."""
    paths = []
    items = node.items() if isinstance(node, dict) else enumerate(node) \
        if isinstance(node, list) else ()
    for key, child in items:
        paths.append((*prefix, key))
        paths += json_paths(child, (*prefix, key))
    return paths


def nudged(value, data):
    """A value near ``value`` of the same type (the edits that keep a manifest plausible)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return data.draw(st.sampled_from([value + 1, value - 1, -value, value * 1000, 0,
                                          value + 10**12]), label="nudged int")
    if isinstance(value, float):
        return data.draw(st.sampled_from([-value, value * 1e6, 0.0, float("nan"),
                                          float("inf")]), label="nudged float")
    if isinstance(value, str):
        return data.draw(st.sampled_from([value + "x", value[:-1], value.upper(), ""]),
                         label="nudged string")
    if isinstance(value, list):
        return value[:-1] if value else [0]
    return {}


EDITS = ("replace", "nudge", "delete", "unknown key", "duplicate")


def edit_json(document: dict, data) -> None:
    path = data.draw(st.sampled_from(json_paths(document)), label="JSON path")
    edit = data.draw(st.sampled_from(EDITS), label="edit")
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    key, value = path[-1], parent[path[-1]]
    if edit == "replace":
        parent[key] = data.draw(VALUES, label="new value")
    elif edit == "nudge":
        parent[key] = nudged(value, data)
    elif edit == "delete":
        del parent[key]
    elif edit == "unknown key":
        target = value if isinstance(value, dict) else parent if isinstance(parent, dict) \
            else None
        if target is not None:
            target[data.draw(st.text(min_size=1, max_size=8), label="unknown key")] = 1
    elif isinstance(parent, list):  # duplicate
        parent.insert(key, value)


@fuzz(250)
@given(data=st.data())
def test_manifest_edits_end_in_an_edgert_error_or_a_run(sources, work, data):
    kind = data.draw(st.sampled_from(["plain", "medusa", "dhsa"]), label="artifact")
    path = fresh_copy(sources[kind], work)
    manifest = path / MANIFEST_NAME
    document = json.loads(manifest.read_text())
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        edit_json(document, data)
    manifest.write_text(json.dumps(document))
    outcome(path, data.draw(st.booleans(), label="verify"), kind)


@fuzz(100)
@given(data=st.data())
def test_tokenizer_json_edits_end_in_an_edgert_error_or_a_run(sources, work, data):
    """The same edits inside tokenizer.json, loaded without verification (its hash would
    catch them): what the `tokenizers` parser makes of a well-formed but wrong file."""
    path = fresh_copy(sources["plain"], work)
    tokenizer = path / "tokenizer.json"
    document = json.loads(tokenizer.read_text())
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        edit_json(document, data)
    tokenizer.write_text(json.dumps(document))
    outcome(path, False, "plain")


# -- Medusa heads configurations --------------------------------------------------------------

COUNTS = st.integers(-1, 9) | st.sampled_from([10**6, 2**63])
# trees that fit the tiny heads (3 heads, top-4) and trees that do not
def with_prefixes(paths: list[list[int]]) -> list[list[int]]:
    """The paths and every prefix of them, once each, shortest first (a valid tree)."""
    closed = {tuple(p[:i]) for p in paths for i in range(1, len(p) + 1)}
    return [list(p) for p in sorted(closed, key=lambda p: (len(p), p))]


TREES = (st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=4), max_size=12)
         .map(with_prefixes)
         | st.lists(st.lists(st.integers(-1, 6), max_size=5), max_size=12))
MEDUSA_EDITS = ("num_heads", "topk", "tree", "graph shapes", "token-conditioned")


@fuzz(100)
@given(data=st.data())
def test_medusa_configs_that_do_not_fit_the_graph(sources, work, data):
    path = fresh_copy(sources["medusa"], work)
    manifest = path / MANIFEST_NAME
    document = json.loads(manifest.read_text())
    medusa, graph = document["medusa"], document["graphs"]["medusa"]
    ids, logits = graph["outputs"]
    edits = data.draw(st.sets(st.sampled_from(MEDUSA_EDITS), min_size=1, max_size=2),
                      label="edits")
    if "num_heads" in edits:
        medusa["num_heads"] = data.draw(COUNTS, label="num_heads")
    if "topk" in edits:
        medusa["topk"] = data.draw(COUNTS, label="topk")
    if "tree" in edits:
        document["tree"]["choices"] = data.draw(TREES, label="tree")
    if "graph shapes" in edits:
        heads, topk = data.draw(COUNTS, label="graph heads"), data.draw(COUNTS, label="k")
        ids["shape"] = logits["shape"] = [heads, "n", topk]
    if "token-conditioned" in edits:  # the graph takes no root token
        medusa["condition"] = "token"
        graph["inputs"].append({"name": "root", "shape": ["n"], "dtype": "int64",
                                "meaning": "the root token"})
    manifest.write_text(json.dumps(document))
    speculative = data.draw(st.sampled_from([None, "medusa", "medusa+lookup"]),
                            label="drafters")
    outcome(path, False, "medusa", speculative=speculative)

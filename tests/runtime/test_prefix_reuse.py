"""Prefix reuse: a prompt that starts with cached tokens prefills only the rest, and decodes
what a fresh prefill decodes (greedy, fp32 tiny model), on one sequence and in parallel slots
(shared entries through joins, finishes and compactions)."""

from __future__ import annotations

import numpy as np
import pytest

import edgert
from edgert.runtime.batch import BatchDecoder, BatchSequence
from edgert.runtime.prefix import common_prefix, reusable_prefix

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one short line."}
QUESTIONS = ["What is a function?", "Explain loops in Python", "Why is the sky blue?",
             "Tell me about classes", "List three prime numbers", "How do I open a file?"]


def chat(question: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": question}]


# -- the pure part ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_common_prefix_against_a_loop(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3, size=rng.integers(0, 12)).tolist()
    b = a[:rng.integers(0, len(a) + 1)] + rng.integers(0, 3, size=rng.integers(0, 5)).tolist()
    expected = 0
    while expected < min(len(a), len(b)) and a[expected] == b[expected]:
        expected += 1
    assert common_prefix(a, b) == common_prefix(np.array(b), a) == expected
    assert reusable_prefix(a, b) == max(0, min(expected, len(b) - 1))


def test_the_last_prompt_token_is_never_reused():
    assert reusable_prefix([1, 2, 3], [1, 2, 3]) == 2
    assert reusable_prefix([1, 2, 3, 4], [1, 2]) == 1
    assert reusable_prefix([], [1, 2]) == 0
    assert reusable_prefix([1], [1]) == 0


# -- one sequence (Engine) --------------------------------------------------------------------
@pytest.fixture()
def reuse_engine(tiny_artifact):
    return edgert.load(tiny_artifact, prefix_reuse=True)


def fresh(engine, prompt, n: int = 16, **kwargs) -> list[int]:
    engine.reset()
    return engine.generate(prompt, max_new_tokens=n, **kwargs).output_ids


def test_next_chat_turn_reuses_the_previous_turn(reuse_engine, tiny_engine):
    first = reuse_engine.generate(chat(QUESTIONS[0]), max_new_tokens=12, speculative="off")
    assert first.stats["reused_tokens"] == 0
    turn = [*chat(QUESTIONS[0]), {"role": "assistant", "content": first.text},
            {"role": "user", "content": "And in one word?"}]
    second = reuse_engine.generate(turn, max_new_tokens=16, speculative="off")
    ids = reuse_engine.encode(turn)
    # the cache held the first prompt and every reply token but the last (never fed)
    cached = first.prompt_ids + first.output_ids[:-1]
    assert second.stats["reused_tokens"] == reusable_prefix(cached, ids)
    assert second.stats["reused_tokens"] >= len(first.prompt_ids)
    assert second.output_ids == fresh(tiny_engine, turn, speculative="off")


def test_same_prompt_again_prefills_one_token(reuse_engine, tiny_engine):
    prompt = chat(QUESTIONS[1])
    a = reuse_engine.generate(prompt, max_new_tokens=10, speculative="off")
    b = reuse_engine.generate(prompt, max_new_tokens=10, speculative="off")
    assert b.stats["reused_tokens"] == len(b.prompt_ids) - 1
    assert a.output_ids == b.output_ids == fresh(tiny_engine, prompt, 10, speculative="off")


def test_shared_system_prompt_only(reuse_engine, tiny_engine):
    reuse_engine.generate(chat(QUESTIONS[2]), max_new_tokens=8, speculative="off")
    out = reuse_engine.generate(chat(QUESTIONS[3]), max_new_tokens=16, speculative="off")
    ids = reuse_engine.encode(chat(QUESTIONS[3]))
    assert 0 < out.stats["reused_tokens"] == common_prefix(
        reuse_engine.encode(chat(QUESTIONS[2])), ids) < len(ids)
    assert out.output_ids == fresh(tiny_engine, chat(QUESTIONS[3]), speculative="off")


def test_off_by_default(tiny_engine):
    prompt = chat(QUESTIONS[0])
    tiny_engine.generate(prompt, max_new_tokens=4)
    assert tiny_engine.generate(prompt, max_new_tokens=4).stats["reused_tokens"] == 0


def test_direct_cache_use_forgets_the_prefix(reuse_engine):
    prompt = chat(QUESTIONS[0])
    reuse_engine.generate(prompt, max_new_tokens=4, speculative="off")
    reuse_engine.decode_token(7)  # a tool wrote the cache: its contents are unknown now
    assert reuse_engine.generate(prompt, max_new_tokens=4).stats["reused_tokens"] == 0
    reuse_engine.reset()
    assert reuse_engine.generate(prompt, max_new_tokens=4).stats["reused_tokens"] == 0


@pytest.mark.parametrize("mode", ["off", "lookup", "medusa", "medusa+lookup"])
def test_stream_closed_early_then_continued(tiny_medusa_artifact, mode):
    """A stream closed after a few pieces (a verification step may have committed tokens it
    never emitted): the next turn reuses only what was emitted, and decodes what a fresh
    engine decodes."""
    engine = edgert.load(tiny_medusa_artifact, prefix_reuse=True)
    reference = edgert.load(tiny_medusa_artifact)
    prompt = chat("Repeat: the cat sat on the mat, the cat sat on the mat, the cat")
    stream = engine.stream(prompt, max_new_tokens=40, speculative=mode)
    pieces = [next(stream) for _ in range(5)]
    stream.close()
    turn = [*prompt, {"role": "assistant", "content": "".join(pieces)},
            {"role": "user", "content": "Again"}]
    stats = {}
    text = "".join(engine.stream(turn, max_new_tokens=24, speculative=mode, stats=stats))
    assert stats["reused_tokens"] > len(engine.encode(prompt)) - 1
    assert text == reference.generate(turn, max_new_tokens=24, speculative=mode).text


def test_a_long_remainder_prefills_sparsely_from_scratch(tiny_dhsa_artifact):
    """DHSA prefill starts from an empty cache: a prompt whose new part is long enough for it
    reuses nothing; a short new part reuses the prefix and prefills densely."""
    engine = edgert.load(tiny_dhsa_artifact, prefix_reuse=True)
    short = "Tell me about the sea."
    engine.generate(short, max_new_tokens=4, speculative="off")
    long_prompt = [{"role": "user", "content": short + " " + "waves and tides " * 20}]
    out = engine.generate(long_prompt, max_new_tokens=4, speculative="off")
    assert out.stats["reused_tokens"] == 0 and out.stats["prefill"] == "dhsa"
    follow = [*long_prompt, {"role": "assistant", "content": out.text},
              {"role": "user", "content": "Shorter"}]
    again = engine.generate(follow, max_new_tokens=4, speculative="off")
    assert again.stats["reused_tokens"] > len(out.prompt_ids) - 1
    assert again.stats["prefill"] == "dense"


# -- parallel slots ---------------------------------------------------------------------------
def alone(engine, prompt, n: int) -> list[int]:
    return engine.generate(prompt, max_new_tokens=n, speculative="off").output_ids


def test_joining_sequence_shares_a_running_ones_prefix(tiny_engine):
    decoder = BatchDecoder(tiny_engine, slots=2, prefix_reuse=True)
    first = BatchSequence(tiny_engine.encode(chat(QUESTIONS[0])), 20)
    decoder.admit(first)
    for _ in range(3):
        decoder.step()
    second = BatchSequence(tiny_engine.encode(chat(QUESTIONS[1])), 16)
    decoder.admit(second)
    assert second.reused == common_prefix(first.prompt_ids, second.prompt_ids) > 0
    assert np.array_equal(second.entries, first.entries[:second.reused])
    while decoder.active:
        decoder.step()
    assert first.output == alone(tiny_engine, chat(QUESTIONS[0]), 20)
    assert second.output == alone(tiny_engine, chat(QUESTIONS[1]), 16)


def test_finished_sequence_prefix_serves_the_next_turn(tiny_engine):
    decoder = BatchDecoder(tiny_engine, slots=2, prefix_reuse=True)
    first = BatchSequence(tiny_engine.encode(chat(QUESTIONS[0])), 12)
    decoder.admit(first)
    while decoder.active:
        decoder.step()
    turn = [*chat(QUESTIONS[0]), {"role": "assistant",
                                  "content": tiny_engine.tokenizer.decode(first.output)},
            {"role": "user", "content": "Shorter"}]
    second = BatchSequence(tiny_engine.encode(turn), 16)
    decoder.admit(second)
    assert second.reused >= len(first.prompt_ids)
    while decoder.active:
        decoder.step()
    assert second.output == alone(tiny_engine, turn, 16)


def test_shared_entries_survive_compaction(tiny_dir, tmp_path):
    """A small cache: sequences sharing the system prompt join as others finish, one is
    cancelled, the timeline is compacted (shared entries move once); each output equals its
    solo run."""
    from edgert.export.exporter import ExportOptions, export_model

    art = export_model(str(tiny_dir), tmp_path / "small", ExportOptions(max_context=192),
                       log=lambda m: None)
    engine = edgert.load(art)
    decoder = BatchDecoder(engine, slots=3, prefill_budget=8, prefix_reuse=True)
    sequences = [BatchSequence(engine.encode(chat(q)), max_new_tokens=20) for q in QUESTIONS]
    queue, victim, steps = list(sequences), sequences[2], 0
    while queue or decoder.active:
        while queue and decoder.can_admit(queue[0]):
            decoder.admit(queue.pop(0))
        decoder.step()
        steps += 1
        if steps == 8:
            decoder.cancel(victim)
    assert decoder.compactions > 0
    assert sum(seq.reused > 0 for seq in sequences) >= 3
    for question, seq in zip(QUESTIONS, sequences):
        if seq is not victim:
            assert seq.output == alone(engine, chat(question), 20), question

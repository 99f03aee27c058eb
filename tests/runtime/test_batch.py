"""Parallel slots: sequences decoded together over the shared cache give what each gets alone
(greedy and seeded sampling), through joins, cancellations and compactions."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import edgert
from edgert.errors import CapacityError, GenerationError
from edgert.runtime.batch import BatchDecoder, BatchSequence, BatchWorker, supports_batching
from edgert.runtime.sampling import SamplingParams

PROMPTS = ["What is a function?", "Explain loops in Python", "Write a haiku about the sea",
           "Tell me about classes", "Why is the sky blue?", "List three prime numbers",
           "How do I open a file?", "What does return do?"]


def alone(engine, prompt: str, n: int, **sampling) -> list[int]:
    return engine.generate(prompt, max_new_tokens=n, speculative="off", **sampling).output_ids


def run_all(decoder: BatchDecoder) -> None:
    while decoder.active:
        decoder.step()


@pytest.fixture()
def engine(tiny_engine):
    return tiny_engine


def test_batched_greedy_equals_each_alone(engine):
    decoder = BatchDecoder(engine, slots=4)
    seqs = [BatchSequence(engine.encode(p), max_new_tokens=12 + 5 * i)
            for i, p in enumerate(PROMPTS[:4])]
    for seq in seqs:
        decoder.admit(seq)
    run_all(decoder)
    for prompt, seq in zip(PROMPTS, seqs):
        assert seq.output == alone(engine, prompt, seq.max_new_tokens), prompt
        assert seq.finish_reason in ("stop", "length")


def test_seeded_sampling_equals_each_alone(engine):
    decoder = BatchDecoder(engine, slots=3)
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=s) for s in (1, 2, 3)]
    seqs = [BatchSequence(engine.encode(p), 20, params=sp) for p, sp in zip(PROMPTS, params)]
    for seq in seqs:
        decoder.admit(seq)
    run_all(decoder)
    for prompt, seq, sp in zip(PROMPTS, seqs, params):
        assert seq.output == alone(engine, prompt, 20, temperature=0.9, top_p=0.9,
                                   seed=sp.seed), prompt


def test_joins_cancels_and_compaction(tiny_dir, tmp_path):
    """A small cache: sequences join as others finish, one is cancelled mid-way, and the
    timeline is compacted; every other sequence still equals its solo run."""
    from edgert.export.exporter import ExportOptions, export_model

    art = export_model(str(tiny_dir), tmp_path / "small", ExportOptions(max_context=160),
                       log=lambda m: None)
    engine = edgert.load(art)
    decoder = BatchDecoder(engine, slots=3, prefill_budget=8)
    sequences = [BatchSequence(engine.encode(p), max_new_tokens=24) for p in PROMPTS]
    ended = {}
    for seq in sequences:
        seq.on_end = lambda reason, seq=seq: ended.__setitem__(id(seq), reason)
    queue, victim, steps = list(sequences), sequences[1], 0
    while queue or decoder.active:
        while queue and decoder.can_admit(queue[0]):
            decoder.admit(queue.pop(0))
        decoder.step()
        steps += 1
        if steps == 6:
            decoder.cancel(victim)
    assert decoder.compactions > 0
    assert ended[id(victim)] == "cancelled"
    for prompt, seq in zip(PROMPTS, sequences):
        if seq is not victim:
            assert ended[id(seq)] in ("stop", "length")
            assert seq.output == alone(engine, prompt, 24), prompt


def test_refusals(engine):
    decoder = BatchDecoder(engine, slots=1)
    with pytest.raises(CapacityError, match="exceeds the KV capacity"):
        decoder.admit(BatchSequence(engine.encode(PROMPTS[0]), engine.capacity))
    with pytest.raises(GenerationError, match="positive integer"):
        BatchSequence([1, 2], 0)
    decoder.admit(BatchSequence(engine.encode(PROMPTS[0]), 4))
    with pytest.raises(GenerationError, match="no free slot"):
        decoder.admit(BatchSequence(engine.encode(PROMPTS[1]), 4))


def test_worker_serves_concurrent_submissions(engine):
    """8 sequences submitted from 8 threads to 4 slots: each gets its solo output."""
    worker = BatchWorker(engine, slots=4)
    results: dict[int, list[int]] = {}
    done = {i: threading.Event() for i in range(len(PROMPTS))}

    def submit(i: int) -> None:
        seq = BatchSequence(engine.encode(PROMPTS[i]), 16)
        seq.on_end = lambda reason: (results.__setitem__(i, seq.output), done[i].set())
        worker.submit(seq)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(PROMPTS))]
    try:
        for t in threads:
            t.start()
        for i in range(len(PROMPTS)):
            assert done[i].wait(60), f"sequence {i} never finished"
    finally:
        worker.close()
    for i, prompt in enumerate(PROMPTS):
        assert results[i] == alone(engine, prompt, 16), prompt


def test_unsupported_backend_named(engine, monkeypatch):
    monkeypatch.setattr(engine, "backend_name", "tvm")
    assert "ONNX Runtime backend" in supports_batching(engine)
    with pytest.raises(GenerationError, match="ONNX Runtime backend"):
        BatchDecoder(engine, slots=2)


def test_compact_keeps_the_chosen_entries(engine):
    cache = engine.cache
    cache.reset()
    buf = cache.buffers()[0]
    buf[0, :, :6] = np.arange(6, dtype=np.float32)[None, :, None]
    cache.advance(6)
    cache.compact(np.array([1, 3, 4]))
    assert cache.length == 3
    np.testing.assert_array_equal(buf[0, 0, :3, 0], [1, 3, 4])
    with pytest.raises(ValueError, match="ascending"):
        cache.compact(np.array([2, 1]))
    cache.reset()


def test_int8_artifact_batched_equals_alone(tiny_dir, tmp_path):
    """int8 activations (q4 weights): ONNX Runtime's multi-row attention differs from the
    one-row one, so a lone row's attention runs as two (the graph pads it, as in
    Engine.generate's plain steps): eight sequences
    together, and one alone in the batch, give each sequence's solo output."""
    from edgert.export.exporter import ExportOptions, export_model
    from edgert.export.quantize import WeightOptions

    art = export_model(str(tiny_dir), tmp_path / "q4",
                       ExportOptions(max_context=768, weights=WeightOptions(weights="q4")),
                       log=lambda m: None)
    engine = edgert.load(art)
    assert engine.row_exact
    decoder = BatchDecoder(engine, slots=8)
    seqs = [BatchSequence(engine.encode(p), 24) for p in PROMPTS]
    for seq in seqs:
        decoder.admit(seq)
    run_all(decoder)
    lone = BatchSequence(engine.encode(PROMPTS[0]), 24)
    decoder.admit(lone)
    run_all(decoder)
    for prompt, seq in zip(PROMPTS, seqs):
        assert seq.output == alone(engine, prompt, 24), prompt
    assert lone.output == seqs[0].output
    # alone, a sequence is verified in chains (prompt lookup): still its solo output
    copy = "Repeat: the cat sat on the mat, the cat sat on the mat, the cat sat on"
    chained = BatchSequence(engine.encode(copy), 40)
    decoder.admit(chained)
    run_all(decoder)
    assert chained.speculative_steps > 0
    assert chained.output == alone(engine, copy, 40)


def test_holes_are_compacted_before_the_cache_fills(engine):
    """Finished sequences' entries are compacted away once they outnumber the live ones (plus
    COMPACT_SLACK), long before the capacity: every row's attention reads the whole timeline,
    so holes would cost time on every step."""
    from edgert.runtime.batch import COMPACT_SLACK

    decoder = BatchDecoder(engine, slots=2)
    # staggered lengths: the slots never empty together (which would reset the timeline)
    queue = [BatchSequence(engine.encode(p), 16 + 7 * (i % 4), ignore_eos=True)
             for i, p in enumerate(PROMPTS * 3)]
    longest_timeline = 0
    while queue or decoder.active:
        while queue and decoder.can_admit(queue[0]):
            decoder.admit(queue.pop(0))
        decoder.step()
        live = sum(len(s.entries) for s in decoder.active)
        longest_timeline = max(longest_timeline, engine.cache.length - live)
    assert decoder.compactions >= 1
    assert longest_timeline <= max(2 * 90, COMPACT_SLACK) + 90  # holes stay bounded
    assert engine.cache.length < engine.capacity // 2


def test_a_greedy_sequence_alone_takes_speculative_steps(tiny_medusa_artifact):
    """Once the others finish, the remaining greedy sequence is verified speculatively
    (Medusa heads + prompt lookup): its text is still plain greedy's, and steps accept
    drafted tokens; sampled sequences stay plain."""
    engine = edgert.load(tiny_medusa_artifact)
    decoder = BatchDecoder(engine, slots=2)
    assert decoder.drafters == ("medusa", "lookup")
    copy = "Repeat: the cat sat on the mat, the cat sat on the mat, the cat sat on"
    long_one = BatchSequence(engine.encode(copy), 48)
    short_one = BatchSequence(engine.encode(PROMPTS[0]), 4)
    sampled = BatchSequence(engine.encode(PROMPTS[1]), 24,
                            params=SamplingParams(temperature=0.8, seed=5))
    for seq in (long_one, short_one):
        decoder.admit(seq)
    run_all(decoder)
    assert long_one.speculative_steps > 0 and short_one.speculative_steps == 0
    assert long_one.drafted_accepted > 0
    assert long_one.output == alone(engine, copy, 48)
    decoder.admit(sampled)
    run_all(decoder)
    assert sampled.speculative_steps == 0
    assert sampled.output == alone(engine, PROMPTS[1], 24, temperature=0.8, seed=5)


def test_speculation_off(engine):
    decoder = BatchDecoder(engine, slots=2, speculative="off")
    seq = BatchSequence(engine.encode(PROMPTS[2]), 16)
    decoder.admit(seq)
    run_all(decoder)
    assert seq.speculative_steps == 0 and seq.output == alone(engine, PROMPTS[2], 16)

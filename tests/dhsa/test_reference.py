"""The NumPy DHSA reference against dense attention and constructed cases."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgert.dhsa.params import DHSAParams
from edgert.dhsa.reference import (
    boundary_ratios,
    chunk_starts,
    dense_attention,
    dhsa_attention,
    prefill_calls,
    select_keys,
    token_scores,
)
from edgert.errors import ConfigError

SMALL = DHSAParams(block_size=16, budget=48, local=16, sink=4, dense_tail=8, probe_stride=8,
                   min_context=64, early_layers=0)


def random_qkv(seq_len, hq=4, hkv=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((hq, seq_len, d)).astype(np.float32),
            rng.standard_normal((hkv, seq_len, d)).astype(np.float32),
            rng.standard_normal((hkv, seq_len, d)).astype(np.float32))


def test_budget_covering_the_context_equals_dense():
    q, k, v = random_qkv(100)
    params = DHSAParams(block_size=16, budget=100, local=16, sink=4, dense_tail=8,
                        probe_stride=8, min_context=100)
    out, _, sel = dhsa_attention(q, k, v, params)
    np.testing.assert_allclose(out, dense_attention(q, k, v), rtol=1e-5, atol=1e-6)


PER_KV_HEAD = dataclasses.replace(SMALL, per_kv_head=1)


@pytest.mark.parametrize("params", [SMALL, PER_KV_HEAD], ids=["shared", "per_kv_head"])
def test_selection_is_causal(params):
    q, k, v = random_qkv(150)
    out, starts, sel = dhsa_attention(q, k, v, params)
    assert sel.index.shape[0] == (k.shape[0] if params.per_kv_head else 1)
    for h in range(sel.index.shape[0]):
        for b in range(sel.index.shape[1]):
            assert (sel.keys(b, h) < (b + 1) * params.block_size).all()
    # changing the future does not change the past: outputs before 80 are unaffected
    k2, v2 = k.copy(), v.copy()
    k2[:, 80:] += 3.0
    v2[:, 80:] -= 2.0
    out2, _, _ = dhsa_attention(q, k2, v2, params, starts=starts)
    np.testing.assert_allclose(out2[:, :80], out[:, :80], atol=1e-6)


@pytest.mark.parametrize("params", [SMALL, PER_KV_HEAD], ids=["shared", "per_kv_head"])
def test_local_sink_and_budget_are_respected(params):
    q, k, v = random_qkv(200)
    _, _, sel = dhsa_attention(q, k, v, params)
    for h in range(sel.index.shape[0]):
        for b in range(sel.index.shape[1]):
            chosen = set(sel.keys(b, h).tolist())
            end = min((b + 1) * params.block_size, 200)
            assert set(range(max(0, end - params.local), end)) <= chosen
            assert set(range(min(params.sink, end))) <= chosen
            assert len(chosen) <= params.budget


def test_relevant_keys_are_selected():
    """A 'needle' chunk whose keys align with the last block's queries is picked."""
    seq_len, d = 256, 16
    rng = np.random.default_rng(1)
    q = rng.standard_normal((4, seq_len, d)).astype(np.float32) * 0.1
    k = rng.standard_normal((2, seq_len, d)).astype(np.float32) * 0.1
    direction = np.zeros(d, np.float32)
    direction[3] = 1.0
    needle = np.arange(90, 102)
    k[:, needle] += 2.0 * direction
    q[:, 240:] += 2.0 * direction  # the last block asks for it
    starts = np.zeros(seq_len, bool)
    starts[::12] = True  # chunks aligned with the needle (90 = 7*12 + 6 -> split)
    starts[90] = starts[102] = True
    sel = select_keys(token_scores(q, k, starts, SMALL), seq_len, SMALL)
    assert set(needle.tolist()) <= set(sel.keys(-1).tolist())


def test_centred_keys_pick_the_relevant_chunk_over_a_long_one():
    """Keys sharing a common direction q also has (as in the later layers) make an uncentred
    chunk score grow with sqrt(len): a long chunk of plain keys then outranks a short chunk of
    relevant ones. Centred on the mean key (a shift that changes no attention weight), the
    relevant chunk wins."""
    seq_len, d = 256, 16
    rng = np.random.default_rng(3)
    q = rng.standard_normal((4, seq_len, d)).astype(np.float32) * 0.1
    k = rng.standard_normal((2, seq_len, d)).astype(np.float32) * 0.1
    common, topic = np.eye(d, dtype=np.float32)[0], np.eye(d, dtype=np.float32)[5]
    k += 1.0 * common  # every key
    q[:, 224:] += 1.0 * common + 1.0 * topic  # the last block's queries
    needle = np.arange(30, 36)
    k[:, needle] += 1.5 * topic
    starts = np.zeros(seq_len, bool)
    starts[[0, 30, 36, 100, 220]] = True  # [36, 100) and [100, 220): long plain chunks
    budget = DHSAParams(**{**SMALL.to_dict(), "budget": 36})  # 16 local + 4 sink + 16 free
    picked = {}
    for center in (0, 1):
        params = dataclasses.replace(budget, center_keys=center)
        picked[center] = set(select_keys(token_scores(q, k, starts, params), seq_len,
                                         params).keys(-1).tolist())
    assert set(needle.tolist()) <= picked[1]
    assert not set(needle.tolist()) & picked[0], "the uncentred score should favour length"


def test_each_kv_head_selects_its_own_needle():
    """Per KV head: head 0's keys hold a needle at 60..72 for its query heads, head 1's at
    150..162 for its own; each head selects its needle, which the head-averaged selection
    (one shared choice) cannot both fit within the budget's free slots."""
    seq_len, d = 256, 16
    rng = np.random.default_rng(2)
    q = rng.standard_normal((4, seq_len, d)).astype(np.float32) * 0.1
    k = rng.standard_normal((2, seq_len, d)).astype(np.float32) * 0.1
    needles = [np.arange(60, 72), np.arange(150, 162)]
    for head, needle in enumerate(needles):
        direction = np.zeros(d, np.float32)
        direction[head] = 1.0
        k[head, needle] += 3.0 * direction
        q[2 * head:2 * head + 2, 240:] += 3.0 * direction  # query heads 2h, 2h+1 share KV h
    starts = np.zeros(seq_len, bool)
    starts[::12] = True
    starts[[60, 72, 150, 162]] = True
    params = dataclasses.replace(PER_KV_HEAD, budget=36)  # 16 local + 4 sink + 16 free
    sel = select_keys(token_scores(q, k, starts, params), seq_len, params)
    for head, needle in enumerate(needles):
        assert set(needle.tolist()) <= set(sel.keys(-1, head).tolist())
    other = set(needles[1].tolist()) - set(sel.keys(-1, 0).tolist())
    assert other, "head 0 picked head 1's needle too: the heads did not select apart"


def test_boundaries_found_where_attention_mass_jumps():
    """Probes attend strongly to tokens 40..59 only: boundaries at the edges of that span."""
    seq_len, d = 128, 8
    q = np.zeros((2, seq_len, d), np.float32)
    k = np.zeros((1, seq_len, d), np.float32)
    q[:, :, 0] = 4.0
    k[:, 40:60, 0] = 4.0
    params = DHSAParams(block_size=16, budget=64, local=16, sink=0, dense_tail=0,
                        probe_stride=4, min_context=64)
    ratio = boundary_ratios(q, k, params)
    starts = chunk_starts(ratio, params)
    assert starts[40] and starts[60]
    assert starts.sum() <= 4  # 0, 40, 60 (+ at most one spurious)


def test_fixed_chunks():
    params = DHSAParams(block_size=16, budget=48, local=16, sink=4, dense_tail=0,
                        fixed_chunk=10, min_context=64)
    starts = chunk_starts(np.zeros(45, np.float32), params)
    assert np.flatnonzero(starts).tolist() == [0, 10, 20, 30, 40]


@pytest.mark.parametrize("seq_len, chunk, expected", [
    (300, 64, [(0, 64), (64, 128), (128, 192), (192, 256), (256, 300)]),
    (260, 64, [(0, 64), (64, 128), (128, 192), (192, 260)]),  # 4 < dense tail: merged
    (64, 64, [(0, 64)]),
    (300, 0, [(0, 300)]),
])
def test_prefill_calls(seq_len, chunk, expected):
    params = DHSAParams(block_size=16, budget=48, local=16, sink=4, dense_tail=8,
                        min_context=64, prefill_chunk=chunk)
    assert prefill_calls(seq_len, params) == expected


def test_chunked_calls_see_only_their_prefix():
    """Each call [s, e) is decided from the tokens before e: changing tokens at and after a
    call boundary changes neither the outputs nor the chunk starts before it."""
    params = DHSAParams(block_size=16, budget=48, local=16, sink=4, dense_tail=8,
                        probe_stride=8, min_context=64, prefill_chunk=64)
    q, k, v = random_qkv(200)
    out, starts, _ = dhsa_attention(q, k, v, params)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    q2[:, 128:] *= -1.5
    k2[:, 128:] += 3.0
    v2[:, 128:] -= 2.0
    out2, starts2, _ = dhsa_attention(q2, k2, v2, params)
    np.testing.assert_array_equal(starts2[:128], starts[:128])
    np.testing.assert_allclose(out2[:, :128], out[:, :128], atol=1e-6)
    # while the whole-prompt call looks ahead: its boundaries use later probes
    whole = DHSAParams(**{**params.to_dict(), "prefill_chunk": 0})
    assert not np.array_equal(dhsa_attention(q, k, v, whole)[1], starts)


@pytest.mark.parametrize("kwargs, match", [
    ({"prefill_chunk": 1000}, "multiple of"),
    ({"local": 64, "prefill_chunk": 1024}, "local >= dhsa.block_size"),
    ({"per_kv_head": 2}, "0 or 1"),
    ({"center_keys": -1}, "center_keys"),
    ({"local": 900, "sink": 200}, "must not exceed"),
    ({"min_context": 100}, "min_context"),
    ({"block_size": 0}, "block_size"),
    ({"early_budget": -1}, "early_budget"),
])
def test_invalid_params(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DHSAParams(**kwargs)


def test_early_layers_take_the_early_budget():
    params = DHSAParams(boundary_layer=2, early_layers=3, early_budget=4096)
    assert [params.is_early(i) for i in range(7)] == [False, False, True, True, True, False,
                                                      False]
    assert params.for_layer(1) is params and params.for_layer(5) is params
    layer = params.for_layer(2)
    assert layer.budget == 4096 and layer.boundary_layer == 2 and not layer.early_layers
    assert layer.local == params.local and layer.block_size == params.block_size
    wide = DHSAParams(budget=3072, min_context=4096)  # a budget above the early one
    assert not any(wide.is_early(i) for i in range(30)) and wide.for_layer(0) is wide


def test_manifest_without_early_settings_reads_as_exported():
    """An artifact exported before early_layers and center_keys existed computed every layer
    at budget, on uncentred keys."""
    old = {k: v for k, v in DHSAParams().to_dict().items()
           if not k.startswith("early_") and k != "center_keys"}
    params = DHSAParams.from_dict(old)
    assert params.early_layers == 0 and not params.is_early(0) and params.center_keys == 0
    assert DHSAParams.from_dict(DHSAParams().to_dict()) == DHSAParams()

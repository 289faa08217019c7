"""Memory model at Super Apriel 15B sizes: hand-computed cache bytes, weights, largest-batch search."""

from __future__ import annotations

import random

import pytest

from placement_search.errors import ConfigError
from placement_search.evaluators.memory import (
    GiB,
    MemoryModelError,
    RuntimeOverheads,
    batch_upper_bound,
    cache_bytes_per_sequence,
    decode_step_bytes,
    max_batch,
    memory_breakdown,
    mixer_cache_bytes,
    weight_bytes,
    workspace_bytes_per_sequence,
)
from placement_search.spec import get_spec

N = 48


@pytest.fixture(scope="module")
def spec():
    return get_spec("super-apriel-15b")


def test_attention_kv_cache_by_hand(spec):
    att = spec.mixer(0, "attention")
    # keys + values, 32768 slots, 8 KV heads of 128, bf16
    assert mixer_cache_bytes(att, 32768) == 2 * 32768 * 8 * 128 * 2 == 134_217_728
    per_seq = cache_bytes_per_sequence(spec, ["attention"] * N, 32768)
    assert per_seq == 48 * 134_217_728 + 8  # + the int64 position
    assert per_seq / 1e9 == pytest.approx(6.44, abs=0.01)  # platform.md: ~6.4 GB per sequence at 32K
    assert mixer_cache_bytes(att, 1) == 2 * 8 * 128 * 2
    assert mixer_cache_bytes(att, 32768, dtype="float32") == 2 * 134_217_728


def test_sliding_window_ring(spec):
    swa = spec.mixer(0, "sliding_window")
    assert swa.window_size == 4096
    ring = 2 * 4096 * 8 * 128 * 2
    for ctx in (4096, 32768, 131072):
        assert mixer_cache_bytes(swa, ctx) == ring
    assert mixer_cache_bytes(swa, 1000) == 2 * 1000 * 8 * 128 * 2


def test_gdn_and_kda_states_by_hand(spec):
    gdn = spec.mixer(0, "gdn")
    conv = (2 * 8 * 128 + 32 * 128) * 3 * 2  # [2*Hk*dk + Hv*dv, K-1] bf16
    state = 32 * 128 * 128 * 4  # [Hv, dk, dv] fp32
    assert mixer_cache_bytes(gdn, 32768) == conv + state == 2_134_016
    kda = spec.mixer(0, "kda")
    conv = 3 * (32 * 128) * 3 * 2  # three [H*D, K-1] bf16
    state = 32 * 128 * 128 * 4  # [H, D, D] fp32
    assert mixer_cache_bytes(kda, 131072) == conv + state == 2_170_880
    # context-independent
    assert mixer_cache_bytes(gdn, 4096) == mixer_cache_bytes(gdn, 131072)
    # a placement without full attention: ~0.1-0.3 GB per sequence at 32K (platform.md)
    mixed = ["sliding_window"] * 8 + ["gdn", "kda"] * 20
    assert cache_bytes_per_sequence(spec, mixed, 32768) == 8 + 8 * 16_777_216 + 20 * (2_134_016 + 2_170_880)
    assert 0.1e9 < cache_bytes_per_sequence(spec, mixed, 32768) < 0.3e9


def test_weights(spec):
    assert weight_bytes(spec, ["attention"] * N) / GiB == pytest.approx(26.9, abs=0.05)  # apriel2.md
    assert weight_bytes(spec, resident="supernet") / GiB == pytest.approx(45.9, abs=0.05)
    assert weight_bytes(spec, ["attention"] * N) == spec.placement_params(["attention"] * N) * 2
    with pytest.raises(MemoryModelError, match="resident"):
        weight_bytes(spec, ["attention"] * N, resident="everything")
    with pytest.raises(MemoryModelError, match="needs a placement"):
        weight_bytes(spec)


def test_breakdown_adds_up(spec):
    p = ["attention", "gdn"] * 24
    ov = RuntimeOverheads()
    m = memory_breakdown(spec, p, 16384, 10, overheads=ov)
    per = cache_bytes_per_sequence(spec, p, 16384)
    assert m.cache == 10 * per + 24 * 16384 * 8  # plus the slot indices of 24 attention layers
    ws = workspace_bytes_per_sequence(spec, p, 16384, overheads=ov)
    assert m.workspace == ov.fixed_workspace_bytes + 10 * ws
    assert m.total == m.weights + m.cache + m.workspace + m.reserve
    # logits of one sequence are part of the workspace
    assert ws > spec.vocab_size * 2
    assert set(m.gib()) == {"weights", "cache", "workspace", "reserve", "total", "cache_per_sequence"}


@pytest.mark.parametrize("mixer", ["attention", "sliding_window", "gdn", "kda"])
@pytest.mark.parametrize("context", [4096, 32768])
def test_max_batch_is_the_largest_that_fits(spec, mixer, context):
    p = [mixer] * N
    budget = 139.8 * GiB
    b = max_batch(spec, p, context, budget)
    assert b >= 1
    assert memory_breakdown(spec, p, context, b).total <= budget
    assert memory_breakdown(spec, p, context, b + 1).total > budget
    # closed form of the linear model
    m0 = memory_breakdown(spec, p, context, 0)
    per = memory_breakdown(spec, p, context, 1).total - m0.total
    assert b == (budget - m0.total) // per


def test_max_batch_known_values(spec):
    # all-attention at 32K on an H200: ~18 sequences (platform.md measured batch 18)
    assert max_batch(spec, ["attention"] * N, 32768, 139.8 * GiB) == 18
    assert max_batch(spec, ["attention"] * N, 131072, 139.8 * GiB) == 4
    # the whole supernet resident leaves less room
    assert max_batch(spec, ["attention"] * N, 32768, 139.8 * GiB, resident="supernet") == 15
    # not even one sequence
    assert max_batch(spec, ["attention"] * N, 131072, 30 * GiB) == 0
    with pytest.raises(MemoryModelError, match="positive"):
        max_batch(spec, ["attention"] * N, 32768, 0)


def test_max_batch_monotone(spec):
    p = ["gdn"] * 40 + ["attention"] * 8
    batches = [max_batch(spec, p, 32768, g * GiB) for g in (40, 60, 80, 100, 140)]
    assert batches == sorted(batches) and batches[0] < batches[-1]
    longer = max_batch(spec, p, 65536, 140 * GiB)
    assert longer < batches[-1]


def test_batch_upper_bound_covers_every_placement(spec):
    rng = random.Random(0)
    budget = 144 * GiB
    bounds = {(m, c): batch_upper_bound(spec, m, c, budget) for m in spec.mixer_names for c in (4096, 32768)}
    for _ in range(60):
        p = [rng.choice(spec.mixer_names) for _ in range(N)]
        if rng.random() < 0.5:  # single layer of some mixer among the cheapest
            p = ["gdn"] * N
            p[rng.randrange(N)] = rng.choice(spec.mixer_names)
        for c in (4096, 32768):
            b = max_batch(spec, p, c, budget)
            for m in set(p):
                assert b <= bounds[(m, c)]
    assert bounds[("attention", 32768)] < bounds[("gdn", 32768)]
    with pytest.raises(MemoryModelError, match="no mixer"):
        batch_upper_bound(spec, "mamba", 4096, budget)


def test_decode_step_bytes(spec):
    p = ["attention"] * N
    one = decode_step_bytes(spec, p, 32768, 1)
    embed = spec.vocab_size * spec.hidden_size * 2
    assert one["weights"] == spec.placement_params(p) * 2 - embed + spec.hidden_size * 2
    assert one["cache"] == N * (134_217_728 + 2 * 8 * 128 * 2)
    sixteen = decode_step_bytes(spec, p, 32768, 16)
    assert sixteen["cache"] == 16 * one["cache"]
    gdn = decode_step_bytes(spec, ["gdn"] * N, 32768, 1)
    assert gdn["cache"] == N * 2 * 2_134_016  # states read and written


def test_errors_name_the_culprit(spec):
    with pytest.raises(MemoryModelError, match="47 layers"):
        cache_bytes_per_sequence(spec, ["attention"] * 47, 1024)
    with pytest.raises(ConfigError, match="layer 3"):
        cache_bytes_per_sequence(spec, ["attention"] * 3 + ["mamba"] + ["attention"] * 44, 1024)
    with pytest.raises(MemoryModelError, match="context"):
        mixer_cache_bytes(spec.mixer(0, "attention"), 0)
    with pytest.raises(MemoryModelError, match="dtype"):
        mixer_cache_bytes(spec.mixer(0, "attention"), 8, dtype="int3")


def test_overheads_round_trip_and_validation():
    ov = RuntimeOverheads(reserve_bytes=123, gdn_state_copy=False)
    assert RuntimeOverheads.from_dict(ov.to_dict()) == ov
    with pytest.raises(MemoryModelError, match="unknown key 'bogus'"):
        RuntimeOverheads.from_dict({"bogus": 1})
    with pytest.raises(MemoryModelError, match="reserve_bytes"):
        RuntimeOverheads.from_dict({"reserve_bytes": -1})
    with pytest.raises(MemoryModelError, match="gdn_state_copy"):
        RuntimeOverheads.from_dict({"gdn_state_copy": 1})


def test_max_batch_falls_back_to_search_when_not_linear(spec, monkeypatch):
    """A non-linear total (none today) fails the closed form's check; the search still finds the largest batch."""
    import placement_search.evaluators.memory as mem

    class Total:
        def __init__(self, total):
            self.total = total

    monkeypatch.setattr(mem, "memory_breakdown", lambda *a, **k: Total(1000 + 10 * a[3] + a[3] ** 2))
    budget = 50_000
    want = max(b for b in range(1, 1000) if 1000 + 10 * b + b * b <= budget)
    assert mem.max_batch(spec, ["attention"] * N, 4096, budget) == want == 216

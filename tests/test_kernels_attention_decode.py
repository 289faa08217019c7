"""The split-K Triton decode attention (``attention_decode(..., backend="triton")``) against the fp32 reference.

Run in Triton's interpreter in a child process (``TRITON_INTERPRET=1`` must be set before triton is imported; see
tests/test_kernels_fused_decode.py). Cases: grouped query heads (G = 1, 4, 8), slot counts that are not a multiple
of the 64-slot block, several splits (of several pipelined blocks each), a merge over several tiles of splits
(``g2_chunked_merge``: 8 splits merged 2 at a time), random holes in ``valid`` (the SWA ring buffer and ragged full
caches), and a row whose only valid slots lie in the first split (later splits are fully masked and must merge as
empty); and each case again with the valid slots a prefix of every row given as ``lengths`` (the decode caches'
form), with NaN past each length so that any read of a slot past it shows.

Tolerances (norm-wise relative error): fp32 1e-5 (same fp32 math in another summation order; observed ~3e-7).
bf16 caches 1e-2: the output is rounded to bf16 (2^-8 = 3.9e-3 per element at most, the reference rounds too, so
the two differ by at most one ulp where their fp32 values straddle a rounding boundary; observed ~3.8e-3). In the
interpreter the kernel computes bf16 tiles in fp32 (its bf16 ``tl.dot`` is broken); the bf16 tensor-core dots are
checked on the GPU by benchmarks/check_gpu_kernels.py.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

TOL = {"float32": 1e-5, "bfloat16": 1e-2}
# name -> (B, S, H, Hkv, D)
CASES = {"g4_odd_slots": (3, 100, 8, 2, 32), "g1_small": (2, 37, 4, 4, 16), "g8_many_splits": (2, 300, 8, 1, 32),
         "g2_chunked_merge": (1, 2000, 4, 2, 32)}  # fmt: skip
#: cases whose merge reads this many splits per tile (the runtime's default otherwise)
MERGE_CHUNK = {"g2_chunked_merge": 2}


def _run_all(seed: int) -> dict[str, float]:
    import torch

    from placement_search import kernels as K

    A = sys.modules["placement_search.kernels.attention"]  # the module (the package's ``attention`` is the op)

    default_chunk = A.TRITON_DECODE_MERGE_CHUNK
    g = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {}
    for name, (B, S, H, Hkv, D) in CASES.items():
        for dt in (torch.float32, torch.bfloat16):
            q = torch.randn(B, 1, H, D, generator=g).to(dt)
            k = torch.randn(B, S, Hkv, D, generator=g).to(dt)
            v = torch.randn(B, S, Hkv, D, generator=g).to(dt)
            valid = torch.rand(B, S, generator=g) < 0.7
            valid[:, 0] = True
            valid[-1] = False
            valid[-1, :5] = True  # the last row's slots all lie in the first split
            ref = K.attention_decode(q, k, v, valid, scale=D**-0.5, backend="reference")
            A.TRITON_DECODE_MERGE_CHUNK = MERGE_CHUNK.get(name, default_chunk)
            tri = K.attention_decode(q, k, v, valid, scale=D**-0.5, backend="triton")
            A.TRITON_DECODE_MERGE_CHUNK = default_chunk
            err = float((tri.double() - ref.double()).norm() / ref.double().norm())
            out[f"{name}-{str(dt).split('.')[-1]}"] = err if bool(torch.isfinite(tri).all()) else float("inf")
            # the decode caches' prefix form: valid = the first lengths[b] slots, given as lengths (PREFIX). Rows:
            # the whole cache, one slot, and random lengths; the slots past each length hold NaN, which the kernel
            # must not read (a read would poison the row's output).
            lengths = torch.randint(1, S + 1, (B,), generator=g, dtype=torch.int32)
            lengths[0] = S
            lengths[-1] = 1 if B > 1 else lengths[-1]
            prefix = torch.arange(S)[None, :] < lengths[:, None]
            k_nan = torch.where(prefix[:, :, None, None], k, torch.full_like(k, float("nan")))
            v_nan = torch.where(prefix[:, :, None, None], v, torch.full_like(v, float("nan")))
            ref = K.attention_decode(q, k, v, prefix, scale=D**-0.5, backend="reference")
            tri = K.attention_decode(q, k_nan, v_nan, prefix, scale=D**-0.5, backend="triton", lengths=lengths)
            err = float((tri.double() - ref.double()).norm() / ref.double().norm())
            out[f"{name}-prefix-{str(dt).split('.')[-1]}"] = err if bool(torch.isfinite(tri).all()) else float("inf")
    return out


@pytest.fixture(scope="module")
def results(triton_interpreter) -> dict[str, float]:
    return triton_interpreter(__file__)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_decode_matches_reference(results: dict[str, float], case: str, dtype: str) -> None:
    assert results[f"{case}-{dtype}"] <= TOL[dtype], results


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_decode_reads_only_the_prefix(results: dict[str, float], case: str, dtype: str) -> None:
    """``lengths`` given: the same result as the mask, and no slot past a row's length read (they hold NaN)."""
    assert results[f"{case}-prefix-{dtype}"] <= TOL[dtype], results


def test_decode_lengths_match_the_caches_validity() -> None:
    import torch

    from placement_search import kernels as K
    from placement_search.evaluators.cache import AttentionCache

    pos = torch.tensor([0, 5, 9, 40])
    for size, ring in ((64, False), (8, True)):
        cache = AttentionCache(torch.zeros(4, size, 1, 2), torch.zeros(4, size, 1, 2), torch.arange(size), ring)
        lengths = K.decode_lengths(pos, size)
        assert lengths.dtype == torch.int32
        assert torch.equal(torch.arange(size)[None, :] < lengths[:, None], cache.valid(pos))


def test_triton_decode_checks_lengths() -> None:
    import torch

    from placement_search import kernels as K

    q, k = torch.zeros(2, 1, 4, 16), torch.zeros(2, 8, 2, 16)
    valid = torch.ones(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="lengths must be int32"):
        K.attention_decode(q, k, k, valid, scale=1.0, backend="triton", lengths=torch.ones(2, dtype=torch.int64))


def test_split_plan_and_cpu_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from placement_search.kernels.attention import TRITON_DECODE_BLOCK_S, triton_decode_splits
    from placement_search.kernels.backend import resolve_decode_backend

    for batch, heads, slots, sms in ((1, 8, 32768, 132), (256, 8, 32768, 132), (3, 2, 100, 8), (1, 1, 5, 132)):
        splits, per = triton_decode_splits(batch, heads, slots, sms)
        assert per % TRITON_DECODE_BLOCK_S == 0 and splits * per >= slots > (splits - 1) * per
        assert splits == 1 or batch * heads * (splits - 1) < 2 * sms  # no more splits than the GPU needs
        assert splits == 1 or per >= 256  # each split long enough for the pipelined loop
    # batch 1: 33 splits wanted (264 programs over 132 SMs), rounded to whole 64-slot blocks: 32 splits of 1024
    assert triton_decode_splits(1, 8, 32768, 132) == (32, 1024)
    assert triton_decode_splits(1, 8, 4096, 132) == (16, 256)  # a 4K SWA ring: splits of at least 256 slots
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_decode_backend("triton", torch.device("cpu"))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the pytest fixture does)")
    print(json.dumps(_run_all(int(sys.argv[1]) if len(sys.argv) > 1 else 0)))

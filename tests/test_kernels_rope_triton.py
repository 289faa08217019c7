"""``rope_cache_write(backend="triton")`` (RoPE on q and k, k and v written into the cache slot, one launch) against
the torch path.

Runs on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1`` before triton is imported: a subprocess).
Fresh random inputs each run (the seed is reported). Tolerance: the rotated queries and the cache within one unit
in the last place of the output dtype relative to the largest value (fp32: 1e-6; bf16: 2^-7): both sides compute
``x * cos + roll(x) * sin`` in fp32 and round once, but the compiled kernel may contract it into a fused
multiply-add. The values are copied exactly and every slot other than the written one is untouched.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

# name: (B, H, HKV, D, S, dtype, strided views of a packed projection, ring slots)
CASES = {
    "fp32-packed": (3, 4, 2, 16, 7, "float32", True, False),
    "bf16-ring": (2, 8, 2, 32, 5, "bfloat16", False, True),
    "bf16-packed-d12": (2, 2, 1, 12, 4, "bfloat16", True, False),
}


def _run_all(seed: int) -> dict[str, dict[str, float]]:
    import torch

    from placement_search.kernels.rope import rope_cache_write, rope_step_tables

    g = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, float]] = {}
    for name, (B, H, HKV, D, S, dt, packed, ring) in CASES.items():
        dtype = getattr(torch, dt)
        if packed:
            flat = torch.randn(B, (H + 2 * HKV) * D + 5, generator=g).to(dtype)
            q, k, v = (t.view(B, -1, D) for t in flat[:, : (H + 2 * HKV) * D].split([H * D, HKV * D, HKV * D], -1))
        else:
            q, k, v = (torch.randn(B, n, D, generator=g).to(dtype) for n in (H, HKV, HKV))
        pos = torch.randint(0, 3 * S, (B,), generator=g)
        slot = pos % S if ring else torch.randint(0, S, (B,), generator=g)
        cos, sin = rope_step_tables(pos, D, 10000.0, dtype=dtype)
        caches = [torch.randn(B, S, HKV, D, generator=g).to(dtype) for _ in range(2)]
        c0 = [c.clone() for c in caches]
        c1 = [c.clone() for c in caches]
        q0 = rope_cache_write(q, k, v, cos, sin, *c0, slot, backend="torch")
        q1 = rope_cache_write(q, k, v, cos, sin, *c1, slot, backend="triton")
        rows = torch.arange(B)
        untouched = torch.ones(B, S, dtype=torch.bool)
        untouched[rows, slot] = False
        out[name] = {
            "q": float((q1.double() - q0.double()).abs().max() / q0.double().abs().max()),
            "k": float((c1[0].double() - c0[0].double()).abs().max() / c0[0].double().abs().max()),
            "v_exact": float(torch.equal(c1[1], c0[1])),
            "others_kept": float(torch.equal(c1[0][untouched], caches[0][untouched])),
            "shape": float(q1.shape == (B, 1, H, D) and q1.dtype == dtype),
        }
    return out


@pytest.fixture(scope="module")
def interpreted(triton_interpreter) -> dict[str, dict[str, float]]:
    return triton_interpreter(__file__)


@pytest.mark.parametrize("case", list(CASES))
def test_triton_rope_cache_write_matches_torch(interpreted: dict, case: str) -> None:
    r = interpreted[case]
    tol = 1e-6 if CASES[case][5] == "float32" else 2.0**-7
    assert r["q"] <= tol and r["k"] <= tol, (interpreted["seed"], r)
    assert r["v_exact"] == 1.0 and r["others_kept"] == 1.0 and r["shape"] == 1.0, r


def test_rope_backend_errors() -> None:
    import torch

    from placement_search.kernels.rope import rope_cache_write

    q = torch.randn(1, 2, 4)
    kv = torch.randn(1, 1, 4)
    tab = torch.ones(1, 1, 1, 4)
    cache = torch.zeros(1, 3, 1, 4)
    with pytest.raises(ValueError, match="unknown rope backend 'cuda'"):
        rope_cache_write(q, kv, kv, tab, tab, cache, cache.clone(), torch.zeros(1, dtype=torch.long), backend="cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            rope_cache_write(q, kv, kv, tab, tab, cache, cache.clone(), torch.zeros(1, dtype=torch.long), backend="triton")


if __name__ == "__main__":
    print(json.dumps(_run_all(int(sys.argv[1]))))

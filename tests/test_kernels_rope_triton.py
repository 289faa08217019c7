"""``rope_cache_write(backend="triton")`` (RoPE on q and k, k and v written into the cache slot, one launch) against
the torch path.

Runs on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1`` before triton is imported: a subprocess).
Fresh random inputs each run (the seed is reported). Tolerance: the rotated queries and the cache within one unit
in the last place of the output dtype relative to the largest value (fp32: 1e-6; bf16: 2^-7): both sides compute
``x * cos + roll(x) * sin`` in fp32 and round once, but the compiled kernel may contract it into a fused
multiply-add. The values are copied exactly and every slot other than the written one is untouched.

``linear_rope_cache`` (the attention layer's packed q/k/v projection with RoPE and the cache write in its epilogue,
``ROPE``) against the two-step path it replaces, the plain Triton projection then ``rope_cache_write``'s torch path:
equal bit for bit in the interpreter (the same products rounded once to the activation dtype, then the same fp32
rotation rounded once, to nearest even on both sides), for 1, 3 and 16 rows, fp32 and bf16, a ring and a full
cache, with the RMSNorm applied by the projection from plain rows and from a producer's :class:`NormedRows`. The
plain projection runs on the fused launch's tiles (as many columns a program as the fused one has column pairs):
the interpreter's dot is numpy's matmul, whose fp32 summation order may depend on the tile's width (on a 2-core VM
in session 16, 16 and 32 columns summed 256 products 3e-7 apart, relative, for every seed), so other tiles would
test the CPU's BLAS rather than the epilogue.
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
    for name, (B, H, HKV, D, K, S, dt, ring, norm) in FUSED.items():
        out[name] = _fused_case(g, B, H, HKV, D, K, S, getattr(torch, dt), ring, norm)
    return out


# name: (B, H, HKV, D, K, S, dtype, ring slots, norm: None, "rows" (plain rows) or "normed" (a producer's NormedRows))
FUSED = {
    "fused-bf16": (3, 4, 2, 64, 128, 7, "bfloat16", False, None),
    "fused-fp32-ring-rows": (1, 2, 1, 32, 256, 5, "float32", True, "rows"),
    "fused-bf16-16rows-normed": (16, 4, 2, 64, 256, 9, "bfloat16", True, "normed"),
}


def _fused_case(g, B, H, HKV, D, K, S, dtype, ring, norm) -> dict[str, float]:
    import torch

    from placement_search.kernels.projection import linear, linear_rope_cache, rope_tiles
    from placement_search.kernels.rope import rope_cache_write, rope_step_tables

    w = (torch.randn((H + 2 * HKV) * D, K, generator=g) * K**-0.5).to(dtype)
    nw = (torch.rand(K, generator=g) + 0.5).to(dtype)
    x = torch.randn(B, K, generator=g).to(dtype)
    if norm == "normed":  # a residual projection that writes what the norm needs (NORM_OUT), as a block's o_proj
        wo = (torch.randn(K, 96, generator=g) * 96**-0.5).to(dtype)
        x = linear(torch.randn(B, 96, generator=g).to(dtype), wo, residual=x, next_norm_weight=nw, backend="triton")
    kw = {"norm_weight": nw} if norm else {}
    pos = torch.randint(0, 3 * S, (B,), generator=g)
    slot = pos % S if ring else torch.randperm(S, generator=g)[:B] if B <= S else torch.randint(0, S, (B,), generator=g)
    cos, sin = rope_step_tables(pos, D, 10000.0, dtype=dtype)
    caches = [torch.randn(B, S, HKV, D, generator=g).to(dtype) for _ in range(2)]
    c0 = [c.clone() for c in caches]
    c1 = [c.clone() for c in caches]
    # the plain projection on the fused launch's tiles (BN columns where it has BN pairs: the same dot shapes)
    y = linear(x, w, backend="triton", config={**rope_tiles(D), "SPLIT": 1}, **kw)
    q, k, v = (t.view(B, -1, D) for t in y.split([H * D, HKV * D, HKV * D], -1))
    q0 = rope_cache_write(q, k, v, cos, sin, *c0, slot, backend="torch")
    q1 = linear_rope_cache(x, w, H, HKV, cos, sin, slot, *c1, backend="triton", **kw)
    return {
        "q_exact": float(torch.equal(q1, q0) and q1.shape == (B, 1, H, D)),
        "k_exact": float(torch.equal(c1[0], c0[0])),
        "v_exact": float(torch.equal(c1[1], c0[1])),
        "written": float(not torch.equal(c1[0], caches[0])),
    }


@pytest.mark.parametrize("case", list(FUSED))
def test_fused_projection_rope_cache_matches_two_steps(interpreted: dict, case: str) -> None:
    r = interpreted[case]
    assert r == {"q_exact": 1.0, "k_exact": 1.0, "v_exact": 1.0, "written": 1.0}, (interpreted["seed"], r)


def test_fused_projection_rope_cache_torch_path() -> None:
    """Off the Triton path (here: CPU without the interpreter) the op is the two calls it fuses, exactly."""
    import torch

    from placement_search.kernels.projection import linear, linear_rope_cache
    from placement_search.kernels.rope import rope_cache_write, rope_step_tables

    g = torch.Generator().manual_seed(0)
    w, x, nw = torch.randn(8 * 32, 32, generator=g), torch.randn(3, 32, generator=g), torch.rand(32, generator=g)
    cos, sin = rope_step_tables(torch.tensor([4, 9, 2]), 32, 10000.0, dtype=torch.float32)
    slot = torch.tensor([4, 1, 2])
    c0 = [torch.randn(3, 5, 2, 32, generator=g) for _ in range(2)]
    c1 = [c.clone() for c in c0]
    q1 = linear_rope_cache(x, w, 4, 2, cos, sin, slot, *c1, norm_weight=nw)
    y = linear(x, w, norm_weight=nw).view(3, 8, 32)
    q0 = rope_cache_write(y[:, :4], y[:, 4:6], y[:, 6:], cos, sin, *c0, slot)
    assert torch.equal(q1, q0) and all(torch.equal(a, b) for a, b in zip(c1, c0, strict=True))


def test_fused_projection_rope_cache_checks_its_inputs() -> None:
    import torch

    from placement_search.kernels.projection import linear_rope_cache, rope_fits

    w = torch.zeros(8 * 32, 32)
    cache = torch.zeros(2, 5, 2, 32)
    tab = torch.zeros(2, 1, 1, 32)
    slot = torch.zeros(2, dtype=torch.long)
    assert rope_fits(w, 4, 2, cache, cache.clone())
    assert not rope_fits(w, 2, 2, cache, cache.clone())  # 6 heads' rows, not 8
    assert not rope_fits(w, 4, 2, cache, cache.clone().transpose(1, 2).contiguous().transpose(1, 2))
    assert not rope_fits(torch.zeros(8 * 16, 32), 4, 2, cache[..., :16], cache[..., :16].clone())  # 8 pairs a head
    with pytest.raises(ValueError, match="do not fit 2 heads over 2 KV heads"):
        linear_rope_cache(torch.zeros(2, 32), w, 2, 2, tab, tab, slot, cache, cache.clone())
    with pytest.raises(ValueError, match="do not divide half of head size 32"):
        linear_rope_cache(torch.zeros(2, 32), w, 4, 2, tab, tab, slot, cache, cache.clone(),
                          config={"BN": 32, "BK": 32, "STAGES": 2, "num_warps": 4})  # fmt: skip


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

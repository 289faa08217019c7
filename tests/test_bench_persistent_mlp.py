"""The persistent-MLP prototype (benchmarks/bench_persistent_mlp.py) against the runtime's two launches, in
Triton's interpreter (a child process: ``TRITON_INTERPRET=1`` must precede the import of triton).

The interpreter runs a grid's programs one after another, so a grid barrier can only pass with one program: the
arithmetic (both phases, the split-K fixup, the barrier's counters) is checked here at ``G = 1``; the H200 run of the
benchmark checks every ``G`` against the two launches on fresh random inputs.

Tolerances: the gate/up half runs the runtime's arithmetic (K tiles summed in the same order, the same roundings),
so ``a`` must be bit-equal to ``gated_linear`` on the prototype's tiles (``GU``: 32 columns a program; the runtime now
runs 64, which sum the same K tiles on the GPU, but the interpreter's fp32 numpy matmul may sum a tile of another
width in another order, depending on the CPU's BLAS kernels); the output sums the down projection's K ranges in
another grouping (``S`` ranges against the runtime's 2) before one bf16 rounding, so it may differ by one bf16 ulp of
an element (2^-7 relative to the largest element bounds it).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _run_all(seed: int) -> dict[str, float]:
    import bench_persistent_mlp as B
    import torch

    from placement_search.kernels import projection as P

    g = torch.Generator().manual_seed(seed)
    hidden, inter = 256, 512  # multiples of BK (128) and of SPLIT x BK for the splits below
    out: dict[str, float] = {}
    for m in (1, 5):
        x = torch.randn(m, hidden, generator=g).to(torch.bfloat16)
        r = torch.randn(m, hidden, generator=g).to(torch.bfloat16)
        wg, wu = ((torch.randn(inter, hidden, generator=g) / hidden**0.5).to(torch.bfloat16) for _ in range(2))
        wd = (torch.randn(hidden, inter, generator=g) / inter**0.5).to(torch.bfloat16)
        ref_a = P.gated_linear(x, wg, wu, backend="triton", config={**B.GU, "num_warps": 4, "SPLIT": 1})
        ref = B.two_launches(x, wg, wu, wd, r)
        for split in (1, 2, 4):
            mlp = B.PersistentMLP(m, x.device, 1, split, inter=inter, hidden=hidden)
            for rep in range(2):  # the counters are re-armed for the next launch
                y = mlp(x, wg, wu, wd, r)
                key = f"m{m}_s{split}_r{rep}"
                out[f"{key}_a_equal"] = float(torch.equal(mlp.a, ref_a))
                out[f"{key}_err"] = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
                out[f"{key}_counters_zero"] = float(int(mlp.locks.abs().sum()) == 0 and int(mlp.bar[0]) == 0)
                out[f"{key}_generation"] = float(int(mlp.bar[1]))
    return out


@pytest.fixture(scope="module")
def interpreted(triton_interpreter) -> dict[str, float]:
    return triton_interpreter(__file__)


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("split", [1, 2, 4])
def test_persistent_mlp_matches_two_launches(interpreted: dict[str, float], m: int, split: int) -> None:
    for rep in range(2):
        key = f"m{m}_s{split}_r{rep}"
        assert interpreted[f"{key}_a_equal"] == 1.0, (key, interpreted["seed"])
        assert interpreted[f"{key}_err"] <= 2**-7, (key, interpreted[f"{key}_err"], interpreted["seed"])
        assert interpreted[f"{key}_counters_zero"] == 1.0, key
        assert interpreted[f"{key}_generation"] == rep + 1, key  # one barrier per launch


def test_variant_names(benchmark_module) -> None:
    B = benchmark_module("bench_persistent_mlp")
    assert B.parse_variant("two") is None
    assert B.parse_variant("p224_s7") == (224, 7, 0)
    assert B.parse_variant("p64_s2_pf4") == (64, 2, 4)
    for bad in ("p224", "q1_s2", "p1_s2_x3", "pa_s2"):
        with pytest.raises(SystemExit, match="unknown variant"):
            B.parse_variant(bad)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the pytest fixture does)")
    print(json.dumps(_run_all(int(sys.argv[1]) if len(sys.argv) > 1 else 0)))

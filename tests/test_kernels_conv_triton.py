"""The Triton prefill conv (``causal_conv1d(backend="triton")``) against the torch path, and backend resolution.

The kernel runs on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1`` must be set before triton is
imported, hence the subprocess). The interpreter's numpy math has no fused multiply-add and its own ``exp``, so on
CPU the comparison is close, not bitwise: the largest difference relative to the largest output is within 1e-6
in fp32 and within one bf16 unit in the last place (2^-7) in bf16. On the GPU the two are bitwise equal (``benchmarks/check_conv_triton.py``,
``results/conv_triton_check_h200.json``). Inputs are fresh random tensors each run (the seed is reported).
"""

from __future__ import annotations

import json
import os
import sys

import pytest

# name: (B, T, C, dtype, initial state, row-strided input, activation)
CASES = {
    "t1-state": (2, 1, 40, "float32", True, False, "silu"),
    "t2-strided": (2, 2, 40, "bfloat16", True, True, "silu"),
    "t3-nostate": (3, 3, 70, "float32", False, True, None),
    "long-blocks": (2, 75, 130, "bfloat16", False, True, "silu"),
    "long-state": (2, 40, 64, "float32", True, False, "silu"),
}


def _run_all(seed: int) -> dict[str, dict[str, float]]:
    import torch

    from placement_search.kernels.conv import causal_conv1d

    g = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, float]] = {}
    for name, (B, T, C, dt, state, strided, act) in CASES.items():
        dtype = getattr(torch, dt)
        wide = torch.randn(B, T, C + (9 if strided else 0), generator=g).to(dtype)
        x = wide[:, :, 4 : 4 + C] if strided else wide
        w = (0.5 * torch.randn(C, 4, generator=g)).to(dtype)
        st = torch.randn(B, C, 3, generator=g).to(dtype) if state else None
        y0, f0 = causal_conv1d(x, w, initial_state=st, activation=act, backend="torch")
        y1, f1 = causal_conv1d(x, w, initial_state=st, activation=act, backend="triton")
        _, none = causal_conv1d(x, w, initial_state=st, activation=act, backend="triton", output_final_state=False)
        a, b = y1.double(), y0.double()
        out[name] = {
            "rel": float((a - b).abs().max() / b.abs().max()),  # against the largest output
            "state_equal": float(f0 is not None and f1 is not None and torch.equal(f0, f1)),
            "none_state": float(none is None),
            "dtype_kept": float(y1.dtype == dtype and y1.shape == (B, T, C)),
        }
    return out


@pytest.fixture(scope="module")
def interpreted(triton_interpreter) -> dict[str, dict[str, float]]:
    return triton_interpreter(__file__)


@pytest.mark.parametrize("case", list(CASES))
def test_triton_conv_matches_torch(interpreted: dict, case: str) -> None:
    r = interpreted[case]
    tol = 1e-6 if CASES[case][3] == "float32" else 2.0**-7
    assert r["rel"] <= tol, (interpreted["seed"], r)
    assert r["state_equal"] == 1.0 and r["none_state"] == 1.0 and r["dtype_kept"] == 1.0, r


def test_conv_backend_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from placement_search.kernels.conv import causal_conv1d, resolve_conv_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = torch.randn(1, 5, 8), torch.randn(8, 4)
    assert resolve_conv_backend("auto", x, w) == "torch"  # CPU
    with pytest.raises(ValueError, match="unknown conv backend"):
        resolve_conv_backend("cudnn", x, w)
    with pytest.raises(ValueError, match="no backward"):
        resolve_conv_backend("triton", x, w.requires_grad_())
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w.detach(), activation="gelu")
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, w.detach(), initial_state=torch.zeros(1, 8, 2))
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_conv_backend("triton", x, w.detach())
    with torch.no_grad():  # no gradient needed: the float64 reference stays on torch even when asked for auto
        assert resolve_conv_backend("auto", x.double(), w.double()) == "torch"


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the pytest fixture does)")
    print(json.dumps(_run_all(int(sys.argv[1]) if len(sys.argv) > 1 else 0)))

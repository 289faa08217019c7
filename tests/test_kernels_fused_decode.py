"""Fused GDN / KDA decode kernels (kernels/fused_decode.py) against the torch composition of the existing ops.

The Triton kernels run on CPU tensors in Triton's interpreter. ``TRITON_INTERPRET=1`` must be set before triton is
imported (``triton.jit`` reads it when a kernel is decorated), so the checks run in a child process: this file
executed as a script; nothing leaks into the other tests' process.

Tolerances (norm-wise relative error, ``|x - ref| / |ref|``, checked after every step of several in a row):

- fp32: 1e-5 for outputs and states. Both sides compute in fp32; they differ only in summation order
  (conv taps, L2 norms, ``S^T k``, ``S^T q``, the RMS), so errors stay at a few ulps (observed 1e-7 .. 5e-7).
- bf16: outputs 2e-2, states 2e-3. Inputs, conv states and outputs are bf16 and the state fp32; the kernel rounds
  where the reference rounds (conv output, beta, o, the normalised o, the gate), but a fp32 reassociation difference
  next to a bf16 rounding boundary flips one bf16 ulp (2^-8 = 3.9e-3 relative) of that element, and a flipped q/k/v
  element feeds the whole state row/column. Outputs pass through three more bf16 roundings. Observed errors are
  far under these bounds: bf16 outputs bitwise equal and states ~1e-7 on the seeds tried (the kernel rounds to
  nearest even by hand, see ``_rnd``: the interpreter would otherwise truncate).
- conv states: bitwise equal (the shift only moves inputs, in their own dtype).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest

TOL = {"float32": {"out": 1e-5, "state": 1e-5}, "bfloat16": {"out": 2e-2, "state": 2e-3}}
STEPS = 3


def _rel(x: Any, ref: Any) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _gdn_case(hk: int, hv: int, dk: int, dv: int, kw: int, bv: int | None, dtype: Any, seed: int) -> dict[str, Any]:
    import torch

    from placement_search.kernels.fused_decode import gdn_decode_step

    g = torch.Generator().manual_seed(seed)
    B, C = 3, 2 * hk * dk + hv * dv

    def rnd(*shape: int, std: float = 1.0, dt: Any = dtype) -> Any:
        return (torch.randn(*shape, generator=g) * std).to(dt)

    w = rnd(C, 1, kw, std=0.5)
    A_log = torch.rand(hv, generator=g).mul(2.0).to(dtype)
    dt_bias = rnd(hv, std=0.5)
    norm_w = (1.0 + rnd(dv, std=0.1, dt=torch.float32)).to(dtype)
    conv_ref, state_ref = rnd(B, C, kw - 1), rnd(B, hv, dk, dv, std=0.1, dt=torch.float32)
    conv_tri, state_tri = conv_ref.clone(), state_ref.clone()
    errs: dict[str, float] = {"out": 0.0, "state": 0.0, "conv_exact": 1.0}
    for _ in range(STEPS):
        proj = rnd(B, C + hv * dv + 7)  # a wider projection output: qkv and z are row-strided slices
        ba = rnd(B, 2 * hv)
        qkv, z = proj[:, :C], proj[:, C : C + hv * dv]
        b, a = ba[:, :hv], ba[:, hv:]
        ref = gdn_decode_step(qkv, z, b, a, conv_ref, w, A_log, dt_bias, norm_w, state_ref, norm_eps=1e-5,
                              backend="torch")  # fmt: skip
        out = gdn_decode_step(qkv, z, b, a, conv_tri, w, A_log, dt_bias, norm_w, state_tri, norm_eps=1e-5,
                              backend="triton", block_v=bv)  # fmt: skip
        errs["out"] = max(errs["out"], _rel(out, ref))
        errs["state"] = max(errs["state"], _rel(state_tri, state_ref))
        errs["conv_exact"] = min(errs["conv_exact"], float(torch.equal(conv_tri, conv_ref)))
        errs["finite"] = float(bool(torch.isfinite(out).all()))
    return errs


def _kda_case(h: int, d: int, kw: int, bv: int | None, dtype: Any, seed: int, v_pad: int = 0) -> dict[str, Any]:
    """``v_pad > 0``: v a column slice of a wider tensor, so its row stride differs from q's and k's."""
    import torch

    from placement_search.kernels.fused_decode import kda_decode_step

    g = torch.Generator().manual_seed(seed)
    B, P = 2, h * d

    def rnd(*shape: int, std: float = 1.0, dt: Any = dtype) -> Any:
        return (torch.randn(*shape, generator=g) * std).to(dt)

    ws = [rnd(P, 1, kw, std=0.5) for _ in range(3)]
    A_log = torch.rand(h, generator=g).mul(2.0).to(dtype)
    dt_bias = rnd(P, std=0.5)
    norm_w = (1.0 + rnd(d, std=0.1, dt=torch.float32)).to(dtype)
    convs_ref = [rnd(B, P, kw - 1) for _ in range(3)]
    convs_tri = [c.clone() for c in convs_ref]
    state_ref = rnd(B, h, d, d, std=0.1, dt=torch.float32)
    state_tri = state_ref.clone()
    errs: dict[str, float] = {"out": 0.0, "state": 0.0, "conv_exact": 1.0}
    for _ in range(STEPS):
        q, k, v, f, gate = (rnd(B, P) for _ in range(5))
        if v_pad:
            v = torch.cat([v, rnd(B, v_pad)], dim=1)[:, :P]
        beta = rnd(B, h)
        common = (q, k, v, f, beta, gate)
        ref = kda_decode_step(*common, *convs_ref, *ws, A_log, dt_bias, norm_w, state_ref, norm_eps=1e-5,
                              backend="torch")  # fmt: skip
        out = kda_decode_step(*common, *convs_tri, *ws, A_log, dt_bias, norm_w, state_tri, norm_eps=1e-5,
                              backend="triton", block_v=bv)  # fmt: skip
        errs["out"] = max(errs["out"], _rel(out, ref))
        errs["state"] = max(errs["state"], _rel(state_tri, state_ref))
        exact = all(torch.equal(a, b) for a, b in zip(convs_tri, convs_ref, strict=True))
        errs["conv_exact"] = min(errs["conv_exact"], float(exact))
        errs["finite"] = float(bool(torch.isfinite(out).all()))
    return errs


# name -> (kind, sizes); GDN sizes (HK, HV, DK, DV, K, value columns per program), KDA sizes (H, D, K, columns);
# the column blocks split each head's state over several programs (None: the default, one block at these sizes)
CASES: dict[str, tuple[str, tuple[int | None, ...]]] = {
    "gdn_grouped_hv4hk": ("gdn", (2, 8, 16, 32, 4, 8)),
    "gdn_grouped_one_block": ("gdn", (2, 4, 16, 16, 4, None)),
    "gdn_ungrouped_odd_dims": ("gdn", (2, 2, 12, 20, 3, 8)),
    "kda": ("kda", (3, 16, 4, 8)),
    "kda_odd_dim": ("kda", (2, 24, 4, 16)),
    "kda_one_block": ("kda", (2, 16, 4, None)),
    "kda_v_row_stride": ("kda", (2, 16, 4, 8)),
}
#: extra keyword arguments of a case
CASE_KW: dict[str, dict[str, int]] = {"kda_v_row_stride": {"v_pad": 5}}


def _run_all(base_seed: int) -> dict[str, dict[str, float]]:
    import torch

    from placement_search.kernels import fused_decode as fd

    results: dict[str, dict[str, float]] = {}
    default = fd.PRECONV_MIN_ROWS, fd.STATE_EARLY_LOAD_MIN_ROWS, fd.STATE_GRID_MEMORY_ORDER_MIN_ROWS
    # conv in the state kernels / a launch of its own / in the state kernels with the state tile loaded first / in
    # the state kernels, and the grid in the state's memory order
    paths = (("fused", 1 << 30, None, None), ("preconv", 1, None, None), ("early", 1 << 30, 1, None),
             ("memorder", 1 << 30, None, 1))  # fmt: skip
    for path, min_rows, early, memorder in paths:
        fd.PRECONV_MIN_ROWS, fd.STATE_EARLY_LOAD_MIN_ROWS, fd.STATE_GRID_MEMORY_ORDER_MIN_ROWS = min_rows, early, memorder
        for i, (name, (kind, sizes)) in enumerate(CASES.items()):
            for j, dtype in enumerate((torch.float32, torch.bfloat16)):
                fn = _gdn_case if kind == "gdn" else _kda_case
                seed = base_seed + 2 * i + j
                r = fn(*sizes, dtype, seed, **CASE_KW.get(name, {}))  # type: ignore[operator]
                results[f"{name}-{str(dtype).split('.')[-1]}-{path}"] = {**r, "seed": seed}
    fd.PRECONV_MIN_ROWS, fd.STATE_EARLY_LOAD_MIN_ROWS, fd.STATE_GRID_MEMORY_ORDER_MIN_ROWS = default
    return results


@pytest.fixture(scope="module")
def interpreted_results(triton_interpreter) -> dict[str, dict[str, float]]:
    return triton_interpreter(__file__)


@pytest.mark.parametrize("path", ["fused", "preconv", "early", "memorder"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_matches_torch_reference(
    interpreted_results: dict[str, dict[str, float]], case: str, dtype: str, path: str
):
    """The Triton paths: the conv in the state kernels (below ``PRECONV_MIN_ROWS`` rows), as a launch of its own
    whose outputs the state kernels read (from there on), and in the state kernels with the state tile loaded
    first (``STATE_EARLY_LOAD_MIN_ROWS``), and the first with the state programs launched in the state's memory
    order (``STATE_GRID_MEMORY_ORDER_MIN_ROWS``)."""
    r = interpreted_results[f"{case}-{dtype}-{path}"]
    assert r["finite"] == 1.0
    assert r["conv_exact"] == 1.0, "conv state shift must be exact"
    assert r["out"] <= TOL[dtype]["out"], r
    assert r["state"] <= TOL[dtype]["state"], r


def test_torch_backend_matches_mixer_math() -> None:
    """The ``torch`` backend is the composition the mixers used before (same ops, same order): bitwise equal."""
    import torch
    import torch.nn.functional as F

    from placement_search import kernels as K
    from placement_search.kernels.fused_decode import gdn_decode_step

    g = torch.Generator().manual_seed(0)
    B, HK, HV, DK, DV, KW = 2, 2, 4, 8, 8, 4
    C = 2 * HK * DK + HV * DV
    qkv, z = torch.randn(B, C, generator=g), torch.randn(B, HV * DV, generator=g)
    b, a = torch.randn(B, HV, generator=g), torch.randn(B, HV, generator=g)
    w, A_log, dt_bias = (
        torch.randn(C, KW, generator=g),
        torch.rand(HV, generator=g),
        torch.randn(HV, generator=g),
    )
    nw = torch.rand(DV, generator=g) + 0.5
    conv, state = torch.randn(B, C, KW - 1, generator=g), torch.randn(B, HV, DK, DV, generator=g)
    conv2, state2 = conv.clone(), state.clone()
    out = gdn_decode_step(qkv, z, b, a, conv, w, A_log, dt_bias, nw, state, norm_eps=1e-5, backend="torch")
    y = K.causal_conv1d_update(qkv, conv2, w, activation="silu")
    q, k, v = y.split([HK * DK, HK * DK, HV * DV], dim=-1)
    o = K.gated_delta_rule_step(q.view(B, HK, DK), k.view(B, HK, DK), v.view(B, HV, DV), K.gdn_gate(a, A_log, dt_bias),
                                b.sigmoid(), state2, backend="naive")  # fmt: skip
    ref = (K.rms_norm(o, nw, 1e-5) * F.silu(z.view(B, HV, DV))).flatten(1)
    assert torch.equal(out, ref) and torch.equal(state, state2) and torch.equal(conv, conv2)


def test_backend_resolution_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from placement_search.kernels.fused_decode import resolve_fused_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert resolve_fused_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError):
        resolve_fused_backend("fla", cpu)
    with pytest.raises(ValueError):
        resolve_fused_backend("nope", cpu)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the pytest fixture does)")
    print(json.dumps(_run_all(int(sys.argv[1]) if len(sys.argv) > 1 else 0)))


def test_state_grid_order() -> None:
    """The state kernels' grid: ``[B, H, blocks]`` below ``STATE_GRID_MEMORY_ORDER_MIN_ROWS`` rows, the state's memory
    order ``[blocks, H, B]`` from there, and back where the rows would pass CUDA's 65535 on the grid's third axis."""
    from placement_search.kernels import fused_decode as fd

    rows = fd.STATE_GRID_MEMORY_ORDER_MIN_ROWS
    assert rows is not None and rows > 1
    assert fd._state_grid(rows - 1, 32, 4) == ((rows - 1, 32, 4), False)
    assert fd._state_grid(rows, 32, 2) == ((2, 32, rows), True)
    assert fd._state_grid(65536, 32, 2) == ((65536, 32, 2), False)

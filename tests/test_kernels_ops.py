"""CPU tests of placement_search.kernels: norm, RoPE, conv, attention (full, windowed, decode), backends.

Tolerances: float64 paths that compute the same quantity in a different order agree to ~1e-12, so 1e-10 is used;
exact-by-construction equalities (same ops on the same dtype) use torch.equal.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from placement_search import kernels as K
from placement_search.kernels import backend as KB

F64 = torch.float64
TOL64 = 1e-10  # float64, different association of the same sums


# ----------------------------------------------------------------------------------------- rms_norm
def test_rms_norm_fp32_then_cast_before_weight() -> None:
    torch.manual_seed(0)
    x = (3 * torch.randn(4, 7, 64)).to(torch.bfloat16)
    w = (1 + 0.3 * torch.randn(64)).to(torch.bfloat16)
    x32 = x.float()
    expected = (x32 / torch.sqrt((x32 * x32).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * w
    got = K.rms_norm(x, w, 1e-5)
    assert got.dtype == torch.bfloat16
    # Same fp32 normalisation, same bf16 cast, same bf16 multiply: the rounding sequence is identical
    # (rsqrt vs 1/sqrt may differ by 1 ulp in fp32, which rarely survives the bf16 cast) -> at most 1 bf16 ulp.
    assert torch.allclose(got.float(), expected.float(), rtol=2**-7, atol=0)
    # ... and the cast-before-multiply order is observable: multiplying in fp32 then casting differs somewhere.
    other = ((x32 / torch.sqrt((x32 * x32).mean(-1, keepdim=True) + 1e-5)) * w.float()).to(torch.bfloat16)
    assert not torch.equal(got, other)


def test_rms_norm_float64_formula() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 5, 16, dtype=F64)
    w = torch.randn(16, dtype=F64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    # fp32 internal computation: ~1e-7 relative (this op is specified as fp32 compute)
    torch.testing.assert_close(K.rms_norm(x, w, 1e-6), expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------- RoPE
def test_rope_rotate_half_by_hand() -> None:
    theta, D = 10000.0, 4
    pos = torch.tensor([0, 1, 7])
    cos, sin = K.rope_cos_sin(pos, D, theta, dtype=F64)
    assert cos.shape == (3, D)
    x = torch.tensor([0.3, -1.2, 2.0, 0.5], dtype=F64).expand(1, 3, 2, D).clone()  # [B=1, T=3, H=2, D]
    out = K.apply_rope(x, cos, sin)
    x0, x1, x2, x3 = 0.3, -1.2, 2.0, 0.5
    for t, p in enumerate([0, 1, 7]):
        a0, a1 = p * 1.0, p * theta ** (-2 / 4)  # frequencies theta^(-2i/D), i = 0, 1
        hand = [
            x0 * math.cos(a0) - x2 * math.sin(a0),
            x1 * math.cos(a1) - x3 * math.sin(a1),
            x2 * math.cos(a0) + x0 * math.sin(a0),
            x3 * math.cos(a1) + x1 * math.sin(a1),
        ]
        for h in range(2):
            # angles are computed in fp32 (as in HF/Mistral), so ~1e-6 absolute
            torch.testing.assert_close(out[0, t, h], torch.tensor(hand, dtype=F64), rtol=0, atol=2e-6)


def test_rope_batched_positions_and_relative_property() -> None:
    torch.manual_seed(2)
    D = 8
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    cos, sin = K.rope_cos_sin(pos, D, 500.0, dtype=F64)
    assert cos.shape == (2, 3, D)
    q = torch.randn(1, 1, 1, D, dtype=F64).expand(2, 3, 1, D).contiguous()
    k = torch.randn(1, 1, 1, D, dtype=F64).expand(2, 3, 1, D).contiguous()
    qr, kr = K.apply_rope(q, cos, sin), K.apply_rope(k, cos, sin)
    # <R_m q, R_n k> depends on m - n only: row 0 (positions 0..2) and row 1 (5..7) give the same products.
    d0 = (qr[0, 2, 0] * kr[0, 0, 0]).sum()
    d1 = (qr[1, 2, 0] * kr[1, 0, 0]).sum()
    torch.testing.assert_close(d0, d1, rtol=0, atol=1e-5)  # fp32 angles
    # batched tables equal the per-row [T, D] tables
    c0, s0 = K.rope_cos_sin(pos[1], D, 500.0, dtype=F64)
    assert torch.equal(K.apply_rope(q[1:], c0, s0), qr[1:])


# ----------------------------------------------------------------------------------------- conv
def _conv_oracle(x: torch.Tensor, w: torch.Tensor, init: torch.Tensor | None) -> torch.Tensor:
    """Direct sum: y[t, c] = silu(sum_i w[c, i] * xpad[t + i, c]), float64."""
    B, T, C = x.shape
    Kk = w.shape[1]
    hist = torch.zeros(B, Kk - 1, C, dtype=x.dtype) if init is None else init.transpose(1, 2)
    xp = torch.cat([hist, x], dim=1)
    y = torch.zeros_like(x)
    for t in range(T):
        for i in range(Kk):
            y[:, t] += w[:, i] * xp[:, t + i]
    return F.silu(y)


@pytest.mark.parametrize("with_init", [False, True])
def test_causal_conv1d_matches_direct_sum(with_init: bool) -> None:
    torch.manual_seed(3)
    B, T, C, Kk = 2, 11, 6, 4
    x = torch.randn(B, T, C, dtype=F64)
    w = torch.randn(C, Kk, dtype=F64)
    init = torch.randn(B, C, Kk - 1, dtype=F64) if with_init else None
    y, fs = K.causal_conv1d(x, w, initial_state=init)
    torch.testing.assert_close(y, _conv_oracle(x, w, init), rtol=0, atol=TOL64)
    assert torch.equal(fs, x[:, -(Kk - 1) :].transpose(1, 2))
    assert y.is_contiguous()
    # checkpoint layout [C, 1, K] is accepted too
    y2, _ = K.causal_conv1d(x, w[:, None, :], initial_state=init)
    assert torch.equal(y, y2)


def test_causal_conv1d_prefill_then_steps_equals_full() -> None:
    torch.manual_seed(4)
    B, T, C, Kk, t0 = 2, 9, 5, 4, 2  # t0 < K-1: the prefill state mixes zeros and inputs
    x = torch.randn(B, T, C, dtype=F64)
    w = torch.randn(C, Kk, dtype=F64)
    y_full, s_full = K.causal_conv1d(x, w)
    y_pre, state = K.causal_conv1d(x[:, :t0], w)
    assert torch.equal(state[:, :, : Kk - 1 - t0], torch.zeros(B, C, Kk - 1 - t0, dtype=F64))
    ptr = state.data_ptr()
    ys = [y_pre]
    for t in range(t0, T):
        ys.append(K.causal_conv1d_update(x[:, t], state, w)[:, None])
    assert state.data_ptr() == ptr  # updated in place
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=0, atol=TOL64)
    torch.testing.assert_close(state, s_full, rtol=0, atol=0)
    # two prefill segments chained through initial_state equal one pass
    y_a, s_a = K.causal_conv1d(x[:, :5], w, activation=None)
    y_b, s_b = K.causal_conv1d(x[:, 5:], w, initial_state=s_a, activation=None)
    y_n, s_n = K.causal_conv1d(x, w, activation=None)
    torch.testing.assert_close(torch.cat([y_a, y_b], 1), y_n, rtol=0, atol=TOL64)
    assert torch.equal(s_b, s_n)


# ----------------------------------------------------------------------------------------- attention
def _attention_oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None):
    """Per-(b, i, h) loop over the allowed keys, float64, numerically-stable softmax written by hand."""
    B, T, H, _ = q.shape
    G = H // k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for i in range(T):
            lo = 0 if window is None else max(0, i - window + 1)
            for h in range(H):
                s = torch.stack([(q[b, i, h] * k[b, j, h // G]).sum() * scale for j in range(lo, i + 1)])
                p = torch.exp(s - s.max())
                p = p / p.sum()
                out[b, i, h] = sum(p[n] * v[b, lo + n, h // G] for n in range(len(p)))
    return out


def _qkv(B: int, T: int, H: int, Hkv: int, D: int, seed: int):
    torch.manual_seed(seed)
    return (
        torch.randn(B, T, H, D, dtype=F64),
        torch.randn(B, T, Hkv, D, dtype=F64),
        torch.randn(B, T, Hkv, D, dtype=F64),
    )


@pytest.mark.parametrize("window", [None, 1, 4])
def test_attention_reference_matches_loop_oracle(window: int | None) -> None:
    q, k, v = _qkv(2, 9, 4, 2, 8, seed=5)
    scale = 8**-0.5
    expected = _attention_oracle(q, k, v, scale, window)
    torch.testing.assert_close(K.attention(q, k, v, scale=scale, window=window), expected, rtol=0, atol=TOL64)
    # torch SDPA path (GQA, causal / dense window mask) on CPU agrees as well
    got = K.attention(q, k, v, scale=scale, window=window, backend="sdpa")
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL64)


def test_window_at_least_T_is_full_causal() -> None:
    q, k, v = _qkv(1, 6, 2, 1, 4, seed=6)
    full = K.attention(q, k, v, scale=0.5)
    assert torch.equal(K.attention(q, k, v, scale=0.5, window=6), full)
    assert torch.equal(K.attention(q, k, v, scale=0.5, window=100), full)
    assert not torch.allclose(K.attention(q, k, v, scale=0.5, window=5), full)


def test_swa_mask_covers_exactly_w_keys() -> None:
    T, W = 13, 4
    m = K.causal_window_mask(T, window=W)
    counts = m.sum(-1)
    assert counts.tolist() == [min(i + 1, W) for i in range(T)]
    for i in range(T):
        assert m[i].nonzero().flatten().tolist() == list(range(max(0, i - W + 1), i + 1))
    # lower-right alignment for a suffix of queries (chunked prefill / decode rows)
    suffix = K.causal_window_mask(3, T, W)
    assert torch.equal(suffix, m[-3:])


@given(T=st.integers(1, 40), W=st.integers(1, 45))
def test_swa_mask_count_property(T: int, W: int) -> None:
    m = K.causal_window_mask(T, window=W)
    i = torch.arange(T)
    assert torch.equal(m.sum(-1), torch.clamp(i + 1, max=W))
    assert not m.triu(1).any()  # never a future key


def test_prefill_then_decode_full_cache_equals_full_attention() -> None:
    B, T, H, Hkv, D, t0, S = 2, 10, 4, 2, 8, 4, 16
    q, k, v = _qkv(B, T, H, Hkv, D, seed=7)
    scale = D**-0.5
    full = K.attention(q, k, v, scale=scale)
    pre = K.attention(q[:, :t0], k[:, :t0], v[:, :t0], scale=scale)
    torch.testing.assert_close(pre, full[:, :t0], rtol=0, atol=TOL64)
    kc = torch.zeros(B, S, Hkv, D, dtype=F64)
    vc = torch.zeros(B, S, Hkv, D, dtype=F64)
    kc[:, :t0], vc[:, :t0] = k[:, :t0], v[:, :t0]
    kc[:, t0:] = 1e3  # garbage in unfilled slots must be masked out
    for t in range(t0, T):
        kc[:, t], vc[:, t] = k[:, t], v[:, t]
        valid = (torch.arange(S) <= t)[None].expand(B, S)
        o = K.attention_decode(q[:, t : t + 1], kc, vc, valid, scale=scale)
        torch.testing.assert_close(o, full[:, t : t + 1], rtol=0, atol=TOL64)
        for backend in ("sdpa", "sdpa_grouped"):
            o_sdpa = K.attention_decode(q[:, t : t + 1], kc, vc, valid, scale=scale, backend=backend)
            torch.testing.assert_close(o_sdpa, full[:, t : t + 1], rtol=0, atol=TOL64)


def test_decode_ragged_valid_per_batch_row() -> None:
    B, S, H, Hkv, D = 3, 7, 4, 2, 8
    q, k, v = _qkv(B, S, H, Hkv, D, seed=8)
    lens = [7, 3, 1]
    valid = torch.arange(S)[None] < torch.tensor(lens)[:, None]
    o = K.attention_decode(q[:, -1:], k, v, valid, scale=0.3)
    for b, n in enumerate(lens):
        ref = _attention_oracle(
            torch.cat([torch.zeros(1, n - 1, H, D, dtype=F64), q[b : b + 1, -1:]], 1),
            k[b : b + 1, :n],
            v[b : b + 1, :n],
            0.3,
            None,
        )[:, -1:]
        torch.testing.assert_close(o[b : b + 1], ref, rtol=0, atol=TOL64)


def test_decode_additive_bias_equals_boolean_mask() -> None:
    """``bias=decode_bias(valid)`` (one conversion per step) gives SDPA's result with the boolean mask, and the
    backends that do not take it ignore it."""
    B, S, H, Hkv, D = 3, 9, 4, 2, 8
    q, k, v = _qkv(B, S, H, Hkv, D, seed=9)
    valid = torch.arange(S)[None] < torch.tensor([9, 4, 1])[:, None]
    valid[0, 2] = False  # a hole, as in the ring buffer
    bias = K.decode_bias(valid, q.dtype)
    assert bias.shape == (B, 1, 1, S) and bias.dtype == q.dtype
    assert torch.equal(bias[:, 0, 0] == 0, valid) and torch.isinf(bias[~valid[:, None, None, :]]).all()
    for backend in ("sdpa", "sdpa_grouped", "reference"):
        with_bias = K.attention_decode(q[:, -1:], k, v, valid, scale=0.3, backend=backend, bias=bias)
        without = K.attention_decode(q[:, -1:], k, v, valid, scale=0.3, backend=backend)
        torch.testing.assert_close(with_bias, without, rtol=0, atol=TOL64)


def test_swa_ring_buffer_decode_equals_windowed_attention() -> None:
    B, T, H, Hkv, D, W, t0 = 2, 15, 4, 2, 8, 4, 6
    q, k, v = _qkv(B, T, H, Hkv, D, seed=9)
    scale = D**-0.5
    full = K.attention(q, k, v, scale=scale, window=W)
    kc = torch.full((B, W, Hkv, D), 7.0, dtype=F64)  # garbage before filling
    vc = torch.full((B, W, Hkv, D), -7.0, dtype=F64)
    filled = torch.zeros(B, W, dtype=torch.bool)
    for t in range(t0):  # prefill writes the ring buffer slot t % W
        kc[:, t % W], vc[:, t % W] = k[:, t], v[:, t]
        filled[:, t % W] = True
    for t in range(t0, T):
        kc[:, t % W], vc[:, t % W] = k[:, t], v[:, t]
        filled[:, t % W] = True
        o = K.attention_decode(q[:, t : t + 1], kc, vc, filled, scale=scale)
        torch.testing.assert_close(o, full[:, t : t + 1], rtol=0, atol=TOL64)
    # and early positions with a partly filled ring (t < W)
    kc2 = torch.zeros(B, W, Hkv, D, dtype=F64)
    vc2 = torch.zeros(B, W, Hkv, D, dtype=F64)
    filled2 = torch.zeros(B, W, dtype=torch.bool)
    for t in range(W):
        kc2[:, t], vc2[:, t] = k[:, t], v[:, t]
        filled2[:, t] = True
        o = K.attention_decode(q[:, t : t + 1], kc2, vc2, filled2, scale=scale)
        torch.testing.assert_close(o, full[:, t : t + 1], rtol=0, atol=TOL64)


def test_attention_bf16_reference_dtype() -> None:
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(1, 5, 2, 1, 8, seed=10))
    o = K.attention(q, k, v, scale=0.35, window=2)
    assert o.dtype == torch.bfloat16 and o.shape == (1, 5, 2, 8)


# ----------------------------------------------------------------------------------------- backends
def test_backend_resolution_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert KB.resolve_linear_backend("auto", cpu) == "chunk"
    assert KB.resolve_step_backend("auto", cpu) == "torch"
    assert KB.resolve_attention_backend("auto", cpu, windowed=True) == "reference"
    assert KB.resolve_decode_backend("auto", cpu) == "reference"
    with pytest.raises(ValueError):
        KB.resolve_linear_backend("fla", cpu)
    with pytest.raises(ValueError):
        KB.resolve_attention_backend("flex", cpu, windowed=True)
    with pytest.raises(ValueError):
        KB.resolve_linear_backend("bogus", cpu)


def test_cpu_paths_never_import_fla() -> None:
    had = "fla" in sys.modules
    q = torch.randn(1, 3, 1, 4)
    K.gated_delta_rule(q, q, torch.randn(1, 3, 2, 4), -torch.rand(1, 3, 2), torch.rand(1, 3, 2))
    K.kda(q, q, torch.randn(1, 3, 1, 4), -torch.rand(1, 3, 1, 4), torch.rand(1, 3, 1))
    assert ("fla" in sys.modules) == had


def test_pdl_launch_keywords(monkeypatch: pytest.MonkeyPatch) -> None:
    """Programmatic dependent launch: only for CUDA devices that support it, never in Triton's interpreter (which
    has no grid dependency control), off with ``backend.PDL = False``; the trigger mode travels as the constexpr."""
    cuda = torch.device("cuda", 0)
    assert KB.pdl_launch(torch.device("cpu")) == {}
    monkeypatch.setattr(KB, "_pdl_capable", lambda index: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(KB, "PDL", True)
    monkeypatch.setattr(KB, "PDL_TRIGGER", "exit")
    assert KB.pdl_launch(cuda) == {"PDL": 1, "launch_pdl": True}
    monkeypatch.setattr(KB, "PDL_TRIGGER", "enter")
    assert KB.pdl_launch(cuda) == {"PDL": 2, "launch_pdl": True}
    monkeypatch.setattr(KB, "PDL_TRIGGER", "late")
    assert KB.pdl_launch(cuda) == {"PDL": 3, "launch_pdl": True}
    monkeypatch.setattr(KB, "PDL_TRIGGER", "early")
    with pytest.raises(ValueError, match="PDL_TRIGGER = 'early'"):
        KB.pdl_launch(cuda)
    monkeypatch.setattr(KB, "PDL_TRIGGER", "exit")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert KB.pdl_launch(cuda) == {}
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(KB, "PDL", False)
    assert KB.pdl_launch(cuda) == {}
    monkeypatch.setattr(KB, "PDL", True)
    monkeypatch.setattr(KB, "_pdl_capable", lambda index: False)  # pre-Hopper GPU or a Triton without it
    assert KB.pdl_launch(cuda) == {}

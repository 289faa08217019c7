"""CPU tests of the gated delta rule (GDN) and KDA kernels: naive vs chunk vs an independent dense oracle,
prefill-then-decode consistency, grouped value heads, gates.

Tolerances (stated where used):
* float64, same math in a different association (chunked WY/UT form vs recurrence vs Householder oracle): 1e-10
  (observed ~1e-15; the triangular solve of a well-conditioned unit-lower system adds no visible error).
* float32 chunked vs recurrent: 1e-5 absolute/relative - reassociation over a 64-token chunk of O(1) terms gives a
  few 1e-7 per op, a few 1e-6 after T ~ 100 steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from placement_search import kernels as K

F64 = torch.float64
TOL64 = 1e-10
TOL32 = 1e-5


def _inputs(
    B: int,
    T: int,
    HK: int,
    HV: int,
    DK: int,
    DV: int,
    *,
    per_channel: bool,
    dtype=F64,
    seed: int = 0,
    decay_scale: float = 1.0,
):
    torch.manual_seed(seed)
    q = torch.randn(B, T, HK, DK, dtype=dtype)
    k = torch.randn(B, T, HK, DK, dtype=dtype)
    v = torch.randn(B, T, HV, DV, dtype=dtype)
    gshape = (B, T, HV, DK) if per_channel else (B, T, HV)
    g = -decay_scale * F.softplus(torch.randn(gshape, dtype=dtype))
    beta = torch.randn(B, T, HV, dtype=dtype).sigmoid()
    h0 = torch.randn(B, HV, DK, DV, dtype=dtype)
    return q, k, v, g, beta, h0


def dense_oracle(q, k, v, g, beta, h0, *, scale, l2=True):
    """Independent formulation: per (b, h), plain float64 matrices, Householder-style update

        S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (scale q_t),

    with D_t = exp(g_t) I (GDN) or diag(exp(g_t)) (KDA); key head of value head h is h // (HV // HK).
    """
    q, k, v, g, beta = (t.double() for t in (q, k, v, g, beta))
    B, T, HK, DK = k.shape
    HV, DV = v.shape[2], v.shape[3]
    G = HV // HK
    out = torch.zeros(B, T, HV, DV, dtype=F64)
    final = torch.zeros(B, HV, DK, DV, dtype=F64)
    eye = torch.eye(DK, dtype=F64)
    for b in range(B):
        for h in range(HV):
            S = torch.zeros(DK, DV, dtype=F64) if h0 is None else h0[b, h].double().clone()
            for t in range(T):
                qt, kt = q[b, t, h // G], k[b, t, h // G]
                if l2:
                    qt = qt / torch.sqrt(qt @ qt + 1e-6)
                    kt = kt / torch.sqrt(kt @ kt + 1e-6)
                gt = g[b, t, h]
                Dm = torch.diag(torch.exp(gt)) if gt.dim() == 1 else torch.exp(gt) * eye
                S = (eye - beta[b, t, h] * torch.outer(kt, kt)) @ Dm @ S + beta[b, t, h] * torch.outer(
                    kt, v[b, t, h]
                )
                out[b, t, h] = S.T @ (scale * qt)
            final[b, h] = S
    return out, final


# ------------------------------------------------------------------------------------------ GDN
@pytest.mark.parametrize(("HK", "HV"), [(2, 4), (3, 3)])
@pytest.mark.parametrize("with_h0", [True, False])
def test_gdn_naive_chunk_oracle_agree_float64(HK: int, HV: int, with_h0: bool) -> None:
    B, T, DK, DV = 2, 100, 8, 6  # T not a multiple of the chunk size 64
    q, k, v, g, beta, h0 = _inputs(B, T, HK, HV, DK, DV, per_channel=False, seed=HK + HV)
    h0 = h0 if with_h0 else None
    scale = DK**-0.5
    ref_o, ref_s = dense_oracle(q, k, v, g, beta, h0, scale=scale)
    for backend in ("naive", "chunk"):
        o, s = K.gated_delta_rule(
            q, k, v, g, beta, initial_state=h0, output_final_state=True, backend=backend
        )
        assert o.shape == (B, T, HV, DV) and s.shape == (B, HV, DK, DV)
        torch.testing.assert_close(o, ref_o, rtol=0, atol=TOL64)
        torch.testing.assert_close(s, ref_s, rtol=0, atol=TOL64)
    o, s = K.gated_delta_rule(q, k, v, g, beta, initial_state=h0, backend="chunk")
    assert s is None


def test_gdn_chunk_vs_naive_float32_and_small_chunk() -> None:
    q, k, v, g, beta, h0 = _inputs(2, 130, 2, 4, 16, 16, per_channel=False, dtype=torch.float32, seed=11)
    h0 = h0.float()
    o_n, s_n = K.gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="naive"
    )
    o_c, s_c = K.gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="chunk"
    )
    assert s_c.dtype == torch.float32
    torch.testing.assert_close(o_c, o_n, rtol=TOL32, atol=TOL32)  # fp32 reassociation, see module docstring
    torch.testing.assert_close(s_c, s_n, rtol=TOL32, atol=TOL32)
    # a different chunk size is the same function
    o_16, _ = K.chunk_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        scale=16**-0.5,
        initial_state=h0,
        output_final_state=False,
        use_qk_l2norm=True,
        chunk_size=16,
    )
    torch.testing.assert_close(o_16, o_n, rtol=TOL32, atol=TOL32)


def test_gdn_without_l2norm_and_custom_scale() -> None:
    q, k, v, g, beta, h0 = _inputs(1, 70, 1, 2, 4, 4, per_channel=False, seed=12)
    k = F.normalize(k, dim=-1) * 0.9  # keep the un-normalised recurrence contractive
    ref_o, ref_s = dense_oracle(q, k, v, g, beta, h0, scale=0.7, l2=False)
    for backend in ("naive", "chunk"):
        o, s = K.gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            scale=0.7,
            initial_state=h0,
            output_final_state=True,
            use_qk_l2norm=False,
            backend=backend,
        )
        torch.testing.assert_close(o, ref_o, rtol=0, atol=TOL64)
        torch.testing.assert_close(s, ref_s, rtol=0, atol=TOL64)
    # default scale is DK ** -0.5
    a, _ = K.gated_delta_rule(q, k, v, g, beta, backend="chunk")
    b, _ = K.gated_delta_rule(q, k, v, g, beta, scale=4**-0.5, backend="chunk")
    assert torch.equal(a, b)


@pytest.mark.parametrize("step_backend", ["naive", "chunk"])
def test_gdn_prefill_then_steps_equals_full(step_backend: str) -> None:
    B, T, HK, HV, DK, DV, t0 = 2, 80, 2, 4, 8, 8, 67
    q, k, v, g, beta, h0 = _inputs(B, T, HK, HV, DK, DV, per_channel=False, seed=13)
    o_full, s_full = K.gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_pre, state = K.gated_delta_rule(
        q[:, :t0], k[:, :t0], v[:, :t0], g[:, :t0], beta[:, :t0], initial_state=h0, output_final_state=True
    )
    ptr = state.data_ptr()
    outs = [o_pre]
    for t in range(t0, T):
        o = K.gated_delta_rule_step(
            q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, backend=step_backend
        )
        assert o.shape == (B, HV, DV)
        outs.append(o[:, None])
    assert state.data_ptr() == ptr  # in place
    torch.testing.assert_close(torch.cat(outs, 1), o_full, rtol=0, atol=TOL64)
    torch.testing.assert_close(state, s_full, rtol=0, atol=TOL64)
    # two prefill segments chained through the state equal one pass
    o_a, s_a = K.gated_delta_rule(
        q[:, :30], k[:, :30], v[:, :30], g[:, :30], beta[:, :30], initial_state=h0, output_final_state=True
    )
    o_b, s_b = K.gated_delta_rule(
        q[:, 30:], k[:, 30:], v[:, 30:], g[:, 30:], beta[:, 30:], initial_state=s_a, output_final_state=True
    )
    torch.testing.assert_close(torch.cat([o_a, o_b], 1), o_full, rtol=0, atol=TOL64)
    torch.testing.assert_close(s_b, s_full, rtol=0, atol=TOL64)


def test_gdn_single_token_prefill_and_bf16_io() -> None:
    q, k, v, g, beta, h0 = _inputs(2, 1, 1, 2, 8, 8, per_channel=False, dtype=torch.float32, seed=14)
    o, s = K.gated_delta_rule(q, k, v, g, beta, initial_state=h0.float(), output_final_state=True)
    st = h0.float().clone()
    o1 = K.gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], st)
    torch.testing.assert_close(o[:, 0], o1, rtol=TOL32, atol=TOL32)
    torch.testing.assert_close(s, st, rtol=TOL32, atol=TOL32)
    qb, kb, vb, bb = (t.to(torch.bfloat16) for t in (q, k, v, beta))
    ob, sb = K.gated_delta_rule(qb, kb, vb, g, bb, output_final_state=True)
    assert ob.dtype == torch.bfloat16 and sb.dtype == torch.float32


def test_gdn_gate_formula() -> None:
    torch.manual_seed(15)
    a = torch.randn(3, 5, 4).to(torch.bfloat16)
    A_log, dt_bias = torch.randn(4), torch.randn(4)
    g = K.gdn_gate(a, A_log, dt_bias)
    assert g.dtype == torch.float32 and g.shape == (3, 5, 4)
    expected = -torch.exp(A_log) * torch.log1p(torch.exp(a.float() + dt_bias))
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-6)
    assert (g <= 0).all()


# ------------------------------------------------------------------------------------------ KDA
@pytest.mark.parametrize("with_h0", [True, False])
def test_kda_naive_chunk_oracle_agree_float64(with_h0: bool) -> None:
    B, T, H, DK, DV = 2, 100, 2, 8, 6
    q, k, v, g, beta, h0 = _inputs(B, T, H, H, DK, DV, per_channel=True, seed=16)
    h0 = h0 if with_h0 else None
    ref_o, ref_s = dense_oracle(q, k, v, g, beta, h0, scale=DK**-0.5)
    for backend in ("naive", "chunk"):
        o, s = K.kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend=backend)
        assert o.shape == (B, T, H, DV) and s.shape == (B, H, DK, DV)
        torch.testing.assert_close(o, ref_o, rtol=0, atol=TOL64)
        torch.testing.assert_close(s, ref_s, rtol=0, atol=TOL64)


def test_kda_chunk_stable_under_strong_decay() -> None:
    # g ~ -20 per step: cumulative decays reach -1300 inside a chunk; a factorised exp(G_i) exp(-G_j) would
    # overflow, the pairwise-difference form must stay finite and exact.
    q, k, v, g, beta, h0 = _inputs(1, 70, 2, 2, 8, 8, per_channel=True, seed=17, decay_scale=20.0)
    o_n, s_n = K.kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="naive")
    o_c, s_c = K.kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="chunk")
    assert torch.isfinite(o_c).all() and torch.isfinite(s_c).all()
    torch.testing.assert_close(o_c, o_n, rtol=0, atol=TOL64)
    torch.testing.assert_close(s_c, s_n, rtol=0, atol=TOL64)


def test_kda_chunk_vs_naive_float32() -> None:
    q, k, v, g, beta, h0 = _inputs(2, 100, 2, 2, 16, 16, per_channel=True, dtype=torch.float32, seed=18)
    o_n, s_n = K.kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="naive")
    o_c, s_c = K.kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="chunk")
    torch.testing.assert_close(o_c, o_n, rtol=TOL32, atol=TOL32)  # fp32 reassociation
    torch.testing.assert_close(s_c, s_n, rtol=TOL32, atol=TOL32)


def test_kda_prefill_then_steps_equals_full() -> None:
    B, T, H, DK, DV, t0 = 2, 75, 2, 8, 4, 66
    q, k, v, g, beta, h0 = _inputs(B, T, H, H, DK, DV, per_channel=True, seed=19)
    o_full, s_full = K.kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_pre, state = K.kda(
        q[:, :t0], k[:, :t0], v[:, :t0], g[:, :t0], beta[:, :t0], initial_state=h0, output_final_state=True
    )
    outs = [o_pre]
    for t in range(t0, T):
        outs.append(K.kda_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), o_full, rtol=0, atol=TOL64)
    torch.testing.assert_close(state, s_full, rtol=0, atol=TOL64)


def test_kda_with_uniform_channel_decay_equals_gdn() -> None:
    # diag(exp(g) * 1) == exp(g) I: KDA with a channel-constant decay is GDN with HV == HK.
    q, k, v, g, beta, h0 = _inputs(1, 40, 2, 2, 8, 8, per_channel=False, seed=20)
    o_g, s_g = K.gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_k, s_k = K.kda(
        q, k, v, g[..., None].expand(-1, -1, -1, 8), beta, initial_state=h0, output_final_state=True
    )
    torch.testing.assert_close(o_k, o_g, rtol=0, atol=TOL64)
    torch.testing.assert_close(s_k, s_g, rtol=0, atol=TOL64)


def test_gdn_as_kda_grouped_heads_values_and_gradients() -> None:
    # the "fla_kda" GDN path feeds KDA these inputs: outputs, final state and the gradients of q, k, g (summed back
    # over the repeated heads and the broadcast channels) must equal GDN's own, GQA grouping included (float64).
    q, k, v, g, beta, h0 = _inputs(2, 37, 2, 4, 8, 8, per_channel=False, seed=21)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, g, beta)]
    o_g, s_g = K.gated_delta_rule(*leaves, initial_state=h0, output_final_state=True)
    grads_g = torch.autograd.grad((o_g.square().sum() + s_g.sum()), leaves)
    leaves2 = [t.clone().requires_grad_(True) for t in (q, k, v, g, beta)]
    qk, kk, gk = K.gdn_as_kda(leaves2[0], leaves2[1], leaves2[3])
    assert qk.shape == (2, 37, 4, 8) and gk.shape == (2, 37, 4, 8)
    o_k, s_k = K.kda(qk, kk, leaves2[2], gk, leaves2[4], initial_state=h0, output_final_state=True)
    grads_k = torch.autograd.grad((o_k.square().sum() + s_k.sum()), leaves2)
    torch.testing.assert_close(o_k, o_g, rtol=0, atol=TOL64)
    torch.testing.assert_close(s_k, s_g, rtol=0, atol=TOL64)
    for a, b in zip(grads_k, grads_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="fla_kda"):
        K.gated_delta_rule(q, k, v, g, beta, backend="fla_kda")  # CPU tensors: fla's kernels need CUDA


def test_kda_gate_formula_and_shape() -> None:
    torch.manual_seed(21)
    H, DK = 3, 4
    f = torch.randn(2, 5, H * DK)
    A_log, dt_bias = torch.randn(H), torch.randn(H * DK)
    g = K.kda_gate(f, A_log, dt_bias, H)
    assert g.shape == (2, 5, H, DK) and g.dtype == torch.float32
    for h in range(H):
        for c in range(DK):
            x = f[..., h * DK + c] + dt_bias[h * DK + c]
            torch.testing.assert_close(g[..., h, c], -torch.exp(A_log[h]) * torch.log1p(torch.exp(x)))

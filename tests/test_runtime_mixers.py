"""Mixer modules against the math of apriel2.md §4, spelled out token by token (no kernels used here).

This checks the wiring the kernels cannot: projection layouts ([Q|K|V|Z], [b|a]), which tensors go through
the convolutions, grouped value heads, RoPE positions, the window, and norm-then-gate at the output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from placement_search.evaluators.mixers import GDN, KDA, Attention
from placement_search.spec import ModelSpec

D = 64
T = 11
# float64 throughout; the modules' decays are fp32 by spec (an fp32 ulp of the gate is ~6e-8 relative).
ATOL = 1e-6


@pytest.fixture(scope="module")
def spec(runtime_make_config) -> ModelSpec:
    return ModelSpec.from_config(runtime_make_config(biases=True), name="tiny")


def _x() -> torch.Tensor:
    return torch.randn(2, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def _module(cls, spec, seed: int = 0):
    m = cls(D, spec).double()
    m.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-trivial norm weights and biases, so that their use is checked too
        for name, p in m.named_parameters():
            if name.endswith("bias") or name == "norm.weight":
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    return m


def _conv_silu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B, T, C], w [C, 1, K]: y[t] = silu(sum_i w[:, i] * x[t - K + 1 + i]) with zeros before t = 0."""
    k = w.shape[-1]
    xp = F.pad(x, (0, 0, k - 1, 0))
    return F.silu(sum(w[:, 0, i] * xp[:, i : i + x.shape[1]] for i in range(k)))


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _delta_rule(q, k, v, decay, beta):
    """q, k [B, T, H, DK], v [B, T, H, DV], decay [B, T, H, 1 or DK] (multiplies S's rows), beta [B, T, H]."""
    q = F.normalize(q, dim=-1, eps=0) * q.shape[-1] ** -0.5
    k = F.normalize(k, dim=-1, eps=0)
    b, t, h, dk = k.shape
    S = torch.zeros(b, h, dk, v.shape[-1], dtype=v.dtype)
    out = []
    for i in range(t):
        S = decay[:, i, :, :, None] * S
        delta = beta[:, i, :, None] * (v[:, i] - torch.einsum("bhkv,bhk->bhv", S, k[:, i]))
        S = S + k[:, i, :, :, None] * delta[:, :, None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, i]))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("mixer", ["attention", "sliding_window"])
def test_attention_matches_definition(spec: ModelSpec, mixer: str):
    s = spec.mixer(0, mixer)
    m, x = _module(Attention, s), _x()
    h, hkv, dh = s.heads, s.head_groups, s.head_size
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(2, T, h, dh)
    k = F.linear(x, m.k_proj.weight, m.k_proj.bias).view(2, T, hkv, dh)
    v = F.linear(x, m.v_proj.weight, m.v_proj.bias).view(2, T, hkv, dh)
    inv = s.rope_theta ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]

    def rope(t):
        return t * cos + torch.cat([-t[..., dh // 2 :], t[..., : dh // 2]], -1) * sin

    q, k = rope(q), rope(k).repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    allowed = (j <= i) & ((j > i - s.window_size) if s.window_size else True)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * dh**-0.5
    o = torch.einsum("bhij,bjhd->bihd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
    expected = F.linear(o.reshape(2, T, -1), m.o_proj.weight, m.o_proj.bias)
    # RoPE tables are computed in fp32 (as in HF), hence fp32-level agreement only.
    torch.testing.assert_close(m(x, torch.arange(T)), expected, atol=ATOL, rtol=0)


def test_gdn_matches_definition(spec: ModelSpec):
    s = spec.mixer(0, "gdn")
    m, x = _module(GDN, s), _x()
    kd, vd, hv, hk = s.key_dim, s.value_dim, s.value_heads, s.key_heads
    Q, K, V, Z = (x @ m.in_proj_qkvz.weight.T).split([kd, kd, vd, vd], dim=-1)
    b, a = (x @ m.in_proj_ba.weight.T).split([hv, hv], dim=-1)
    q, k, v = _conv_silu(torch.cat([Q, K, V], -1), m.convolution.weight).split([kd, kd, vd], dim=-1)
    q = q.reshape(2, T, hk, -1).repeat_interleave(hv // hk, dim=2)
    k = k.reshape(2, T, hk, -1).repeat_interleave(hv // hk, dim=2)
    g = -m.A_log.exp() * F.softplus(a + m.dt_bias)
    o = _delta_rule(q, k, v.reshape(2, T, hv, -1), g.exp()[..., None], b.sigmoid())
    o = _rms(o, m.norm.weight, s.norm_eps) * F.silu(Z.reshape(2, T, hv, -1))
    expected = o.reshape(2, T, -1) @ m.out_proj.weight.T
    torch.testing.assert_close(m(x, torch.arange(T)), expected, atol=ATOL, rtol=0)


def test_kda_matches_definition(spec: ModelSpec):
    s = spec.mixer(0, "kda")
    m, x = _module(KDA, s), _x()
    h = s.heads

    def heads(t):
        return t.reshape(2, T, h, -1)

    q = heads(_conv_silu(x @ m.q_proj.weight.T, m.q_conv.weight))
    k = heads(_conv_silu(x @ m.k_proj.weight.T, m.k_conv.weight))
    v = heads(_conv_silu(x @ m.v_proj.weight.T, m.v_conv.weight))
    f = x @ m.f_a_proj.weight.T @ m.f_b_proj.weight.T
    g = -m.A_log.exp()[:, None] * F.softplus(heads(f + m.dt_bias))
    beta = (x @ m.beta_proj.weight.T).sigmoid()
    o = _delta_rule(q, k, v, g.exp(), beta)
    gate = heads(x @ m.g_a_proj.weight.T @ m.g_b_proj.weight.T)
    expected = (_rms(o, m.norm.weight, s.norm_eps) * F.silu(gate)).reshape(2, T, -1) @ m.o_proj.weight.T
    torch.testing.assert_close(m(x, torch.arange(T)), expected, atol=ATOL, rtol=0)


def test_input_projection_prefetch_choice(runtime_make_config, monkeypatch: pytest.MonkeyPatch):
    """What a decode step's input projection asks L2 for (``mixers._l2_prefetch``): the recurrent state up to
    ``STATE_L2_PREFETCH_MIB``, else the first ``OUTPUT_WEIGHT_L2_PREFETCH_MIB`` of the output projection's weight,
    else nothing; and the GDN, KDA and attention decode steps hand it to their packed input projection (no
    biases: a projection with biases is not packed)."""
    from placement_search import kernels as K
    from placement_search.evaluators import mixers as M
    from placement_search.evaluators.cache import layer_cache

    state, weight = torch.zeros(1, 4, 16, 16), torch.zeros(64, 256, dtype=torch.bfloat16)  # 16 KiB, 32 KiB
    monkeypatch.setattr(M, "STATE_L2_PREFETCH_MIB", 1)
    monkeypatch.setattr(M, "OUTPUT_WEIGHT_L2_PREFETCH_MIB", 0)
    assert M._l2_prefetch(weight, state) is state
    assert M._l2_prefetch(weight, torch.zeros(5, 64, 64, 64)) is None  # 5 MiB: too large
    assert M._l2_prefetch(weight) is None
    monkeypatch.setattr(M, "OUTPUT_WEIGHT_L2_PREFETCH_MIB", 1)
    whole = M._l2_prefetch(weight)  # 1 MiB asked, the whole 32 KiB weight given
    assert whole.data_ptr() == weight.data_ptr() and whole.numel() == weight.numel()
    monkeypatch.setattr(M, "STATE_L2_PREFETCH_MIB", 0)
    assert M._l2_prefetch(weight, state).numel() == weight.numel()  # the state not wanted: the weight instead

    seen: list[torch.Tensor | None] = []
    linear = K.linear

    def spy(x, weight, *args, l2_prefetch=None, **kw):
        seen.append(l2_prefetch)
        return linear(x, weight, *args, **kw)

    monkeypatch.setattr(M, "STATE_L2_PREFETCH_MIB", 1)
    monkeypatch.setattr(M, "OUTPUT_WEIGHT_L2_PREFETCH_MIB", 0)
    monkeypatch.setattr(K, "linear", spy)
    monkeypatch.setattr(K, "linear_uses_triton", lambda x, ws, backend="auto": True)  # the packed (Triton) path
    monkeypatch.setattr(K, "SKINNY_MIN_WEIGHT", 0)
    spec = ModelSpec.from_config(runtime_make_config(), name="tiny")
    x = torch.randn(2, 1, D, dtype=torch.float64)
    pos = torch.tensor([3, 3])
    for cls, name in ((GDN, "gdn"), (KDA, "kda")):
        mixer_spec = spec.mixer(0, name)
        m, c = _module(cls, mixer_spec), layer_cache(mixer_spec, 2, 8, device="cpu", dtype=torch.float64)
        seen.clear()
        with torch.no_grad():
            m.step(x, pos, c)
        assert seen[0] is c.state, name  # the input projection first, with the state
    monkeypatch.setattr(M, "FUSED_ROPE_PROJECTION", False)  # the fused q/k/v + RoPE launch takes no prefetch
    att_spec = spec.mixer(0, "attention")
    m = _module(Attention, att_spec)
    c = layer_cache(att_spec, 2, 8, device="cpu", dtype=torch.float64)
    monkeypatch.setattr(M, "OUTPUT_WEIGHT_L2_PREFETCH_MIB", 1)
    seen.clear()
    with torch.no_grad():
        m.step(x, pos, c)
    assert seen[0].data_ptr() == m.o_proj.weight.data_ptr()

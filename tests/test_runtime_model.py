"""Supernet runtime: prefill + decode equals a full forward, placement switching, caches, generation."""

from __future__ import annotations

import pytest
import torch

from placement_search.errors import PlacementError
from placement_search.evaluators import CacheError, Supernet, random_supernet
from placement_search.spec import ModelSpec, get_spec

# Tolerance of decode-vs-forward in float64. Attention and KDA agree to ~1e-15. GDN's gate is fp32 by
# spec (gdn_gate casts to float32): a one-token matmul rounds differently from the T-token one in the
# last float64 bit, and the fp32 cast of the gate turns that into an fp32-ulp (~6e-8 relative) difference
# in the decay, which the recurrent state carries on. 1e-6 absolute on logits of magnitude ~0.5 leaves
# room for that and still catches any real cache bug (those are >1e-2).
ATOL = 1e-6

T = 12  # longer than the SWA window (5) and than the conv kernel (4)


@pytest.fixture(scope="module")
def spec(runtime_make_config) -> ModelSpec:
    return ModelSpec.from_config(runtime_make_config(), name="tiny")


@pytest.fixture(scope="module")
def model(spec: ModelSpec) -> Supernet:
    return random_supernet(spec, seed=1, dtype=torch.float64)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("placement", "prefix"),
    [("AAAAA", 3), ("SSSSS", 2), ("SSSSS", 7), ("GGGGG", 2), ("KKKKK", 6), ("AGSKS", 1), ("KSGAG", 8)],
)
def test_prefill_then_decode_equals_full_forward(
    model: Supernet, ids: torch.Tensor, placement: str, prefix: int
):
    model.set_placement(placement)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, T)
        logits = [model.prefill(ids[:, :prefix], cache)]
        logits += [model.decode_step(ids[:, t], cache)[:, None] for t in range(prefix, T)]
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=ATOL, rtol=0)
    assert cache.length == T
    assert cache.pos.tolist() == [T, T]


def test_decode_updates_cache_in_place(model: Supernet, ids: torch.Tensor):
    """A step writes into the preallocated buffers (what CUDA-graph capture needs)."""
    model.set_placement("ASGKA")
    cache = model.new_cache(2, T)
    buffers = [t for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    ptrs = [(t.data_ptr(), t.shape) for t in [*buffers, cache.pos]]
    with torch.no_grad():
        model.prefill(ids[:, :4], cache)
        before = [t.clone() for t in buffers]
        model.decode_step(ids[:, 4:5], cache)
    assert [(t.data_ptr(), t.shape) for t in [*buffers, cache.pos]] == ptrs
    assert any(not torch.equal(a, b) for a, b in zip(before, buffers, strict=True))
    assert cache.layers[1].k.shape[1] == 5  # SWA ring of W slots
    assert cache.layers[0].k.shape[1] == T  # full attention: max_len slots


def test_multi_token_continuation_and_hidden_states(model: Supernet, ids: torch.Tensor):
    model.set_placement("GKSAS")
    with torch.no_grad():
        full, hidden = model(ids, return_hidden_states=True)
        cache = model.new_cache(2, T)
        first = model(ids[:, :5], cache=cache)
        rest, rest_hidden = model(ids[:, 5:], cache=cache, return_hidden_states=True)
    assert len(hidden) == model.spec.num_layers + 1
    torch.testing.assert_close(model.lm_head(model.model.norm(hidden[-1])), full, atol=0, rtol=0)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=ATOL, rtol=0)
    torch.testing.assert_close(rest_hidden[-1], hidden[-1][:, 5:], atol=ATOL, rtol=0)


def test_set_placement_switches_without_reload(model: Supernet, ids: torch.Tensor):
    with torch.no_grad():
        model.set_placement("AAAAA")
        a = model(ids)
        assert model.set_placement("attention,gdn*2,kda,sliding_window") == (
            "attention", "gdn", "gdn", "kda", "sliding_window",
        )  # fmt: skip
        mixed = model(ids)
        model.set_placement(["attention"] * 5)
        again = model(ids)
    assert torch.equal(a, again)
    assert not torch.allclose(a, mixed)


def test_thin_model_refuses_unloaded_mixer(spec: ModelSpec):
    thin = random_supernet(spec, ["AGGGG", "SGGGG"], dtype=torch.float64)
    assert thin.built[0] == ("attention", "sliding_window") and thin.built[1] == ("gdn",)
    thin.set_placement("SGGGG")
    with pytest.raises(PlacementError, match=r"layer 1: mixer 'kda' was not loaded"):
        thin.set_placement("SKGGG")
    assert thin.placement == ("sliding_window", "gdn", "gdn", "gdn", "gdn")  # unchanged after the error


def test_cache_misuse_is_reported(model: Supernet, ids: torch.Tensor):
    model.set_placement("AAAAA")
    cache = model.new_cache(2, 6)
    with torch.no_grad():
        with pytest.raises(CacheError, match="6"):
            model.prefill(ids[:, :7], cache)
        model.prefill(ids[:, :6], cache)
        with pytest.raises(CacheError, match="max_len 6"):
            model.decode_step(ids[:, 6], cache)
        with pytest.raises(CacheError, match="empty cache"):
            model.prefill(ids[:, :2], cache)
        model.set_placement("GGGGG")
        with pytest.raises(CacheError, match="another placement"):
            model.decode_step(ids[:, 6], cache)
        cache.reset()
        assert cache.length == 0 and int(cache.pos.sum()) == 0


def test_generate_greedy_is_argmax_of_stepwise_logits(model: Supernet, ids: torch.Tensor):
    model.set_placement("SKGAS")
    prompt = ids[:, :5]
    out = model.generate(prompt, 7)
    assert out.shape == (2, 12) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, model.generate(prompt, 7))
    with torch.no_grad():
        seq = prompt
        for _ in range(7):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_generate_sampling_is_seeded(model: Supernet, ids: torch.Tensor):
    model.set_placement("KKGGS")
    prompt = ids[:, :4]
    a = model.generate(prompt, 6, temperature=1.0, top_k=10, top_p=0.9, seed=3)
    b = model.generate(prompt, 6, temperature=1.0, top_k=10, top_p=0.9, seed=3)
    assert torch.equal(a, b)
    one = model.generate(prompt, 6, temperature=0.7, top_k=1, seed=5)  # top_k=1 is greedy
    assert torch.equal(one, model.generate(prompt, 6))
    eos = int(one[0, 4])
    stopped = model.generate(prompt, 6, eos_token_id=eos)
    assert (stopped[0, 4:] == eos).all()


def test_random_init_is_seeded(spec: ModelSpec):
    a, b, c = (random_supernet(spec, seed=s) for s in (7, 7, 8))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.decoder.blocks.0.mixer.mixers.gdn.in_proj_qkvz.weight"],
                           sc["model.decoder.blocks.0.mixer.mixers.gdn.in_proj_qkvz.weight"])  # fmt: skip
    assert (sa["model.decoder.blocks.2.mixer.mixers.kda.A_log"].exp() >= 1).all()


def test_real_size_supernet_builds_on_meta_with_spec_parameter_count():
    """The 15B layout materialises without memory on the meta device; its size matches the spec's count."""
    spec = get_spec("super-apriel-15b")
    model = Supernet(spec, device="meta", dtype=torch.bfloat16, seed=None)
    assert sum(p.numel() for p in model.parameters()) == spec.supernet_params()
    names = dict(model.named_parameters())
    assert tuple(names["model.decoder.blocks.47.mixer.mixers.gdn.convolution.weight"].shape) == (6144, 1, 4)
    assert tuple(names["model.decoder.blocks.0.mixer.mixers.kda.dt_bias"].shape) == (4096,)
    thin = Supernet(spec, [("gdn",)] * 48, device="meta", seed=None)
    assert sum(p.numel() for p in thin.parameters()) == spec.placement_params(["gdn"] * 48)

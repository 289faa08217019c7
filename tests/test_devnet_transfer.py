"""devnet: supernet initialisation from the teacher, freezing, resumable optimiser state."""

from __future__ import annotations

from pathlib import Path

import torch

from placement_search.devnet.config import model_spec, tiny_settings
from placement_search.devnet.distill import distill_loss, sample_placement
from placement_search.devnet.loop import make_optimizer
from placement_search.devnet.state import Progress, load_state, save_state
from placement_search.devnet.teacher import build_teacher
from placement_search.devnet.transfer import init_from_teacher, is_shared
from placement_search.evaluators import Supernet

SIZE = tiny_settings().size  # attention 2 heads / 1 KV head of 16; gdn 1 key head, 2 value heads; kda 2 x 16


def _pair():
    spec = model_spec(SIZE)
    teacher = build_teacher(spec, 0, torch.device("cpu"))
    student = Supernet(spec, seed=5)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    report = init_from_teacher(student, teacher)
    return spec, teacher, student, before, report


def test_init_copies_intended_slices():
    spec, teacher, student, before, report = _pair()
    d = 16
    for i, (sb, tb) in enumerate(zip(student.blocks, teacher.blocks, strict=True)):
        a = tb.mixer.mixers["attention"]
        for name in ("attention", "sliding_window"):
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                assert torch.equal(getattr(sb.mixer.mixers[name], p).weight, getattr(a, p).weight)
        g = sb.mixer.mixers["gdn"]
        w = g.in_proj_qkvz.weight  # [Q (1x16) | K (1x16) | V (2x16) | Z (2x16)]
        assert torch.equal(w[0:16], a.q_proj.weight[0:16])  # Q head 0 <- q head 0
        assert torch.equal(w[16:32], a.k_proj.weight[0:16])  # K head 0 <- kv head 0
        assert torch.equal(w[32:48], a.v_proj.weight[0:16])  # V heads 0, 1 <- kv head 0
        assert torch.equal(w[48:64], a.v_proj.weight[0:16])
        prefix = f"model.decoder.blocks.{i}.mixer.mixers.gdn."
        assert torch.equal(w[64:96], before[prefix + "in_proj_qkvz.weight"][64:96])  # Z kept random
        assert torch.equal(g.out_proj.weight, a.o_proj.weight)  # value head h <- query head h (H == Hv)
        assert torch.equal(g.in_proj_ba.weight, before[prefix + "in_proj_ba.weight"])
        conv = g.convolution.weight
        assert (conv[:, 0, -1] == 1).all() and (conv[:, 0, :-1] == 0).all()
        k = sb.mixer.mixers["kda"]
        assert torch.equal(k.q_proj.weight, a.q_proj.weight)
        assert torch.equal(k.k_proj.weight[0:16], a.k_proj.weight) and torch.equal(k.k_proj.weight[16:32], a.k_proj.weight)
        assert torch.equal(k.v_proj.weight[16:32], a.v_proj.weight)
        assert torch.equal(k.o_proj.weight, a.o_proj.weight)
        assert (k.q_conv.weight[:, 0, -1] == 1).all() and (k.v_conv.weight[:, 0, :-1] == 0).all()
        assert len(report["layers"][i]["gdn"]) == 2 + 2 * 2 and len(report["layers"][i]["kda"]) == 4 * 2
    t = dict(teacher.named_parameters())
    for name, p in student.named_parameters():
        if is_shared(name):
            assert torch.equal(p, t[name]), name
    # all-attention student == teacher
    x = torch.randint(0, SIZE.vocab_size, (2, 24))
    student.set_placement(["attention"] * spec.num_layers)
    with torch.no_grad():
        assert torch.allclose(student(x), teacher(x), atol=1e-5)
    assert d == SIZE.attention_head_size


def test_distill_steps_freeze_shared_and_state_roundtrip(tmp_path: Path):
    spec, teacher, student, _, _ = _pair()
    settings = tiny_settings().distill
    opt = make_optimizer(student, settings, lambda n: not is_shared(n))
    shared = {n: p.detach().clone() for n, p in student.named_parameters() if is_shared(n)}
    mixers = {n: p.detach().clone() for n, p in student.named_parameters() if not is_shared(n)}
    x = torch.randint(0, SIZE.vocab_size, (2, 24))
    for step in range(2):
        student.set_placement(sample_placement(spec, 1, step, 0))
        with torch.no_grad():
            t_logits, t_hidden = teacher(x, return_hidden_states=True)
        s_logits, s_hidden = student(x, return_hidden_states=True)
        loss, metrics = distill_loss(s_logits, t_logits, s_hidden, t_hidden, 0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert metrics["kl"] >= 0 and metrics["hidden_mse"] >= 0
    for n, p in student.named_parameters():
        if is_shared(n):
            assert not p.requires_grad and torch.equal(p, shared[n]), n
    assert any(not torch.equal(p, mixers[n]) for n, p in student.named_parameters() if not is_shared(n))
    save_state(tmp_path / "s", student, opt, Progress(step=2, total_steps=10, elapsed_s=1.5))
    model, opt2, progress = load_state(tmp_path / "s", lambda m: make_optimizer(m, settings, lambda n: not is_shared(n)),
                                       device="cpu")  # fmt: skip
    assert progress.step == 2 and progress.total_steps == 10
    for (n, p), (n2, p2) in zip(student.named_parameters(), model.named_parameters(), strict=True):
        assert n == n2 and torch.equal(p, p2)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"] and s1["state"].keys() == s2["state"].keys()
    for i, st in s1["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][i][key])), (i, key)

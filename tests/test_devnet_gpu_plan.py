"""devnet: kernel-path fallbacks, the GPU plan's budgets and return sizes, the registry hook."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from placement_search.devnet.config import full_settings, register_devnet_spec
from placement_search.devnet.dryrun import gpu_plan, snapshot_priority
from placement_search.devnet.preflight import PATHS, apply_backends, path_key
from placement_search.spec import get_spec

# the modules (``placement_search.kernels`` re-exports functions of the same names)
att_mod = importlib.import_module("placement_search.kernels.attention")
dr_mod = importlib.import_module("placement_search.kernels.delta_rule")
kda_mod = importlib.import_module("placement_search.kernels.kda")

CUDA = torch.device("cuda")  # only passed to the resolvers, which do not touch the device


def test_fallbacks_rebind_and_restore():
    try:
        apply_backends({"attention": "flex", "sliding_window": "sdpa", "gdn": "chunk", "kda": "chunk"})
        assert att_mod.resolve_attention_backend("auto", CUDA, windowed=False) == "flex"
        assert att_mod.resolve_attention_backend("auto", CUDA, windowed=True) == "sdpa"
        assert dr_mod.resolve_linear_backend("auto", CUDA) == "chunk"
        assert kda_mod.resolve_linear_backend("auto", CUDA) == "chunk"
        cpu = torch.device("cpu")  # the CPU keeps its own paths
        assert att_mod.resolve_attention_backend("auto", cpu, windowed=True) == "reference"
        assert dr_mod.resolve_linear_backend("auto", cpu) == "chunk"
    finally:
        apply_backends(None)
    assert att_mod.resolve_attention_backend("auto", CUDA, windowed=True) == "flex"
    assert att_mod.resolve_attention_backend("auto", CUDA, windowed=False) == "sdpa"
    spec = get_spec("super-apriel-15b")
    assert {path_key(spec.mixer(0, n)) for n in spec.mixer_names} <= set(PATHS)


def test_plan_fits_the_issue_and_device_limits():
    settings = full_settings()
    estimate = json.loads(Path("results/devnet/gpu-estimate.json").read_text())
    plan = gpu_plan(settings, estimate)
    assert plan["total_minutes"] <= 15
    assert all(c["minutes"] < 9 for c in plan["calls"].values())
    assert all(c["returns_mib"] <= 64 for c in plan["calls"].values())
    assert plan["calls"]["call2"]["snapshots_kept_on_gpu"] >= 4
    assert plan["shipped_mb"]["supernet"] <= 40 and plan["shipped_mb"]["total_checkpoints"] <= 120
    assert settings.teacher.minutes == plan["calls"]["call1"]["teacher_minutes"]
    assert settings.distill.minutes == plan["calls"]["call2"]["distill_minutes"]
    # the shipped settings.json is what the GPU run will check against
    assert json.loads(Path("results/devnet/settings.json").read_text()) == json.loads(json.dumps(settings.to_dict()))
    assert snapshot_priority([10, 20, 30, 40]) == [10, 40, 20, 30]


def test_register_devnet_spec(tmp_path):
    from placement_search.devnet.config import apriel2_config, tiny_settings

    assert not register_devnet_spec(tmp_path / "absent", name="devnet-test-absent")
    (tmp_path / "config.json").write_text(json.dumps(apriel2_config(tiny_settings().size)))
    assert register_devnet_spec(tmp_path, name="devnet-test")
    assert get_spec("devnet-test").num_layers == 4

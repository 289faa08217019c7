"""Resumable training state without pickle: weights, optimiser, step, RNG, schedule, and the JSONL log.

A state directory holds
- ``model/``: the weights in the Apriel2 format (:func:`placement_search.evaluators.save_checkpoint`, fp32);
- ``optimizer.safetensors``: every tensor of ``optimizer.state_dict()["state"]`` as ``state.{i}.{name}``;
- ``rng.safetensors``: torch's CPU (and CUDA) generator states as uint8 tensors;
- ``state.json``: step, total steps, elapsed seconds, the optimiser's param groups and non-tensor state.

It is written beside the target and renamed into place, so a crash leaves the previous state intact.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from placement_search.evaluators import Supernet, load_supernet, save_checkpoint
from placement_search.files import atomic_directory

STATE_JSON = "state.json"


@dataclass
class Progress:
    """Where a stage stands: ``step`` optimiser steps done out of ``total_steps`` (``None``: not calibrated)."""

    step: int = 0
    total_steps: int | None = None
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def lr_at(step: int, total: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` to ``lr * min_ratio`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def save_state(path: str | os.PathLike[str], model: Supernet, optimizer: torch.optim.Optimizer, progress: Progress) -> None:
    """Write the state directory ``path`` atomically (see the module docstring)."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_checkpoint(model, tmp / "model")
        sd = optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for idx, st in sd["state"].items():
            for name, value in st.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"state.{idx}.{name}"] = value.detach().to("cpu").contiguous()
                else:
                    scalars.setdefault(str(idx), {})[name] = value
        save_file(tensors, tmp / "optimizer.safetensors")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        save_file(rng, tmp / "rng.safetensors")
        data = {
            "step": progress.step,
            "total_steps": progress.total_steps,
            "elapsed_s": progress.elapsed_s,
            "extra": progress.extra,
            "param_groups": sd["param_groups"],
            "scalar_state": scalars,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / STATE_JSON).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def has_state(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / STATE_JSON).is_file()


def load_state(
    path: str | os.PathLike[str], optimizer_factory: Any, *, device: torch.device | str
) -> tuple[Supernet, torch.optim.Optimizer, Progress]:
    """Weights, optimiser (built by ``optimizer_factory(model)``, then its state restored) and progress."""
    path = Path(path)
    model = load_supernet(path / "model", device=device, dtype=torch.float32)
    model.train()
    optimizer = optimizer_factory(model)
    data = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
    tensors = load_file(path / "optimizer.safetensors", device=str(device))
    state: dict[int, dict[str, Any]] = {}
    on_device = any(g.get("fused") or g.get("capturable") for g in data["param_groups"])
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        # Adam keeps its 'step' counters on the CPU unless fused or capturable
        state.setdefault(int(idx), {})[name] = value.cpu() if name == "step" and not on_device else value
    for idx, scalars in data["scalar_state"].items():
        state.setdefault(int(idx), {}).update(scalars)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in data["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    progress = Progress(data["step"], data["total_steps"], data["elapsed_s"], data.get("extra", {}))
    return model, optimizer, progress


class JsonlLog:
    """Append-only JSON-lines log; on resume, records after the resumed step are dropped first."""

    def __init__(self, path: str | os.PathLike[str], resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.read() if line.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

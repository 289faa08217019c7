"""GPU preflight: forward + backward of every mixer path under bf16 autocast against the fp32 CPU reference.

The training run takes code paths no GPU check has exercised yet: the backward passes of SDPA (cuDNN first)
for full attention, of compiled FlexAttention for the sliding window, and of fla's chunked GDN / KDA kernels
(with grouped value heads), all under bf16 autocast. :func:`run_preflight` builds one mixer of each kind at
the dev supernet's sizes, runs it on ``[B, T, d]`` random inputs on the CPU in fp32 (the pure-PyTorch kernels)
and on the GPU in bf16 autocast, and compares the output, the input gradient and the parameter gradients
(relative error ``||a - b|| / ||b||``). A path that raises or misses the tolerance is retried with its
fallback (full attention -> FlexAttention; sliding window -> SDPA with a dense mask; GDN / KDA -> the
pure-PyTorch chunked form), and the first path that passes is used for the whole run (:func:`apply_backends`,
recorded in ``preflight.json`` so later calls reuse the choice without re-checking).

The fallbacks are installed by rebinding the backend resolvers that :mod:`placement_search.kernels` modules
look up at call time; nothing else changes, and :func:`apply_backends` with the defaults restores them.
"""

from __future__ import annotations

import copy
import importlib
import time
from collections.abc import Callable
from typing import Any

import torch

from placement_search.devnet.loop import autocast
from placement_search.evaluators.mixers import build_mixer
from placement_search.spec import AttentionSpec, GDNSpec, KDASpec, MixerSpec, ModelSpec

#: Per mixer: the path the kernels pick by default on CUDA, then the fallbacks, in order.
PATHS: dict[str, tuple[str, ...]] = {
    "attention": ("sdpa", "flex", "reference"),
    "sliding_window": ("flex", "sdpa", "reference"),
    "gdn": ("fla", "fla_kda", "chunk"),
    "kda": ("fla", "chunk"),
}
TOL_OUT = 5e-2  # bf16 autocast vs fp32: measured ~1e-2 on outputs; convention bugs give > 0.1
TOL_GRAD = 1e-1  # gradients go through one more bf16 rounding (and fla's recomputation)
TOL_BROKEN = 0.5  # above this no path is used at all: the run stops before training

_ORIGINAL: dict[str, Callable[..., Any]] = {}


def _module(name: str) -> Any:
    return importlib.import_module(f"placement_search.kernels.{name}")


def apply_backends(choice: dict[str, str] | None = None) -> dict[str, str]:
    """Make the kernels use ``choice`` (mixer -> path, see :data:`PATHS`) on CUDA; ``None``: the defaults."""
    choice = {**{k: v[0] for k, v in PATHS.items()}, **(choice or {})}
    att = _module("attention")
    _ORIGINAL.setdefault("attention", att.resolve_attention_backend)
    original_att = _ORIGINAL["attention"]
    if choice["attention"] == "sdpa" and choice["sliding_window"] == "flex":
        att.resolve_attention_backend = original_att
    else:

        def resolve_attention(backend: str, device: torch.device, *, windowed: bool) -> str:
            if backend != "auto" or device.type != "cuda":
                return original_att(backend, device, windowed=windowed)
            return choice["sliding_window" if windowed else "attention"]

        att.resolve_attention_backend = resolve_attention
    for mixer, module in (("gdn", "delta_rule"), ("kda", "kda")):
        mod = _module(module)
        _ORIGINAL.setdefault(module, mod.resolve_linear_backend)
        original = _ORIGINAL[module]
        if choice[mixer] == "fla":
            mod.resolve_linear_backend = original
        else:
            forced = choice[mixer]

            def resolve_linear(backend: str, device: torch.device, _o: Any = original, _f: str = forced) -> str:
                if backend != "auto" or device.type != "cuda":
                    return _o(backend, device)
                return _f

            mod.resolve_linear_backend = resolve_linear
    return choice


def path_key(mspec: MixerSpec) -> str:
    """The :data:`PATHS` key of a mixer spec."""
    if isinstance(mspec, AttentionSpec):
        return "sliding_window" if mspec.window_size else "attention"
    if isinstance(mspec, GDNSpec):
        return "gdn"
    if isinstance(mspec, KDASpec):
        return "kda"
    raise TypeError(f"no kernel paths known for {type(mspec).__name__}")


def _rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return float("inf") if (a is None) != (b is None) else 0.0
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    denom = float(b.norm())
    return float((a - b).norm()) / denom if denom > 0 else float((a - b).norm())


def _run(module: torch.nn.Module, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    positions = torch.arange(x.shape[1], device=x.device)
    with autocast(x.device):
        out = module(x, positions)
    (out.float() * w).sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    return out.detach(), {"x": x.grad, **grads}


def check_mixer(
    spec: ModelSpec, name: str, device: torch.device, *, batch: int = 2, seq_len: int = 256, seed: int = 0
) -> dict[str, Any]:
    """Errors of mixer ``name`` (layer 0's spec) on ``device`` (bf16 autocast) vs the CPU in fp32."""
    mspec = spec.mixer(0, name)
    g = torch.Generator().manual_seed(seed)
    ref = build_mixer(spec.hidden_size, mspec)
    ref.reset_parameters(g)
    x = torch.randn(batch, seq_len, spec.hidden_size, generator=g)
    w = torch.randn(batch, seq_len, spec.hidden_size, generator=g)
    out_ref, grads_ref = _run(ref, x, w)
    gpu = copy.deepcopy(ref).to(device)
    t0 = time.perf_counter()
    out, grads = _run(gpu, x.to(device), w.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    grad_errors = {k: _rel(grads.get(k), v) for k, v in grads_ref.items()}
    worst = max(grad_errors, key=lambda k: grad_errors[k])
    result = {
        "out_rel_err": _rel(out, out_ref),
        "grad_x_rel_err": grad_errors["x"],
        "grad_max_rel_err": grad_errors[worst],
        "grad_worst": worst,
        "first_call_s": seconds,
    }
    result["passes"] = bool(result["out_rel_err"] <= TOL_OUT and result["grad_max_rel_err"] <= TOL_GRAD)
    return result


def run_preflight(spec: ModelSpec, device: torch.device, *, seq_len: int = 256) -> dict[str, Any]:
    """Check every mixer path on ``device``, falling back where needed; applies and returns the choice."""
    report: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "seq_len": seq_len,
                              "tolerances": {"out": TOL_OUT, "grad": TOL_GRAD}, "mixers": {}}  # fmt: skip
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    choice: dict[str, str] = {}
    for name in spec.mixer_names:
        key = path_key(spec.mixer(0, name))
        tries = []
        for path in PATHS[key]:
            apply_backends({**choice, key: path})
            try:
                r = check_mixer(spec, name, device, seq_len=seq_len)
            except Exception as e:  # a path that fails on this machine: record it, try the next one
                r = {"passes": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
            tries.append({"path": path, **r})
            if r["passes"]:
                choice[key] = path
                break
        else:
            # nothing within tolerance: bf16 noise on an unlucky draw, or a real bug. Take the closest path
            # that ran unless even that one is clearly wrong (a convention bug gives errors of order 1).
            ran = [t for t in tries if "error" not in t]
            best = min(ran, key=lambda t: t["grad_max_rel_err"] + t["out_rel_err"], default=None)
            if best is None or best["grad_max_rel_err"] > TOL_BROKEN or best["out_rel_err"] > TOL_BROKEN:
                raise RuntimeError(f"preflight: every path of mixer {name!r} failed: {tries}")
            choice[key] = best["path"]
            report.setdefault("warnings", []).append(
                f"{name}: no path within tolerance; using {best['path']} (errors {best['out_rel_err']:.3g} out, "
                f"{best['grad_max_rel_err']:.3g} grad)"
            )
        report["mixers"][name] = {"path": choice[key], "tries": tries}
    report["backends"] = apply_backends(choice)
    report["fallbacks_used"] = sorted(k for k, v in report["backends"].items() if v != PATHS[k][0])
    return report

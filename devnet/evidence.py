"""Evidence that placements of the dev supernet differ meaningfully (``evidence.json`` + ``evidence.md``).

Placements evaluated (each on two disjoint held-out sample sets, A and B, of stdlib blocks and synthetic
retrieval blocks):

- the teacher, and every uniform placement ``all-X``;
- random placements (each layer uniform over its mixers);
- fixed-count groups, where only the arrangement of layers differs: half ``attention`` / half
  ``sliding_window`` and half ``attention`` / half ``gdn`` (SWA/GDN in front, at the back, alternating, random
  arrangements), a quarter of each mixer (blocks, interleaved, random arrangements), and SWA-heavy placements
  (3/4 SWA) with their attention layers in front, at the back or spread.

Checks written to ``checks``:

- ``all_attention_matches_teacher``: held-out loss of all-attention within 2 % of the teacher's and
  ``KL(teacher || all-attention)`` below ``KL_SMALL`` nats/token;
- ``placements_spread``: the spread (max - min) of held-out loss and of beyond-window retrieval over the
  uniform and random placements, against the evaluation noise;
- ``swa_fails_beyond_window``: all-SWA's retrieval beyond the window is below ``SWA_BEYOND_MAX`` and below
  half of all-attention's, while within the window it answers;
- ``arrangement_matters``: per fixed-count group, the largest loss difference between two arrangements
  (pooled over A and B) against the noise of such a difference, measured by re-evaluating on the other sample
  set: ``noise_sd = sqrt(mean over pairs of (d_A - d_B)^2 / 2)`` where ``d_S`` is the pair's difference on
  set ``S``; the pooled difference has standard deviation ``noise_sd / sqrt(2)``. The group passes when its
  largest pooled difference exceeds twice that and has the same sign on A and B.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from placement_search.devnet.config import Settings
from placement_search.devnet.corpus import Corpus
from placement_search.devnet.evaluate import EvalSet, block_metrics, retrieval, summarize_retrieval
from placement_search.evaluators import Supernet
from placement_search.files import write_json_atomic, write_text_atomic
from placement_search.placement import Placement
from placement_search.spec import ModelSpec

KL_SMALL = 0.05  # nats/token
LOSS_MATCH = 0.02  # relative
SWA_BEYOND_MAX = 0.1


def _arrangements(
    n: int, parts: Sequence[tuple[str, int]], rng: np.random.Generator, randoms: int
) -> dict[str, list[str]]:
    """Named arrangements of fixed mixer counts ``parts`` over ``n`` layers: blocks, reversed, interleaved, random."""
    names = [name for name, count in parts for _ in range(count)]
    out = {
        "blocks": names,
        "blocks_reversed": [name for name, count in reversed(parts) for _ in range(count)],
    }
    period = [name for name, _ in parts]
    out["interleaved"] = [period[i % len(period)] for i in range(n)] if all(
        c == n // len(parts) for _, c in parts
    ) else _spread(n, parts)  # fmt: skip
    for r in range(randoms):
        out[f"random{r}"] = [names[i] for i in rng.permutation(n)]
    return out


def _spread(n: int, parts: Sequence[tuple[str, int]]) -> list[str]:
    """The minority mixer spread evenly among the majority (two parts)."""
    (major, _cm), (minor, cn) = sorted(parts, key=lambda p: -p[1])
    out = [major] * n
    for k in range(cn):
        out[int((k + 0.5) * n / cn)] = minor
    return out


def evidence_placements(spec: ModelSpec, settings: Settings) -> dict[str, dict[str, list[str]]]:
    """Groups of named placements (see the module docstring). Layers offering fewer mixers are not handled."""
    n = spec.num_layers
    names = spec.mixer_names
    es = settings.evidence
    rng = np.random.default_rng(es.seed)
    groups: dict[str, dict[str, list[str]]] = {"uniform": {f"all_{m}": [m] * n for m in names}}
    groups["random"] = {f"random{r}": [names[int(i)] for i in rng.integers(0, len(names), n)]
                        for r in range(es.random_placements)}  # fmt: skip
    half = n // 2
    for other in ("sliding_window", "gdn"):
        if "attention" in names and other in names:
            groups[f"half_attention_{other}"] = _arrangements(
                n, [(other, half), ("attention", n - half)], rng, es.arrangements
            )
    if n % len(names) == 0:
        groups["quarter_each"] = _arrangements(n, [(m, n // len(names)) for m in names], rng, es.arrangements)
    if "sliding_window" in names and "attention" in names and n >= 4:
        q = n // 4
        groups["swa_heavy"] = _arrangements(n, [("attention", q), ("sliding_window", n - q)], rng, es.arrangements)
    if es.groups is not None:
        groups = {k: v for k, v in groups.items() if k in es.groups}
    return groups


def _pair_noise(losses: dict[str, tuple[np.ndarray, np.ndarray]], members: Sequence[str]) -> dict[str, Any]:
    """Largest pooled loss difference within ``members`` and the noise of such differences (A vs B)."""
    sq, best = [], None
    for i, p in enumerate(members):
        for q in members[i + 1 :]:
            d_a = losses[p][0].mean() - losses[q][0].mean()
            d_b = losses[p][1].mean() - losses[q][1].mean()
            sq.append((d_a - d_b) ** 2 / 2)
            pooled = (d_a + d_b) / 2
            if best is None or abs(pooled) > abs(best[2]):
                best = (p, q, pooled, d_a, d_b)
    if best is None:
        return {}
    noise_sd = math.sqrt(float(np.mean(sq)))
    pooled_sd = noise_sd / math.sqrt(2)
    p, q, pooled, d_a, d_b = best
    a_all = np.concatenate(losses[p]) - np.concatenate(losses[q])
    return {
        "largest_pair": [p, q],
        "loss_difference": float(pooled),
        "difference_A": float(d_a),
        "difference_B": float(d_b),
        "noise_sd_single_set": noise_sd,
        "noise_sd_pooled": pooled_sd,
        "paired_block_se": float(a_all.std(ddof=1) / math.sqrt(len(a_all))) if len(a_all) > 1 else None,
        "effect_over_noise": float(abs(pooled) / pooled_sd) if pooled_sd > 0 else None,
        "passes": bool(abs(pooled) > 2 * pooled_sd and np.sign(d_a) == np.sign(d_b)),
    }


@torch.no_grad()
def run_evidence(
    settings: Settings,
    supernet: Supernet,
    teacher: Supernet,
    corpus: Corpus,
    out: Path,
    device: torch.device,
) -> dict[str, Any]:
    """Evaluate the placements, write ``out/evidence.json`` and ``out/evidence.md``, return the JSON."""
    spec = supernet.spec
    es = settings.evidence
    window = settings.size.window_size
    n_blocks = len(corpus.heldout_blocks())
    n_kv = corpus.synthetic_heldout.shape[0]
    per_set = max(1, min(es.eval_blocks, n_blocks // 2))
    kv_per_set = max(1, min(es.kv_blocks, n_kv // 2))
    sets = {
        "A": EvalSet.from_corpus(corpus, range(per_set), range(kv_per_set), device, es.batch_size),
        "B": EvalSet.from_corpus(corpus, range(per_set, 2 * per_set), range(kv_per_set, 2 * kv_per_set),
                                 device, es.batch_size),
    }
    groups = evidence_placements(spec, settings)
    rows: dict[str, dict[str, Any]] = {}
    losses: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def measure(name: str, model: Supernet, placement: list[str] | None, group: str) -> None:
        if placement is not None:
            model.set_placement(placement)
        per: dict[str, Any] = {}
        correct, distance = [], []
        for key, data in sets.items():
            m = block_metrics(model, data, None if model is teacher else teacher)
            per[key] = m
            r = retrieval(model, data)
            correct.append(r["correct"])
            distance.append(data.kv_distance)
        losses[name] = (per["A"]["loss"], per["B"]["loss"])
        both = np.concatenate([per["A"]["loss"], per["B"]["loss"]])
        row: dict[str, Any] = {
            "group": group,
            "loss": float(both.mean()),
            "loss_A": float(per["A"]["loss"].mean()),
            "loss_B": float(per["B"]["loss"].mean()),
            "loss_se": float(both.std(ddof=1) / math.sqrt(len(both))) if len(both) > 1 else None,
            "retrieval": summarize_retrieval(np.concatenate(correct), np.concatenate(distance), window,
                                             corpus.seq_len),
        }
        if "kl" in per["A"]:
            row["kl"] = float(np.concatenate([per["A"]["kl"], per["B"]["kl"]]).mean())
        if placement is not None:
            p = Placement.parse(placement, spec.search_space)
            row["code"] = p.code()
            row["counts"] = p.counts()
            row["placement"] = list(placement)
        rows[name] = row

    measure("teacher", teacher, None, "reference")
    for group, members in groups.items():
        for name, placement in members.items():
            measure(name if group in ("uniform", "random") else f"{group}:{name}", supernet, placement, group)

    teacher_loss = rows["teacher"]["loss"]
    for row in rows.values():
        row["loss_vs_teacher"] = (row["loss"] - teacher_loss) / teacher_loss
    checks: dict[str, Any] = {}
    att = rows.get("all_attention")
    if att is not None:
        checks["all_attention_matches_teacher"] = {
            "loss_relative_difference": att["loss_vs_teacher"],
            "kl": att.get("kl"),
            "passes": bool(abs(att["loss_vs_teacher"]) <= LOSS_MATCH and att.get("kl", 1e9) <= KL_SMALL),
            "thresholds": {"loss_relative": LOSS_MATCH, "kl": KL_SMALL},
        }
    spread_members = [k for k, r in rows.items() if r["group"] in ("uniform", "random")]
    if spread_members:
        loss_vals = [rows[k]["loss"] for k in spread_members]
        beyond = [rows[k]["retrieval"]["acc_beyond_window"] for k in spread_members]
        beyond = [b for b in beyond if b is not None]
        noise = _pair_noise(losses, spread_members)
        checks["placements_spread"] = {
            "loss_min": min(loss_vals),
            "loss_max": max(loss_vals),
            "loss_spread": max(loss_vals) - min(loss_vals),
            "loss_spread_relative_to_teacher": (max(loss_vals) - min(loss_vals)) / teacher_loss,
            "retrieval_beyond_window_min": min(beyond) if beyond else None,
            "retrieval_beyond_window_max": max(beyond) if beyond else None,
            "noise_sd_pooled": noise.get("noise_sd_pooled"),
            "passes": bool(noise and max(loss_vals) - min(loss_vals) > 4 * noise["noise_sd_pooled"]),
        }
    swa = rows.get("all_sliding_window")
    if swa is not None and att is not None:
        sb, sw = swa["retrieval"]["acc_beyond_window"], swa["retrieval"]["acc_within_window"]
        ab = att["retrieval"]["acc_beyond_window"]
        checks["swa_fails_beyond_window"] = {
            "swa_within_window": sw,
            "swa_beyond_window": sb,
            "attention_beyond_window": ab,
            "passes": bool(sb is not None and ab is not None and sw is not None and sb <= SWA_BEYOND_MAX
                           and sb <= 0.5 * ab and sw > sb),
        }
    arrangement = {}
    for group, members in groups.items():
        if group in ("uniform", "random"):
            continue
        arrangement[group] = _pair_noise(losses, [f"{group}:{name}" for name in members])
    checks["arrangement_matters"] = {
        "groups": arrangement,
        "passes": bool(arrangement) and all(g.get("passes", False) for g in arrangement.values()),
    }
    result = {
        "settings": {"preset": settings.preset, "evidence": settings.evidence.__dict__, "window": window,
                     "seq_len": corpus.seq_len, "blocks_per_set": per_set, "kv_blocks_per_set": kv_per_set,
                     "kv_queries": {k: len(v.kv_block) for k, v in sets.items()}},
        "checks": checks,
        "placements": rows,
    }
    write_json_atomic(out / "evidence.json", result)
    write_text_atomic(out / "evidence.md", evidence_markdown(result))
    return result


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def evidence_markdown(result: dict[str, Any]) -> str:
    """The evidence as a markdown table plus the checks."""
    lines = [
        "# Dev supernet: placements differ",
        "",
        f"Held-out stdlib blocks per sample set: {result['settings']['blocks_per_set']} (sets A, B); "
        f"synthetic retrieval queries: {result['settings']['kv_queries']}; window W = {result['settings']['window']}.",
        "",
        "| placement | group | code | loss | vs teacher | KL | retr. < W | retr. >= W |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in result["placements"].items():
        ret = r["retrieval"]
        lines.append(
            f"| {name} | {r['group']} | `{r.get('code', '-')}` | {_fmt(r['loss'])} | {_fmt(100 * r['loss_vs_teacher'], '+.1f')}% "
            f"| {_fmt(r.get('kl'))} | {_fmt(ret['acc_within_window'], '.2f')} | {_fmt(ret['acc_beyond_window'], '.2f')} |"
        )
    lines += ["", "## Checks", ""]
    for name, check in result["checks"].items():
        lines.append(f"- **{name}**: {'pass' if check.get('passes') else 'FAIL'}")
        if name == "arrangement_matters":
            for g, c in check["groups"].items():
                if c:
                    lines.append(
                        f"  - {g}: largest difference {c['loss_difference']:+.4f} ({c['largest_pair'][0]} vs "
                        f"{c['largest_pair'][1]}), noise sd {c['noise_sd_pooled']:.4f}, "
                        f"{'pass' if c['passes'] else 'FAIL'}"
                    )
        else:
            details = ", ".join(f"{k}={_fmt(v, '.4f') if isinstance(v, float) else v}" for k, v in check.items()
                                if k != "passes")  # fmt: skip
            lines.append(f"  - {details}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Ranking stability along distillation


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 0-based."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rho (Pearson correlation of average ranks); ``None`` when undefined."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else None


def kendall_tau_b(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Kendall's tau-b (ties corrected); ``None`` when undefined."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = len(x)
    if n < 2:
        return None
    i, j = np.triu_indices(n, k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    concordant_minus_discordant = float((dx * dy).sum())
    n_x, n_y = float((dx != 0).sum()), float((dy != 0).sum())
    return concordant_minus_discordant / math.sqrt(n_x * n_y) if n_x > 0 and n_y > 0 else None


@torch.no_grad()
def run_stability(
    settings: Settings,
    supernet: Supernet,
    snapshots: Sequence[Path],
    corpus: Corpus,
    out: Path,
    device: torch.device,
    evidence: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Rank the evidence placements by held-out loss at every snapshot and at the final supernet.

    Every placement of :func:`evidence_placements` is evaluated on sample set A of the evidence (the same
    held-out stdlib blocks) with the weights of each snapshot overlaid on ``supernet`` (the final one, restored
    afterwards); Spearman's rho and Kendall's tau-b of each snapshot's losses against the final's say how stable
    the ranking is along training. The evaluation-noise reference is the final's rank correlation between
    sample sets A and B (from ``evidence``, when given). Writes ``out/stability.json`` and ``.md``.
    """
    from placement_search.devnet.snapshots import overlay_snapshot, read_snapshot_meta

    spec = supernet.spec
    es = settings.evidence
    per_set = max(1, min(es.eval_blocks, len(corpus.heldout_blocks()) // 2))
    data = EvalSet.from_corpus(corpus, range(per_set), range(0), device, es.batch_size)
    placements = {(name if group in ("uniform", "random") else f"{group}:{name}"): p
                  for group, members in evidence_placements(spec, settings).items()
                  for name, p in members.items()}  # fmt: skip
    names = list(placements)

    def losses() -> list[float]:
        out_ = []
        for name in names:
            supernet.set_placement(placements[name])
            out_.append(float(block_metrics(supernet, data)["loss"].mean()))
        return out_

    final_state = {n: p.detach().to("cpu", copy=True) for n, p in supernet.named_parameters()}
    final = losses()
    rows: list[dict[str, Any]] = []
    try:
        for path in snapshots:
            meta = read_snapshot_meta(path)
            overlay_snapshot(supernet, path)
            snap = losses()
            rows.append({
                "snapshot": path.name,
                "step": meta.get("step"),
                "total_steps": meta.get("total_steps"),
                "spearman_vs_final": spearman(snap, final),
                "kendall_vs_final": kendall_tau_b(snap, final),
                "mean_loss": float(np.mean(snap)),
                "losses": dict(zip(names, snap, strict=True)),
            })  # fmt: skip
    finally:
        params = dict(supernet.named_parameters())
        for n, t in final_state.items():
            params[n].copy_(t)
    noise: dict[str, Any] = {}
    if evidence is not None:
        shared = [n for n in names if n in evidence["placements"]]
        a = [evidence["placements"][n]["loss_A"] for n in shared]
        b = [evidence["placements"][n]["loss_B"] for n in shared]
        noise = {"spearman_A_vs_B": spearman(a, b), "kendall_A_vs_B": kendall_tau_b(a, b), "placements": len(shared)}
    result = {
        "settings": {"blocks": per_set, "placements": len(names), "sample_set": "A"},
        "final": {"mean_loss": float(np.mean(final)), "losses": dict(zip(names, final, strict=True))},
        "snapshots": rows,
        "final_noise_reference": noise,
    }
    write_json_atomic(out / "stability.json", result)
    write_text_atomic(out / "stability.md", stability_markdown(result))
    return result


def stability_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# Dev supernet: ranking stability along distillation",
        "",
        f"{s['placements']} placements (the evidence's), held-out loss on sample set A ({s['blocks']} blocks), "
        "each snapshot against the final supernet.",
        "",
        "| snapshot | step | mean loss | Spearman vs final | Kendall vs final |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["snapshots"]:
        lines.append(f"| {r['snapshot']} | {r['step']}/{r['total_steps']} | {_fmt(r['mean_loss'], '.4f')} "
                     f"| {_fmt(r['spearman_vs_final'])} | {_fmt(r['kendall_vs_final'])} |")  # fmt: skip
    lines.append(f"| final | - | {_fmt(result['final']['mean_loss'], '.4f')} | 1 | 1 |")
    noise = result.get("final_noise_reference") or {}
    if noise:
        lines += ["", f"Evaluation-noise reference (final, sample set A vs B): Spearman "
                      f"{_fmt(noise.get('spearman_A_vs_B'))}, Kendall {_fmt(noise.get('kendall_A_vs_B'))}."]  # fmt: skip
    return "\n".join(lines) + "\n"

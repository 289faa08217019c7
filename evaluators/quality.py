"""Quality score of a placement: per-task scores and their retention relative to all-attention.

Per task, the *score* is the task's primary metric (``pack.json``: e.g. ``bits_per_byte,none`` for
``ps_code_bpb``, ``acc,none`` for multiple choice). Its *retention* against the reference placement (all-attention)
is ``score / reference`` when higher is better and ``reference / score`` when lower is better (bits per byte,
perplexity), so 1.0 means "as good as all-attention" and smaller is worse in both cases.

Perplexities (lm-eval's ``perplexity``, ``byte_perplexity``, ``word_perplexity``) are compared through their
logarithm, the mean negative log-likelihood they exponentiate (:data:`LOG_SCALE_METRICS`): their retention is
``log(reference) / log(score)``, a ratio of losses like the bits-per-byte one. A ratio of perplexities is exponential
in the loss difference: on the dev supernet's 64-token teacher traces, 0.1 nats per token more loss is a perplexity
ratio of e^-6.4, so every placement but the best few would retain ~0 of a perplexity task and the aggregate would
only count the other tasks.

The aggregate, :func:`aggregate_retention`, is the mean retention over the tasks that both the placement and the
reference have, skipping tasks whose reference score is zero or not finite (retention undefined). Retentions are
not clipped: a placement better than the reference on a task scores above 1 there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

LOG_SCALE_METRICS = frozenset({"perplexity", "byte_perplexity", "word_perplexity"})


def log_scale(metric: str) -> bool:
    """Whether ``metric`` (``"perplexity,none"`` or ``"perplexity"``) is compared through its logarithm."""
    return metric.split(",", 1)[0] in LOG_SCALE_METRICS


def retention(score: float, reference: float, higher_is_better: bool, *, log: bool = False) -> float | None:
    """``score / reference`` (higher is better) or ``reference / score`` (lower is better); ``None`` if undefined.

    ``log``: compare ``log(score)`` and ``log(reference)`` instead (perplexities; both must be > 1, a positive loss).
    """
    if log:
        if not (score > 1 and reference > 1):
            return None
        score, reference = math.log(score), math.log(reference)
    num, den = (score, reference) if higher_is_better else (reference, score)
    if not (math.isfinite(num) and math.isfinite(den)) or den == 0:
        return None
    return num / den


def task_retentions(
    scores: Mapping[str, float],
    reference: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
    metrics: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Per task present in ``scores``, ``reference`` and ``higher_is_better``: its retention (undefined ones left out).

    ``metrics``: ``{task: primary metric}``; tasks whose metric is a perplexity are compared on the log scale.
    """
    metrics = metrics or {}
    out: dict[str, float] = {}
    for task, value in scores.items():
        if task in reference and task in higher_is_better:
            log = log_scale(metrics.get(task, ""))
            r = retention(float(value), float(reference[task]), higher_is_better[task], log=log)
            if r is not None:
                out[task] = r
    return out


def aggregate_retention(
    scores: Mapping[str, float],
    reference: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
    metrics: Mapping[str, str] | None = None,
) -> float:
    """Mean retention over the tasks with a defined retention (NaN when there is none); ``metrics`` as in
    :func:`task_retentions`."""
    r = task_retentions(scores, reference, higher_is_better, metrics)
    return sum(r.values()) / len(r) if r else math.nan


def primary_scores(results: Mapping[str, Mapping[str, float]], metrics: Mapping[str, str]) -> dict[str, float]:
    """``{task: value}`` of each task's primary metric from ``{task: {metric: value}}`` (missing ones left out)."""
    return {t: float(results[t][m]) for t, m in metrics.items() if t in results and m in results[t]}

"""Build the ``ps_*`` lm-eval task pack from the dev corpus, its tokenizer, and (for the teacher traces) a supernet.

Tasks (all read JSONL through ``dataset_path: json`` + ``dataset_kwargs.data_files``, split ``validation``;
YAML files carry absolute data paths, because lm-eval hands ``data_files`` to ``datasets`` unchanged and that
resolves relative paths against the working directory, not the YAML):

- ``ps_code_bpb`` (``loglikelihood_rolling``; ``bits_per_byte``, lower is better): held-out stdlib files cut at line
  boundaries into documents of at most ``doc_tokens`` tokens (one window each at the training length).
- ``ps_kv_ll_<lo>_<hi>`` (``loglikelihood``; ``perplexity`` of the value, lower is better, and ``acc``: every
  value token is the argmax): the held-out synthetic key-value queries whose definition lies ``lo <= d < hi``
  tokens back (bins from :func:`placement_search.devnet.evaluate.distance_bins`: inside the sliding window, 1-2 W,
  2-4 W, beyond). Context: the block up to the query's quote; target: the value.
- ``ps_kv_mc_<lo>_<hi>`` (``multiple_choice``; ``acc``): the same queries, the value against ``choices - 1``
  distractor values defined in the same block (other blocks when the block has too few).
- ``ps_code_mc`` (``multiple_choice``; ``acc``): the next line of a held-out file after up to ``mc_context_lines``
  lines, against lines drawn from other held-out files.
- ``ps_teacher_trace`` (``loglikelihood``; ``perplexity``, lower is better, ``acc``: the placement reproduces the
  teacher's greedy continuation): continuations generated once, greedily, by the all-attention placement after
  prompts from held-out blocks (:func:`build_teacher_traces`).

Distances are in the corpus's tokens. lm-eval requests are text, and the model re-encodes them
(:class:`placement_search.evaluators.lm_eval_model.RequestEncoder`): the context is encoded whole, so a definition
line whose value starts with a contraction-like letter pair (``'s``, ``'t``, ...) may tokenize differently from the
generator's line pieces; the value itself is encoded on its own, exactly as the generator wrote it.

``pack.json`` lists the tasks with their primary metric and direction (what :mod:`placement_search.evaluators.quality`
aggregates), the counts, the settings and the SHA-256 of every data file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from placement_search.devnet.corpus import Corpus
from placement_search.devnet.evaluate import distance_bins
from placement_search.errors import PlacementSearchError
from placement_search.evaluators.supernet import Supernet
from placement_search.files import write_json_atomic

MANIFEST = "pack.json"
TAG = "placement_search"
TEACHER_TASK = "ps_teacher_trace"


@dataclass(frozen=True)
class TaskInfo:
    """One task of the pack: its primary metric (lm-eval's ``metric,filter`` key) and whether higher is better."""

    name: str
    output_type: str
    metric: str
    higher_is_better: bool
    docs: int
    data_file: str
    sha256: str


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


#: lm-eval aggregation and direction of every metric the pack uses (stated, so lm-eval does not warn).
_METRICS = {
    "bits_per_byte": ("bits_per_byte", False),
    "word_perplexity": ("weighted_perplexity", False),
    "byte_perplexity": ("weighted_perplexity", False),
    "perplexity": ("perplexity", False),
    "acc": ("mean", True),
    "acc_norm": ("mean", True),
}


def _write_task(
    out: Path, name: str, rows: Sequence[dict[str, Any]], config: dict[str, Any], metric: str, higher: bool
) -> TaskInfo:
    """Write ``<name>.jsonl`` and ``<name>.yaml`` (absolute data path); the task's :class:`TaskInfo`."""
    if not rows:
        raise PlacementSearchError(f"task {name}: no documents (the corpus is too small for it)")
    data = (out / f"{name}.jsonl").resolve()
    _write_jsonl(data, rows)
    doc = {
        "task": name,
        "tag": [TAG],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(data)}},
        "validation_split": "validation",
        **config,
        "metric_list": [
            {**m, "aggregation": _METRICS[m["metric"]][0], "higher_is_better": _METRICS[m["metric"]][1]}
            for m in config["metric_list"]
        ],
        "metadata": {"version": 1.0},
    }
    (out / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return TaskInfo(name, config["output_type"], metric, higher, len(rows), data.name, _sha256(data))


def _documents(corpus: Corpus) -> list[np.ndarray]:
    """The held-out files' token ids (without their leading EOS)."""
    offsets = [*corpus.heldout_doc_offsets.tolist(), len(corpus.heldout_tokens)]
    return [corpus.heldout_tokens[a + 1 : b].astype(np.int64) for a, b in itertools.pairwise(offsets)]


def _chunks(text: str, tokenizer: Any, max_tokens: int) -> list[str]:
    """``text`` cut at newlines into pieces of at most ``max_tokens`` tokens (a longer line stays whole)."""
    out: list[str] = []
    cur: list[str] = []
    n = 0
    for line in text.splitlines(keepends=True):
        k = len(tokenizer.encode(line, add_special_tokens=False))
        if cur and n + k > max_tokens:
            out.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += k
    if cur:
        out.append("".join(cur))
    return [c for c in out if c.strip()]


def _pick(n_total: int, count: int | None, rng: np.random.Generator) -> list[int]:
    """``count`` indices of ``range(n_total)`` in a seeded random choice, returned sorted (all when ``None``)."""
    if count is None or count >= n_total:
        return list(range(n_total))
    return sorted(rng.choice(n_total, size=count, replace=False).tolist())


def _check_part(part: tuple[int, int]) -> tuple[int, int]:
    k, n = (int(x) for x in part)
    if n < 1 or not 0 <= k < n:
        raise PlacementSearchError(f"part must be (k, n) with 0 <= k < n, got {part!r}")
    return k, n


def _bin_name(lo: int, hi: int) -> str:
    return f"{lo}_{hi}"


def build_task_pack(
    corpus: Corpus,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    window: int,
    bpb_docs: int | None = 64,
    doc_tokens: int | None = None,
    kv_queries_per_bin: int | None = 200,
    kv_blocks: int | None = None,
    kv_multiple_choice: bool = True,
    kv_choices: int = 4,
    mc_docs: int = 200,
    mc_choices: int = 4,
    mc_context_lines: int = 12,
    seed: int = 0,
    part: tuple[int, int] = (0, 1),
) -> dict[str, Any]:
    """Write the corpus tasks (bpb, key-value retrieval by distance, next-line choice) into ``out_dir``.

    ``tokenizer``: the checkpoint's tokenizer as :func:`placement_search.evaluators.load_tokenizer` returns it.
    ``window``: the sliding window (distance bins). ``kv_blocks``: draw the key-value queries from this many
    held-out synthetic blocks only (their queries share one pass per block, so fewer blocks feed fewer tokens);
    ``kv_multiple_choice=False`` leaves out the ``ps_kv_mc_*`` tasks (each query's context is a separate pass). ``doc_tokens``: bpb document size (default ``seq_len - 1``,
    so ``[eos] + doc`` is one training-length window). ``part=(k, n)``: draw only from held-out files and synthetic
    blocks whose index is ``k`` modulo ``n``, so packs built with other ``k`` hold disjoint samples (evaluation-noise
    estimates re-score placements on another part). Returns (and writes) the manifest ``pack.json``, keeping
    a teacher-trace task already built there.
    """
    k_part, n_part = _check_part(part)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    seq_len = corpus.seq_len
    doc_tokens = doc_tokens or seq_len - 1

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode([int(i) for i in ids])

    files = [decode(d) for d in _documents(corpus)]
    tasks: list[TaskInfo] = []

    # held-out code, bits per byte
    chunks = [c for f, text in enumerate(files) if f % n_part == k_part for c in _chunks(text, tokenizer, doc_tokens)]
    rows = [{"text": chunks[i]} for i in _pick(len(chunks), bpb_docs, rng)]
    tasks.append(_write_task(out, "ps_code_bpb", rows, {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
    }, "bits_per_byte,none", False))  # fmt: skip

    # key-value retrieval by distance
    blocks = corpus.synthetic_heldout.astype(np.int64)
    values = [decode(blocks[b, s : s + n]) for b, s, n in
              zip(corpus.kv_block, corpus.kv_answer_start, corpus.kv_answer_len, strict=True)]  # fmt: skip
    block_values: dict[int, list[str]] = {}
    for b, v in zip(corpus.kv_block.tolist(), values, strict=True):
        block_values.setdefault(b, []).append(v)
    all_values = sorted(set(values))
    dist = corpus.kv_distance
    eligible = corpus.kv_block % n_part == k_part
    if kv_blocks is not None:
        candidates_b = np.unique(corpus.kv_block[eligible])
        keep = candidates_b[_pick(len(candidates_b), kv_blocks, rng)]
        eligible &= np.isin(corpus.kv_block, keep)
    for lo, hi in distance_bins(window, seq_len):
        members = np.flatnonzero((dist >= lo) & (dist < hi) & eligible)
        chosen = [int(members[i]) for i in _pick(len(members), kv_queries_per_bin, rng)]
        ll_rows, mc_rows = [], []
        for q in chosen:
            b, s = int(corpus.kv_block[q]), int(corpus.kv_answer_start[q])
            context, value = decode(blocks[b, 1:s]), values[q]
            pool = sorted(set(block_values[b]) - {value})
            if len(pool) < kv_choices - 1:
                pool += [v for v in all_values if v != value and v not in pool]
            picks = rng.choice(len(pool), size=min(kv_choices - 1, len(pool)), replace=False)
            choices = [value, *(pool[i] for i in picks)]
            order = rng.permutation(len(choices)).tolist()
            meta = {"distance": int(dist[q]), "block": b}
            ll_rows.append({"context": context, "value": value, **meta})
            mc_rows.append({"context": context, "choices": [choices[i] for i in order],
                            "label": order.index(0), **meta})  # fmt: skip
        if not chosen:
            continue
        name = _bin_name(lo, hi)
        tasks.append(_write_task(out, f"ps_kv_ll_{name}", ll_rows, {
            "output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "value",
            "target_delimiter": "", "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}],
        }, "perplexity,none", False))  # fmt: skip
        if kv_multiple_choice:
            tasks.append(_write_task(out, f"ps_kv_mc_{name}", mc_rows, {
                "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
                "doc_to_target": "label", "target_delimiter": "", "metric_list": [{"metric": "acc"}],
            }, "acc,none", True))  # fmt: skip

    # next line of held-out code, multiple choice
    lines = [t.splitlines(keepends=True) for t in files]
    good = [[i for i, ln in enumerate(ls) if len(ln.strip()) >= 8 and ln.endswith("\n")] for ls in lines]
    candidates = [(f, i) for f, idx in enumerate(good) if f % n_part == k_part for i in idx if i >= 2]
    mc_rows = []
    if len(files) >= 2:
        for k in _pick(len(candidates), mc_docs, rng):
            f, i = candidates[k]
            target = lines[f][i]
            distractors: list[str] = []
            while len(distractors) < mc_choices - 1:
                g = int(rng.integers(len(files)))
                if g == f or not good[g]:
                    continue
                line = lines[g][good[g][int(rng.integers(len(good[g])))]]
                if line != target and line not in distractors:
                    distractors.append(line)
            choices = [target, *distractors]
            order = rng.permutation(len(choices)).tolist()
            mc_rows.append({"context": "".join(lines[f][max(0, i - mc_context_lines) : i]),
                            "choices": [choices[j] for j in order], "label": order.index(0)})  # fmt: skip
    tasks.append(_write_task(out, "ps_code_mc", mc_rows, {
        "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
        "doc_to_target": "label", "target_delimiter": "", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }, "acc,none", True))  # fmt: skip

    settings = {"window": window, "seq_len": seq_len, "bpb_docs": bpb_docs, "doc_tokens": doc_tokens,
                "kv_queries_per_bin": kv_queries_per_bin, "kv_blocks": kv_blocks,
                "kv_multiple_choice": kv_multiple_choice, "kv_choices": kv_choices, "mc_docs": mc_docs,
                "mc_choices": mc_choices, "mc_context_lines": mc_context_lines, "seed": seed,
                "part": [k_part, n_part]}  # fmt: skip
    return _update_manifest(out, tasks, {"corpus": settings}, keep=[TEACHER_TASK])


def _update_manifest(out: Path, tasks: list[TaskInfo], settings: dict[str, Any], keep: Sequence[str]) -> dict[str, Any]:
    """Merge ``tasks`` into ``pack.json`` (tasks named in ``keep`` survive from an earlier build)."""
    old = load_pack_manifest(out) if (out / MANIFEST).is_file() else {"tasks": [], "settings": {}}
    kept = [t for t in old["tasks"] if t["name"] in keep and t["name"] not in {x.name for x in tasks}]
    manifest = {
        "format": 1,
        "tag": TAG,
        "tasks": sorted([*kept, *(asdict(t) for t in tasks)], key=lambda t: t["name"]),
        "settings": {**old.get("settings", {}), **settings},
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def write_relocated_yamls(pack_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> list[str]:
    """Copy the pack's task YAMLs into ``dest`` with their data paths pointing at the pack's JSONL files where the
    pack lives now (a pack's YAMLs hold absolute paths, which break when the pack is moved or shipped); checks
    each data file's SHA-256 against ``pack.json``. Returns the task names."""
    pack = Path(pack_dir)
    manifest = load_pack_manifest(pack)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for task in manifest["tasks"]:
        src = pack / f"{task['name']}.yaml"
        data = (pack / task["data_file"]).resolve()
        if not src.is_file() or not data.is_file():
            raise PlacementSearchError(f"{pack}: task {task['name']} lacks {src.name if not src.is_file() else data.name}")
        if _sha256(data) != task["sha256"]:
            raise PlacementSearchError(f"{data}: SHA-256 differs from {MANIFEST} (edited or corrupt task data)")
        doc = yaml.safe_load(src.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("task") != task["name"]:
            raise PlacementSearchError(f"{src}: not the YAML of task {task['name']}")
        doc["dataset_kwargs"] = {**(doc.get("dataset_kwargs") or {}), "data_files": {"validation": str(data)}}
        (dest / src.name).write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        names.append(task["name"])
    return names


def load_pack_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``pack.json`` of a task pack directory (one-line error when it is missing or unreadable)."""
    p = Path(path) / MANIFEST
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PlacementSearchError(f"{p}: not a task pack ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
        raise PlacementSearchError(f"{p}: not a task pack (no 'tasks' list)")
    return data


@torch.no_grad()
def build_teacher_traces(
    model: Supernet,
    tokenizer: Any,
    corpus: Corpus,
    out_dir: str | os.PathLike[str],
    *,
    prompts: int = 64,
    prompt_tokens: int = 64,
    new_tokens: int = 64,
    placement: Sequence[str] | str | None = None,
    batch_size: int = 16,
    seed: int = 0,
    part: tuple[int, int] = (0, 1),
) -> TaskInfo:
    """Generate greedy continuations with ``placement`` (default: attention in every layer) and write the
    ``ps_teacher_trace`` task: context = prompt text, target = continuation text.

    Prompts are the first ``prompt_tokens`` tokens of held-out blocks chosen with ``seed`` among those whose index is
    ``k`` modulo ``n`` (``part=(k, n)``, as in :func:`build_task_pack`); each prompt is re-encoded
    from its text (``[eos] + encode(text)``), as the scoring side will encode it, before generating.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if placement is None:
        placement = ["attention" if "attention" in layer.mixers else layer.main_mixer for layer in model.spec.layers]
    previous = model.placement
    names = model.set_placement(placement)
    eos = int(tokenizer.eos_token_id)
    k_part, n_part = _check_part(part)
    held = corpus.heldout_blocks()
    allowed = [i for i in range(len(held)) if i % n_part == k_part]
    picks = [allowed[j] for j in _pick(len(allowed), prompts, np.random.default_rng(seed))]
    texts = [tokenizer.decode(held[i, 1 : 1 + prompt_tokens].tolist()) for i in picks]
    encoded = [[eos, *tokenizer.encode(t, add_special_tokens=False)] for t in texts]
    rows: list[dict[str, Any]] = [{} for _ in texts]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    try:
        for length, idx in sorted(by_len.items()):
            for s in range(0, len(idx), batch_size):
                chunk = idx[s : s + batch_size]
                x = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=model.device)
                gen = model.generate(x, new_tokens)[:, length:].tolist()
                for i, row in zip(chunk, gen, strict=True):
                    rows[i] = {"context": texts[i], "continuation": tokenizer.decode(row), "prompt_block": int(picks[i])}
    finally:
        model.set_placement(list(previous))
    rows = [r for r in rows if r["continuation"]]
    info = _write_task(out, TEACHER_TASK, rows, {
        "output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "continuation",
        "target_delimiter": "", "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}],
    }, "perplexity,none", False)  # fmt: skip
    settings = {"prompts": prompts, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                "placement": list(names), "seed": seed, "part": [k_part, n_part]}  # fmt: skip
    old = load_pack_manifest(out)["tasks"] if (out / MANIFEST).is_file() else []
    others = [TaskInfo(**t) for t in old if t["name"] != TEACHER_TASK]
    _update_manifest(out, [*others, info], {"teacher": settings}, keep=[])
    return info

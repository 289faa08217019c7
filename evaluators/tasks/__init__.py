"""The offline lm-eval task pack of placement-search (``ps_*`` tasks) and its data builder.

:func:`build_task_pack` writes JSONL data and lm-eval YAML files (absolute data paths) into a directory, from the
dev supernet's corpus (:mod:`placement_search.devnet.corpus`) and tokenizer; :func:`build_teacher_traces` adds the
teacher-trace task from a supernet. The directory is then an lm-eval ``include_path`` where it was built; campaigns load a pack from wherever it
lives (:func:`write_relocated_yamls`). See :mod:`.build`.
"""

from __future__ import annotations

from placement_search.evaluators.tasks.build import (
    MANIFEST,
    TAG,
    TaskInfo,
    build_task_pack,
    build_teacher_traces,
    load_pack_manifest,
    write_relocated_yamls,
)

__all__ = ["MANIFEST", "TAG", "TaskInfo", "build_task_pack", "build_teacher_traces", "load_pack_manifest",
           "write_relocated_yamls"]

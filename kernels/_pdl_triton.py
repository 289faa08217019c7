"""Programmatic dependent launch (PDL) inside our Triton kernels (imported lazily: needs triton).

A kernel launched with ``launch_pdl=True`` (see :func:`.backend.pdl_launch`) may start while its predecessor on the
stream is still running. It takes a ``PDL: tl.constexpr`` (0: off; 1, 2, 3: the trigger modes of
``backend.PDL_MODES``) and calls :func:`pdl_enter` in every program before it reads anything an earlier kernel
wrote, or writes anything; before that it may only read tensors no kernel ever writes (weights). "No kernel of
this step writes it" is not enough: on the H200, GDN/KDA state tiles loaded before the wait under the late trigger
gave logits 3-5e-2 off (results/decode_step_ab_late_h200.json), though the kernel that last wrote them had completed
long before (no visibility is promised before the wait). The same tiles loaded early but after the wait differ by as
much (results/decode_step_ab_es_h200.json: the compiler contracts the products differently), so that difference
may have been arithmetic rather than stale data; the rule stands, since nothing promises otherwise. Where its main
work is done it calls :func:`pdl_release` (mode 3 triggers its dependent there). With ``PDL = 0`` (the interpreter, other GPUs, ``backend.PDL = False``) the
helpers compile to nothing.

Measured on the H200 (results/decode_step_ab_h200.json): mode 1 makes the whole 15B decode step 0.2-1.0% faster;
mode 2 and any weight prefetch make it slower, so the runtime launches mode 1 without weight prefetch.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # grid dependency control: Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # never launched with PDL then (backend.pdl_launch checks the same import)
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """``PDL`` 0: nothing. Otherwise wait for the predecessor grid (its completion and its memory writes:
    ``griddepcontrol.wait``); with ``PDL == 2`` then let the next PDL kernel launch once every program of this one
    got here (``griddepcontrol.launch_dependents``: at most two grids in flight, the dependent's programs placed
    while this one runs); with ``PDL == 1`` the next one launches as this one's programs exit (its programs take the
    SM slots freed by this kernel's tail)."""
    if PDL:
        gdc_wait()
        if PDL == 2:
            gdc_launch_dependents()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """With ``PDL == 3``: let the next PDL kernel launch once every program of this one got here (called past a
    program's main work: the dependent's programs take the SMs this kernel's tail frees and wait there, so that its
    launch and prologue overlap the tail). Other modes: nothing (mode 1 triggers at exit, mode 2 in
    :func:`pdl_enter`). The dependent still waits for this kernel's completion and writes (:func:`pdl_enter`)."""
    if PDL == 3:
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """``prefetch.global.L2`` of the 128-byte line holding each address of ``ptrs`` (any shape): a hint that neither
    blocks nor returns data. It reads only L2, the device's point of coherence, so unlike a load it is safe on any
    tensor at any time (before :func:`pdl_enter` too): it only moves bytes sooner."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def prefetch_rows_l2(base, stride, rows, n_rows, k_lo, k_hi, LINES: tl.constexpr):
    """Ask L2 for the first ``LINES`` 128-byte lines of 16-bit elements ``[k_lo, k_hi)`` of each row ``rows [R]`` of
    ``base`` (row stride ``stride`` elements; :func:`prefetch_l2`). Rows past ``n_rows`` and lines past ``k_hi`` are
    clamped onto valid addresses (row ``n_rows - 1``, column ``k_lo``). Called before :func:`pdl_enter`: the weights' bytes start streaming while
    the previous kernel still runs."""
    ELEMS: tl.constexpr = 64  # 16-bit elements per 128-byte line (bf16 / fp16 weights: the decode path's dtypes)
    cols = k_lo + tl.arange(0, LINES) * ELEMS
    cols = tl.where(cols < k_hi, cols, k_lo)
    r = tl.minimum(rows, n_rows - 1).to(tl.int64)
    prefetch_l2(base + r[:, None] * stride + cols[None, :])


@triton.jit
def prefetch_share_l2(base, n, ELEMS: tl.constexpr, LINES: tl.constexpr):
    """Ask L2 for this program's share of ``base[0:n]``, a tensor a later kernel reads: ``LINES`` 128-byte lines
    (``ELEMS`` elements each), every ``P``-th line of the tensor from the program's linear id (``P``: the grid's
    programs, so that the grid covers ``P * LINES`` lines), clamped onto the last line (:func:`prefetch_l2`)."""
    total = tl.num_programs(0) * tl.num_programs(1)
    prog = tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)
    last = (n - 1) // ELEMS
    line = tl.minimum(prog + tl.arange(0, LINES) * total, last).to(tl.int64)
    prefetch_l2(base + line * ELEMS)

"""``benchmarks/kernel_resources.py``: a kernel compiled for sm_90 on this CPU machine, its registers read back, and
the programs an SM holds at a register count (the H200's limits: 65536 registers allocated per warp in units of 256,
64 warps, 32 programs, 228 KiB of shared memory)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    ("regs", "warps", "shared", "programs"),
    [
        (159, 4, 1024, 3),  # GDN state kernel, 64 value columns: 160 x 128 = 20480 registers a program
        (203, 4, 1024, 2),  # the same with the finish behind an arrival counter (session 12, not kept)
        (95, 4, 1024, 5),
        (22, 4, 1024, 16),  # 64 warps an SM
        (32, 1, 0, 32),  # 32 programs an SM
        (56, 4, 49152, 4),  # shared memory: 228 KiB / 49 KiB
    ],
)
def test_programs_per_sm(benchmark_module, regs: int, warps: int, shared: int, programs: int) -> None:
    assert benchmark_module("kernel_resources").programs_per_sm(regs, warps, shared) == programs


def test_compiles_for_sm90_and_reads_registers(benchmark_module) -> None:
    """The GDN finish kernel as the runtime launches it, compiled by this machine's Triton and ptxas (no GPU)."""
    kr = benchmark_module("kernel_resources")
    _, fn, consts, warps = next(c for c in kr.cases() if c[0] == "gdn_finish_kernel")
    r = kr.resources(fn, consts, warps)
    assert 8 <= r["registers"] <= 255 and r["stack_bytes"] >= 0 and r["num_warps"] == warps
    assert r["programs_per_sm"] == kr.programs_per_sm(r["registers"], warps, r["shared_bytes"])


def test_default_decode_kernels_fit_an_sm_without_spills(benchmark_module) -> None:
    """Every decode kernel at the runtime's default tiles (15B sizes, PDL on), compiled for sm_90 here: at least one
    program fits an SM's registers and 228 KiB of shared memory, and nothing spills to the stack. A tile change that
    would fail to launch on the H200 (too many stages for shared memory) or spill (a slower memory-bound kernel) fails
    here, on a machine without a GPU. Triton here may differ from the H200's by a version, hence no exact counts."""
    kr = benchmark_module("kernel_resources")
    for label, fn, consts, warps in kr.cases():
        r = kr.resources(fn, consts, warps)
        assert r["stack_bytes"] == 0, f"{label}: {r['stack_bytes']} bytes spilled"
        assert r["programs_per_sm"] >= 1, f"{label}: does not fit an SM ({r})"


def test_state_kernels_hold_four_programs_an_sm(benchmark_module) -> None:
    """The GDN/KDA state kernels at 64 value columns (16 rows and up) address their tile from one 64-bit base per state
    matrix: at most 128 registers a thread, four programs an SM (121 with Triton 3.9 here, 128 with the H200's 3.6;
    forming every address in 64 bits took 146-158 and three programs: results/decode_step_ab_wide_h200.json)."""
    kr = benchmark_module("kernel_resources")
    states = [c for c in kr.cases() if "_state_kernel BV=64" in c[0]]
    assert len(states) == 4  # GDN and KDA, with and without the conv launch before them
    for label, fn, consts, warps in states:
        r = kr.resources(fn, consts, warps)
        assert r["programs_per_sm"] >= 4, f"{label}: {r}"


def test_a_constexpr_without_a_value_is_refused(benchmark_module) -> None:
    """A constexpr left out of a case would compile as a runtime integer, every branch of it in one kernel (session 17
    found the finish kernels compiled so): refused, naming it."""
    kr = benchmark_module("kernel_resources")
    _, fn, consts, warps = next(c for c in kr.cases() if c[0] == "gdn_finish_kernel")
    with pytest.raises(ValueError, match="constexpr SHIFT"):
        kr.resources(fn, {k: v for k, v in consts.items() if k != "SHIFT"}, warps)

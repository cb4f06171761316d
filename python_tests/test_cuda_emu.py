"""The checks of the CUDA host emulation (csrc/cuda/emu) fire on small kernels with known
defects (csrc/cuda/emu/selftest.cpp) and stay silent on their correct twins. Runs where the
emulation is built (make test-cuda-emu)."""
from __future__ import annotations

import pytest

from beacon_ops import cuda_emu

pytestmark = pytest.mark.skipif(not cuda_emu.available(), reason="the CUDA host emulation is not built "
                                "(make test-cuda-emu)")

DEFECTS = {
    "divergent_barrier": "divergent barriers",
    "exit_before_barrier": "after 1 thread\\(s\\) of its block exited|exited while other threads",
    "exit_before_shuffle": "exited lanes|exited while lanes",
    "deadlock": "deadlock",
    "smem_race": "shared-memory race",
    "smem_in_flight": "was not retired by cp.async.wait_group",
    "smem_uninitialized": "never written",
    "global_race_blocks": "global-memory race",
    "global_race_threads": "global-memory race",
    "smem_without_opt_in": "without cudaFuncAttributeMaxDynamicSharedMemorySize",
}


@pytest.mark.parametrize("schedule", cuda_emu.SCHEDULES)
@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_check_fires(name, schedule):
    cuda_emu.set_schedule(schedule, seed=3)
    with pytest.raises(RuntimeError, match=DEFECTS[name]):
        cuda_emu.load().run_selftest(name)


@pytest.mark.parametrize("schedule", cuda_emu.SCHEDULES)
@pytest.mark.parametrize("name", ["smem_ok", "global_ok"])
def test_correct_twin_passes(name, schedule):
    cuda_emu.set_schedule(schedule, seed=3)
    before = cuda_emu.launch_count()
    cuda_emu.load().run_selftest(name)
    assert cuda_emu.launch_count() > before


def test_unknown_schedule_is_a_value_error():
    with pytest.raises(ValueError, match="schedule"):
        cuda_emu.set_schedule("sideways")

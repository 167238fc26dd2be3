"""No sampler reads a tensor's value on the host inside its loop: on a GPU each such read
(``.item()``, ``bool(t)``, ``float(t)``) waits for every queued kernel, which stalls the loop
and rules out CUDA graphs. Counted on the CPU at the dispatcher (the same Python code runs on
every device): the reads a whole run makes must not grow with its number of steps."""

from collections import Counter

import pytest
import torch
from _refs import ToyEps
from torch.utils._python_dispatch import TorchDispatchMode

from sd_samplers import SAMPLERS, NoiseSchedule, sample

SCHEDULE = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
# ops that hand a tensor's value to Python (item, bool, int, float all end in the first)
HOST_READS = {"_local_scalar_dense", "equal", "nonzero", "is_nonzero", "allclose"}
# step size chosen from the error of each step: deciding needs the error on the host
ADAPTIVE = {"dpm_adaptive"}


class HostReads(TorchDispatchMode):
    """Counts the dispatched ops that read values to the host."""

    def __init__(self):
        super().__init__()
        self.reads = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in HOST_READS:
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def _reads(name: str, steps: int) -> int:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 6, 6, generator=g)
    with HostReads() as mode:
        sample(name, ToyEps(), noise, SCHEDULE, steps, generator=g, progress=False)
    return sum(mode.reads.values())


def test_the_count_sees_a_host_read():
    with HostReads() as mode:
        bool(torch.ones(2).sum() > 1)
        torch.ones(1).item()
    assert mode.reads["_local_scalar_dense"] == 2


@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - ADAPTIVE))
def test_no_host_reads_per_step(name):
    assert _reads(name, 3) == _reads(name, 7)

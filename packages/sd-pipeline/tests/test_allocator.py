"""glibc keeps freed blocks for reuse once the pipeline has generated on the CPU."""

import platform
import subprocess
import sys

import pytest
from test_pipeline import FAST

from sd_pipeline import StableDiffusion, allocator


class FakeLibc:
    def __init__(self, refuse_above: int | None = None):
        self.calls, self.refuse_above = [], refuse_above

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return int(self.refuse_above is None or value <= self.refuse_above)


@pytest.fixture
def fake_libc(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(allocator, "_in_effect", False)
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    return libc


def test_raises_both_thresholds_once(fake_libc):
    assert allocator.keep_freed_memory() is True
    gib = 1 << 30
    assert fake_libc.calls == [(allocator.M_MMAP_THRESHOLD, gib), (allocator.M_TRIM_THRESHOLD, gib)]
    assert allocator.keep_freed_memory() is True
    assert len(fake_libc.calls) == 2  # once per process


def test_a_glibc_that_refuses_a_gib_gets_its_maximum(fake_libc):
    fake_libc.refuse_above = 32 << 20
    assert allocator.keep_freed_memory() is True
    assert fake_libc.calls[-2:] == [
        (allocator.M_MMAP_THRESHOLD, 32 << 20),
        (allocator.M_TRIM_THRESHOLD, 32 << 20),
    ]


def test_nothing_changes_without_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_in_effect", False)
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.keep_freed_memory() is False


def test_the_pipeline_sets_it_on_the_cpu_unless_told_not_to(tiny_checkpoint, fake_libc):
    pipe = StableDiffusion.from_checkpoint(tiny_checkpoint, device="cpu", native_size=32)
    pipe.keep_freed_memory = False
    pipe.txt2img("x", seed=0, output_type="latent", **FAST)
    assert fake_libc.calls == []
    pipe.keep_freed_memory = True
    pipe.txt2img("x", seed=0, output_type="latent", **FAST)
    assert len(fake_libc.calls) == 2


FAULTS = """
import resource, sys, torch
from sd_pipeline import allocator
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(16 << 20).fill_(1.0)  # 64 MiB, freed at once
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_freed_blocks_are_reused_without_page_faults():
    """The real effect, in fresh processes: a 64 MiB tensor allocated and freed ten times.
    Without the setting glibc maps and unmaps it each time (16,384 page faults each); with it
    the heap grows a few times (around small allocations made meanwhile), then reuses it."""

    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return int(run.stdout)

    plain, kept = faults("plain"), faults("keep")
    assert plain > 9 * 16_000
    assert kept < plain / 2, (kept, plain)

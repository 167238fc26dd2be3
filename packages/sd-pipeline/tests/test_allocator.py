"""glibc keeps freed blocks for reuse once the pipeline has generated on the CPU."""

import platform
import subprocess
import sys

import pytest
import torch
from test_pipeline import FAST

from sd_pipeline import StableDiffusion, allocator


class FakeLibc:
    def __init__(self, refuse_above: int | None = None):
        self.calls, self.refuse_above = [], refuse_above

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return int(self.refuse_above is None or value <= self.refuse_above)

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim", pad))
        return 1


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


def test_release_free_memory_trims_the_heap(fake_libc, monkeypatch):
    assert allocator.release_free_memory() is True
    assert fake_libc.calls == [("trim", 0)]
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.release_free_memory() is False


def test_the_steps_scratch_is_let_go_before_the_decode(tiny_checkpoint, fake_libc):
    """Between the steps and the VAE decode: the UNet's workspace emptied, the heap trimmed;
    not for latents, which are not decoded."""
    pipe = StableDiffusion.from_checkpoint(tiny_checkpoint, device="cpu", native_size=32)
    for output_type, trims in (("latent", 0), ("pil", 1)):
        fake_libc.calls.clear()
        pipe.unet.workspace.get("a", (1024,), torch.empty(0))  # as a Winograd call leaves it
        pipe.txt2img("x", seed=0, output_type=output_type, **FAST)
        assert fake_libc.calls.count(("trim", 0)) == trims
        assert bool(pipe.unet.workspace._buffers) == (trims == 0)


def test_the_pipeline_sets_it_on_the_cpu_unless_told_not_to(tiny_checkpoint, fake_libc):
    pipe = StableDiffusion.from_checkpoint(tiny_checkpoint, device="cpu", native_size=32)
    pipe.keep_freed_memory = False
    pipe.txt2img("x", seed=0, output_type="latent", **FAST)
    assert fake_libc.calls == []
    pipe.keep_freed_memory = True
    pipe.txt2img("x", seed=0, output_type="latent", **FAST)
    assert len(fake_libc.calls) == 2


HEAP = """
import ctypes, sys, torch
from sd_pipeline import allocator

names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
libc = ctypes.CDLL(None)
try:  # glibc >= 2.33; mallinfo's int fields before
    info, size = libc.mallinfo2, ctypes.c_size_t
except AttributeError:
    info, size = libc.mallinfo, ctypes.c_int
info.restype = type("MallInfo", (ctypes.Structure,), {"_fields_": [(n, size) for n in names]})
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory()
t = torch.empty(16 << 20).fill_(1.0)  # 64 MiB
mapped = info().hblkhd  # bytes in blocks mapped from the system one by one
del t
print(mapped, info().fordblks)  # ... and free bytes the heap keeps
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_freed_blocks_stay_with_the_process():
    """The real effect, in fresh processes, read from glibc's own accounting: a 64 MiB tensor
    is mapped from the system by itself and unmapped when freed (so the next one page-faults
    in again: 16,384 faults); with the setting it comes from the heap, which keeps it when
    freed. (Counting page faults over repeated allocations showed the same, 163,895 against
    32,728, but how often the heap grows around small allocations varies between machines.)"""

    def heap(mode: str) -> tuple[int, int]:
        run = subprocess.run([sys.executable, "-c", HEAP, mode], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        mapped, free = map(int, run.stdout.split())
        return mapped, free

    block = 64 << 20
    mapped, free = heap("plain")
    assert mapped >= block and free < block
    mapped, free = heap("keep")
    assert mapped < block and free >= block


TRIM = """
import torch
from sd_pipeline import allocator

def resident():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) << 10 for line in status if line.startswith("VmRSS"))

assert allocator.keep_freed_memory()
t = torch.empty(16 << 20).fill_(1.0)  # 64 MiB, from the heap
del t  # kept by the heap, still resident
before = resident()
allocator.release_free_memory()
print(before - resident())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_released_memory_leaves_the_process():
    """With the thresholds raised, a freed 64 MiB block stays resident until the trim."""
    run = subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) >= 48 << 20

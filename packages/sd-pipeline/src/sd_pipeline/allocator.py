"""Reusing freed memory on the CPU: glibc's malloc thresholds.

glibc serves each allocation above its *mmap threshold* (adjusted as the program runs, 32 MiB at
most by default) with a fresh mapping from the kernel and unmaps it when it is freed, and it gives
free memory at the top of its heap back to the kernel beyond the *trim threshold*. A diffusion
step allocates and frees gigabytes of activations in such blocks, so every step the kernel
hands out freshly zeroed pages again, one page fault per 4 KiB, and the system time of those
faults is a large share of a step on a small CPU (figures: benchmarks/README.md). With both
thresholds raised, freed blocks stay in the heap and the next step reuses them, as torch's caching allocator
does on a GPU. Freed blocks the decoder's larger activations do not fit would then stay resident
beside them, so the pipeline hands the heap's free memory back between the steps and the decode
(``release_free_memory``); what the decode frees stays with the process for the next one.

The setting is process-wide (glibc has one allocator per process), so the pipeline makes it once,
on its first generation on the CPU, unless ``StableDiffusion.keep_freed_memory`` is False.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt(3) parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB are kept for reuse; larger ones are still mapped and unmapped. A glibc that
# refuses an mmap threshold above its default maximum (32 MiB) gets that.
THRESHOLDS = (1 << 30, 32 << 20)

_in_effect = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True when in effect.

    False, and nothing changed, where the C library is not glibc (macOS, Windows, musl)."""
    global _in_effect
    if _in_effect:
        return True
    libc = _glibc()
    if libc is None:
        return False
    for threshold in THRESHOLDS:
        if libc.mallopt(M_MMAP_THRESHOLD, threshold) and libc.mallopt(M_TRIM_THRESHOLD, threshold):
            _in_effect = True
            break
    return _in_effect


def release_free_memory() -> bool:
    """Hand the heap's free memory back to the kernel now (glibc's ``malloc_trim``); True when
    some was. With the thresholds raised, a generation's freed step activations stay in the
    heap, in blocks the VAE decoder's larger activations do not fit: handed back between the
    steps and the decode, they are not resident beside it. False where the C library is not
    glibc."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None

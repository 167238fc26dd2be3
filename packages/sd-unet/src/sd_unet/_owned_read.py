"""The UNet's fast CPU read of a ``.safetensors`` file: tensors copied into memory of their own,
convolution weights straight into ``channels_last``.

On the CPU the UNet runs channels_last. Reading the tensors memory-mapped and changing the
layout afterwards costs a second copy of every convolution weight; reading through a buffer
costs a copy too. Here each tensor is copied once, by torch's threads, from a private mapping
of its own bytes into a tensor of the final layout, and the mapping is closed at once, so that
no mapping of the file stays resident once the model holds its weights (see
benchmarks/results for the load times this was chosen on).
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import torch

from sd_unet._checkpoint import CheckpointError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip


def read_owned(path: Path, prefix: str) -> dict[str, torch.Tensor] | None:
    """The tensors under ``prefix`` of a .safetensors file (one that safetensors has already
    opened, so its header is sound), with the prefix stripped; 4-d ones channels_last. None
    where the file holds a dtype this reader does not know (float8, say): read it otherwise."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        start, file_size = 8 + size, os.fstat(f.fileno()).st_size
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__" or not name.startswith(prefix):
                continue
            if info["dtype"] not in _DTYPES:
                return None
            begin, end = (start + offset for offset in info["data_offsets"])
            if end > file_size:  # (a mapping past the end would crash on reading)
                raise CheckpointError(f"{path}: cannot read {name!r}; is the file truncated?")
            shape = info["shape"]
            layout = torch.channels_last if len(shape) == 4 else None
            tensor = torch.empty(shape, dtype=_DTYPES[info["dtype"]], memory_format=layout)
            if end - begin != tensor.nbytes:
                raise CheckpointError(
                    f"{path}: {name!r} holds {end - begin} bytes, not the {tensor.nbytes} of "
                    f"its shape {shape} and dtype {info['dtype']}; is the file damaged?"
                )
            if end > begin:
                _copy_mapped(f, begin, end, tensor)
            tensors[name[len(prefix) :]] = tensor
    return tensors


def _copy_mapped(f, begin: int, end: int, tensor: torch.Tensor) -> None:
    """Copy the file's bytes ``begin .. end - 1`` (a contiguous tensor of ``tensor``'s shape and
    dtype) into ``tensor``, whatever its layout, through a private mapping of those bytes."""
    first = begin // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(f.fileno(), end - first, offset=first, access=mmap.ACCESS_COPY) as window:
        count = (end - begin) // tensor.element_size()
        source = torch.frombuffer(window, dtype=tensor.dtype, count=count, offset=begin - first)
        tensor.copy_(source.view(tensor.shape))
        del source  # the mapping closes only once no tensor views it

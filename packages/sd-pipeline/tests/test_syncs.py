"""The sampling loop reads no tensor's value on the host: on a GPU each read (``.item()``,
``bool(t)``) waits for every queued kernel, stalling the loop at every step. Counted on the CPU
at the dispatcher, with the finiteness check taking its GPU path (gathered on the device, read
once after sampling): a whole generation's reads must not grow with its number of steps."""

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from sd_pipeline import guidance
from sd_pipeline.guidance import NonFiniteError

# ops that hand a tensor's value to Python (item, bool, int, float all end in the first)
HOST_READS = {"_local_scalar_dense", "equal", "nonzero", "is_nonzero", "allclose"}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in HOST_READS:
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def _image():
    g = np.random.default_rng(0)
    return Image.fromarray(g.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _mask():
    mask = np.zeros((64, 64), np.uint8)
    mask[:24, :24] = 255
    return Image.fromarray(mask)


TASKS = {
    "txt2img_euler": lambda pipe, steps: pipe.txt2img("a red circle", steps=steps, seed=1),
    "txt2img_dpmpp_2m_guided": lambda pipe, steps: pipe.txt2img(
        "a red circle", "blue", steps=steps, seed=1, sampler="dpmpp_2m", guidance_scale=5.0
    ),
    "img2img_ddim": lambda pipe, steps: pipe.img2img(
        "a red circle", _image(), steps=steps, seed=1, sampler="ddim", strength=0.9
    ),
    "inpaint_euler_a": lambda pipe, steps: pipe.inpaint(
        "a red circle", _image(), _mask(), steps=steps, seed=1, sampler="euler_a"
    ),
}


def _reads(task, pipe, steps: int) -> int:
    with HostReads() as mode:
        TASKS[task](pipe, steps)
    return sum(mode.reads.values())


@pytest.mark.parametrize("task", list(TASKS))
def test_no_host_reads_per_step(task, tiny_pipe, monkeypatch):
    monkeypatch.setattr(guidance, "_read_at_once", lambda t: False)  # the GPU's way
    assert _reads(task, tiny_pipe, 2) == _reads(task, tiny_pipe, 5)


def test_the_gpu_way_still_refuses_a_nan_prediction(tiny_pipe, monkeypatch):
    monkeypatch.setattr(guidance, "_read_at_once", lambda t: False)
    bias = tiny_pipe.unet.out[-1].bias
    kept = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.fill_(float("nan"))
        with pytest.raises(NonFiniteError, match="during sampling"):
            tiny_pipe.txt2img("a red circle", steps=2, seed=1)
    finally:
        with torch.no_grad():
            bias.copy_(kept)

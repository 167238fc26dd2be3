"""The opt-in approximate speed-ups through the pipeline and sd-generate: off by default, the
UNet left exact after a run, recorded in the PNG and read back by --from-png, bad values
refused by name."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from sd_pipeline.approximate import ApproximateUNet, approximate
from sd_pipeline.cli import main
from sd_pipeline.metadata import read_parameters
from sd_pipeline.request import GenerationRequest, RequestError

BASE = GenerationRequest(prompts=("a cat",), steps=6, sampler="ddim", seed=3, width=64,
                         height=64, output_type="latent")  # fmt: skip


def test_off_by_default_is_the_unet_itself(tiny_pipe):
    call = object()
    assert approximate(tiny_pipe.unet, call, BASE, 3) is call
    fast = approximate(tiny_pipe.unet, call,
                       dataclasses.replace(BASE, token_merging_ratio=0.5), 3)  # fmt: skip
    assert isinstance(fast, ApproximateUNet) and fast.config is tiny_pipe.unet.config


@pytest.mark.parametrize("fields", [dict(token_merging_ratio=0.5), dict(deepcache_interval=3),
                                    dict(token_merging_ratio=0.3, deepcache_interval=2)])  # fmt: skip
def test_each_moves_the_result_and_leaves_the_unet_exact(tiny_pipe, fields):
    exact = tiny_pipe.run(BASE, progress=False)
    fast = tiny_pipe.run(dataclasses.replace(BASE, **fields), progress=False)
    again = tiny_pipe.run(dataclasses.replace(BASE, **fields), progress=False)
    assert torch.isfinite(fast).all()
    assert not torch.equal(fast, exact)
    assert torch.equal(fast, again)  # seeded: the same request gives the same result
    assert all(getattr(m, "tome", None) is None for m in tiny_pipe.unet.modules())
    assert torch.equal(tiny_pipe.run(BASE, progress=False), exact)


@pytest.mark.parametrize("fields, match", [
    (dict(token_merging_ratio=0.8), "token_merging_ratio must be at most 0.75"),
    (dict(token_merging_ratio=-0.1), "token_merging_ratio must be at least 0"),
    (dict(deepcache_interval=0), "deepcache_interval must be a positive integer"),
    (dict(deepcache_interval=2.5), "deepcache_interval must be an integer"),
])  # fmt: skip
def test_bad_values(fields, match):
    with pytest.raises(RequestError, match=match):
        dataclasses.replace(BASE, **fields).check()


def test_cli_flags_metadata_and_from_png(tiny_checkpoint, tmp_path, capsys):
    first = tmp_path / "fast.png"
    common = ["--steps", "4", "--no-progress", "--checkpoint", str(tiny_checkpoint)]
    code = main(["a dog", "-o", str(first), "--seed", "2", "--width", "64", "--height", "64",
                 "--tome", "0.5", "--deepcache", "3", *common])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    params = read_parameters(first)
    assert params.extra["Token merging ratio"] == "0.5"
    assert params.extra["DeepCache interval"] == "3"
    again = tmp_path / "again.png"
    assert main(["--from-png", str(first), "-o", str(again), *common]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert read_parameters(again) == params
    capsys.readouterr()
    code = main(["x", "-o", str(tmp_path / "bad.png"), "--tome", "0.9", *common])
    err = capsys.readouterr().err
    assert code != 0 and "--tome" in err and "0.75" in err and "Traceback" not in err
    assert not (tmp_path / "bad.png").exists()

"""sd-generate: runs, outputs, --from-png, and every error case (clear message, non-zero exit,
no output file)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from sd_pipeline.cli import main
from sd_pipeline.metadata import read_parameters


def _files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


@pytest.fixture()
def run(tiny_checkpoint, capsys):
    def run(*args, checkpoint=True):
        argv = [*args, "--steps", "2", "--no-progress"]
        if checkpoint:
            argv += ["--checkpoint", str(tiny_checkpoint)]
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_txt2img_to_a_file_with_metadata(run, tmp_path):
    out = tmp_path / "cat.png"
    code, stdout, stderr = run("a cat", "-o", str(out), "--seed", "5", "--width", "32",
                               "--height", "32", "--cfg", "4", "--negative", "dog",
                               "--sampler", "euler")  # fmt: skip
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    assert "seed: 5" in stderr
    params = read_parameters(out)
    assert (params.prompt, params.negative_prompt, params.seed) == ("a cat", "dog", 5)
    assert (params.steps, params.sampler, params.cfg_scale) == (2, "euler", 4.0)
    assert (params.width, params.height, params.model) == (32, 32, "tiny")


def test_folder_outputs_are_numbered_and_never_overwritten(run, tmp_path):
    folder = tmp_path / "out"
    code, _, stderr = run("", "-o", f"{folder}/", "--batch", "2", "--width", "32",
                               "--height", "32")  # fmt: skip
    assert code == 0, stderr
    seed = int(stderr.split("seed: ")[1].split()[0])  # random, and printed
    assert _files(folder) == [f"00000-{seed}.png", f"00001-{seed + 1}.png"]
    code, *_ = run("x", "-o", str(folder), "--seed", "1", "--width", "32", "--height", "32")
    assert code == 0
    assert _files(folder)[-1] == "00002-1.png" and len(_files(folder)) == 3


def test_existing_file_needs_overwrite(run, tmp_path):
    out = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(out)
    code, _, err = run("x", "-o", str(out), "--width", "32", "--height", "32")
    assert code != 0 and "already exists" in err
    assert Image.open(out).size == (8, 8)
    code, _, err = run("x", "-o", str(out), "--width", "32", "--height", "32", "--overwrite")
    assert code == 0 and Image.open(out).size == (32, 32)


def test_from_png_regenerates_the_same_picture(run, tmp_path):
    first = tmp_path / "first.png"
    assert run("a dog", "-o", str(first), "--seed", "9", "--width", "32", "--height", "32",
               "--sampler", "dpmpp_2m")[0] == 0  # fmt: skip
    again = tmp_path / "again.png"
    code, _, err = run("--from-png", str(first), "-o", str(again))
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert read_parameters(again) == read_parameters(first)


def test_img2img_and_inpaint(run, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(init)
    mask = tmp_path / "mask.png"
    Image.new("RGBA", (32, 32), (255, 255, 255, 255)).save(mask)
    code, _, err = run("x", "--init-image", str(init), "--strength", "0.5", "-o",
                       str(tmp_path / "i2i.png"))  # fmt: skip
    assert code == 0, err
    assert read_parameters(tmp_path / "i2i.png").denoising_strength == 0.5
    code, _, err = run("x", "--init-image", str(init), "--mask", str(mask), "-o",
                       str(tmp_path / "inp.png"), "--mask-blur", "2")  # fmt: skip
    assert code == 0, err
    assert Image.open(tmp_path / "inp.png").size == (32, 32)


def test_list_samplers(capsys):
    assert main(["--list-samplers"]) == 0
    names = capsys.readouterr().out.split()
    assert {"ddim", "euler", "euler_a", "dpmpp_2m_karras", "unipc"} <= set(names)


def _bad_files(tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32)).save(init)
    other = tmp_path / "mask16.png"
    Image.new("L", (16, 16)).save(other)
    odd = tmp_path / "odd.png"
    Image.new("RGB", (30, 30)).save(odd)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    return dict(init=init, mask16=other, odd=odd, junk=junk, text=text, blocker=blocker)


ERROR_CASES = [
    (["x", "--width", "30"], "--width must be a multiple of 8, got 30; try 24 or 32"),
    (["x", "--height", "0"], "--height must be a positive integer, got 0"),
    (["x", "--strength", "1.5", "--init-image", "{init}"], r"--strength must be in \[0, 1\]"),
    (["x", "--strength", "-0.5", "--init-image", "{init}"], r"--strength must be in \[0, 1\]"),
    (["x", "--sampler", "eular"], "--sampler 'eular' is unknown; choose from: "),
    (["x", "--init-image", "{init}", "--mask", "{mask16}"], "mask is 16x16 but the image is 32x32"),
    (["x", "--init-image", "{init}", "--mask", "{text}"], "not a readable mask image"),
    (["x", "--mask", "{init}"], "--mask needs --init-image"),
    (["x", "--init-image", "{odd}"], r"--init-image \(its size\) must be a multiple of 8"),
    (["x", "--init-image", "{text}"], "not a readable image"),
    (["x", "--init-image", "{tmp}/missing.png"], "no such image file"),
    (["x", "--checkpoint", "{tmp}/missing.safetensors"], "no such file or folder"),
    (["x", "--checkpoint", "{junk}"], "junk.safetensors"),
    (["x", "-o", "{blocker}/sub/out.png"], "is not a folder"),
    (["x", "-o", "{tmp}/out.xyz"], "unknown image file type"),
    (["x", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["x", "--steps", "0"], "--steps must be a positive integer, got 0"),
    (["x", "--batch", "0"], "--batch must be a positive integer, got 0"),
    (["--from-png", "{init}"], "carries no generation parameters"),
    (["--negative", "y"], "give a prompt"),
    (["x", "--vae", "{junk}"], "--vae needs --checkpoint"),
    (
        ["x", "--compile", "--offload"],
        "--compile keeps the UNet on its device: leave out --offload",
    ),
]


@pytest.mark.parametrize("argv, message", ERROR_CASES, ids=[m[:30] for _, m in ERROR_CASES])
def test_errors(tiny_checkpoint, tmp_path, capsys, argv, message):
    files = {k: str(v) for k, v in _bad_files(tmp_path).items()}
    argv = [a.format(tmp=tmp_path, **files) for a in argv]
    out_dir = tmp_path / "outputs"
    if "-o" not in argv:
        argv += ["-o", str(out_dir) + "/"]
    if "--checkpoint" not in argv and "--vae" not in argv:
        argv += ["--checkpoint", str(tiny_checkpoint)]
    before = _files(tmp_path)
    if "--steps" not in argv:
        argv += ["--steps", "1"]
    code = main([*argv, "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    assert "sd-generate: error: " in err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert _files(tmp_path) == before  # no output file, no temporary file


def test_failure_while_writing_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import sd_pipeline.outputs as outputs

    calls = []

    def failing_save(image, path, parameters=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(image, path, parameters)

    real_save = outputs.save_image
    monkeypatch.setattr(outputs, "save_image", failing_save)
    code = main(["x", "--batch", "3", "-o", str(tmp_path / "out") + "/", "--steps", "1", "--width", "32", "--height", "32",
                 "--no-progress", "--checkpoint", str(tiny_checkpoint)])  # fmt: skip
    assert code != 0 and "disk full" in capsys.readouterr().err
    assert _files(tmp_path) == []


SAMPLER_NAMES = __import__("sd_samplers").SAMPLERS


@pytest.mark.parametrize("sampler", list(SAMPLER_NAMES))
def test_every_sampler_round_trips_through_a_png(run, tmp_path, sampler):
    """The label written into the PNG reads back as the same sampler, and --from-png makes the
    same picture."""
    first = tmp_path / "first.png"
    code, _, err = run("a dog", "-o", str(first), "--seed", "4", "--width", "16", "--height",
                       "16", "--sampler", sampler)  # fmt: skip
    assert code == 0, err
    assert read_parameters(first).sampler == sampler
    again = tmp_path / "again.png"
    code, _, err = run("--from-png", str(first), "-o", str(again))
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_from_png_of_an_img2img_picture_needs_the_init_image(run, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), "red").save(init)
    made = tmp_path / "made.png"
    assert run("x", "--init-image", str(init), "--strength", "0.5", "-o", str(made))[0] == 0
    code, _, err = run("--from-png", str(made), "-o", str(tmp_path / "again.png"))
    assert code == 2 and "made with img2img" in err and "--init-image" in err
    assert not (tmp_path / "again.png").exists()
    code, _, err = run("--from-png", str(made), "--init-image", str(init), "-o",
                       str(tmp_path / "again.png"))  # fmt: skip
    assert code == 0, err
    assert np.array_equal(
        np.asarray(Image.open(made)), np.asarray(Image.open(tmp_path / "again.png"))
    )


def test_features_round_trip_through_a_png(run, tmp_path):
    """Variation seed, seed resize, RNG and the hires fix are written to the PNG and --from-png
    makes the same picture from them."""
    first = tmp_path / "first.png"
    code, _, err = run("a dog", "-o", str(first), "--seed", "4", "--width", "16", "--height",
                       "16", "--subseed", "9", "--subseed-strength", "0.3",
                       "--seed-resize-from", "24x24", "--rng", "nv", "--hires-scale", "2",
                       "--hires-denoise", "0.5", "--hires-upscaler", "latent-nearest")  # fmt: skip
    assert code == 0, err
    params = read_parameters(first)
    assert Image.open(first).size == (32, 32) and (params.width, params.height) == (16, 16)
    assert params.extra["RNG"] == "NV" and params.extra["Variation seed"] == "9"
    assert params.extra["Hires upscaler"] == "Latent (nearest)"
    again = tmp_path / "again.png"
    code, _, err = run("--from-png", str(first), "-o", str(again))
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_batch_count_grid_and_previews(run, tmp_path):
    out = tmp_path / "out"
    preview = tmp_path / "preview.png"
    code, stdout, err = run("x", "-o", f"{out}/", "--seed", "1", "--batch", "2", "--n-iter",
                            "2", "--grid", "--width", "16", "--height", "16", "--preview",
                            str(preview))  # fmt: skip
    assert code == 0, err
    written = stdout.split()
    assert len(written) == 5 and "grid-" in written[-1]
    seeds = sorted(read_parameters(p).seed for p in written[:4])
    assert seeds == [1, 2, 3, 4]
    assert Image.open(written[-1]).size == (32, 32)
    # the tiny model's VAE is not SD's, so no cheap table fits it: the preview is its decode
    assert Image.open(preview).size == (16, 16)


def test_bad_feature_flags(run, tmp_path):
    code, _, err = run("x", "--seed-resize-from", "big", "-o", str(tmp_path / "a.png"))
    assert code == 2 and "--seed-resize-from must be WIDTHxHEIGHT" in err
    code, _, err = run("x", "--hires-upscaler", "esrgan", "-o", str(tmp_path / "a.png"))
    assert code == 2 and "hires.upscaler 'esrgan' is unknown" in err
    code, _, err = run("x", "--n-iter", "0", "-o", str(tmp_path / "a.png"))
    assert code == 2 and "--n-iter must be a positive integer" in err


def test_embeddings_folder_and_weighted_prompts(run, tmp_path, tiny_checkpoint):
    import torch
    from safetensors.torch import save_file

    from sd_clip import CLIPTextModel

    width = CLIPTextModel.from_checkpoint(tiny_checkpoint).config.width
    folder = tmp_path / "emb"
    folder.mkdir()
    save_file({"emb_params": torch.ones(1, width)}, str(folder / "glowy.safetensors"))
    out = tmp_path / "a.png"
    code, _, err = run("a (glowy:1.2) [cat:dog:1] AND a hat:0.5", "-o", str(out), "--embeddings",
                       str(folder), "--width", "16", "--height", "16", "--seed", "1")  # fmt: skip
    assert code == 0, err
    params = read_parameters(out)
    assert params.prompt == "a (glowy:1.2) [cat:dog:1] AND a hat:0.5"  # verbatim
    assert params.extra["TI hashes"].startswith("glowy: ")
    again = tmp_path / "b.png"
    code, _, err = run("--from-png", str(out), "-o", str(again), "--embeddings", str(folder))
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    code, _, err = run("x", "--embeddings", str(tmp_path / "nope"), "-o", str(tmp_path / "c.png"))
    assert code == 2 and "--embeddings" in err and "no such file or folder" in err


@pytest.mark.parametrize("scheduler", ["karras", "sgm_uniform", "beta", "align_your_steps"])
def test_sampler_with_another_scheduler_round_trips(run, tmp_path, scheduler):
    """Any k-sampler on any sigma schedule, written as AUTOMATIC1111 1.9+ writes it."""
    first = tmp_path / "first.png"
    code, _, err = run("a dog", "-o", str(first), "--seed", "4", "--width", "16", "--height",
                       "16", "--sampler", "euler", "--scheduler", scheduler)  # fmt: skip
    assert code == 0, err
    params = read_parameters(first)
    assert (params.sampler, params.scheduler) == ("euler", scheduler)
    from PIL import Image as _Image

    text = _Image.open(first).info["parameters"]
    assert "Sampler: Euler, Schedule type: " in text
    again = tmp_path / "again.png"
    code, _, err = run("--from-png", str(first), "-o", str(again))
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    code, _, err = run("x", "--sampler", "ddim", "--scheduler", "karras", "-o",
                       str(tmp_path / "x.png"))  # fmt: skip
    assert code == 2 and "--scheduler does not apply to sampler 'ddim'" in err

"""AUTOMATIC1111 `parameters` text: written, read back, and parsed from A1111's own output."""

import os
import stat

import pytest
from PIL import Image

from sd_pipeline.metadata import (
    GenerationParameters,
    model_hash,
    read_parameters,
    sampler_label,
    sampler_name,
    save_image,
)

# Written by AUTOMATIC1111 1.x (newer format with a separate Schedule type, quoted values).
A1111_TEXT = """masterpiece, a cat, (sitting:1.2)
on a mat
Negative prompt: blurry, lowres
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, \
Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, \
Clip skip: 2, Lora hashes: "foo: abc, bar: def", Version: v1.10.1"""


def test_parse_automatic1111_text():
    p = GenerationParameters.from_text(A1111_TEXT)
    assert p.prompt == "masterpiece, a cat, (sitting:1.2)\non a mat"
    assert p.negative_prompt == "blurry, lowres"
    assert (p.steps, p.sampler, p.cfg_scale, p.seed) == (28, "dpmpp_2m_karras", 6.5, 3141592653)
    assert (p.width, p.height) == (512, 768)
    assert (p.model_hash, p.model) == ("6ce0161689", "v1-5-pruned-emaonly")
    assert p.denoising_strength == 0.45 and p.clip_skip == 2
    assert p.extra == {"Lora hashes": "foo: abc, bar: def", "Version": "v1.10.1"}


def test_written_text_is_automatic1111_format():
    p = GenerationParameters(
        prompt="a red circle",
        negative_prompt="blue",
        steps=20,
        sampler="euler_a",
        cfg_scale=7.5,
        seed=1,
        width=64,
        height=64,
        model_hash="0123456789",
        model="shapes",
    )
    assert p.to_text() == (
        "a red circle\nNegative prompt: blue\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, "
        "Seed: 1, Size: 64x64, Model hash: 0123456789, Model: shapes"
    )


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m_karras", "dpm2_a", "unipc"])
def test_round_trip(sampler):
    p = GenerationParameters(
        prompt="line one, (weight:1.1)\nline: two",
        negative_prompt="",
        steps=7,
        sampler=sampler,
        cfg_scale=1.0,
        seed=2**32 - 1,
        width=72,
        height=48,
        model="a, b: c",  # needs quoting
        denoising_strength=0.0,
        clip_skip=2,
        extra={"Version": "x"},
    )
    assert GenerationParameters.from_text(p.to_text()) == p


def test_empty_prompt_round_trip():
    p = GenerationParameters(prompt="", seed=5, width=64, height=64)
    assert GenerationParameters.from_text(p.to_text()) == p


def test_text_without_parameters_is_all_prompt():
    p = GenerationParameters.from_text("just a prompt, nothing else")
    assert p.prompt == "just a prompt, nothing else" and p.seed is None


def test_malformed_numbers_are_named():
    with pytest.raises(ValueError, match="malformed generation parameters"):
        GenerationParameters.from_text("x\nSteps: many, Seed: 1")


def test_sampler_names():
    assert sampler_label("dpmpp_2m_karras") == "DPM++ 2M Karras"
    assert sampler_name("DPM++ 2M Karras") == "dpmpp_2m_karras"
    assert sampler_name("Euler a") == "euler_a"
    assert sampler_name("DPM++ 2M", "Karras") == "dpmpp_2m_karras"
    assert sampler_name("Warp drive") == "Warp drive"  # unknown: kept for the error message


def test_png_round_trip(tmp_path):
    p = GenerationParameters(prompt="a cat", seed=3, width=8, height=8, steps=2)
    path = save_image(Image.new("RGB", (8, 8), "red"), tmp_path / "a.png", p)
    assert read_parameters(path) == p
    assert [f.name for f in tmp_path.iterdir()] == ["a.png"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not the temporary file's 0o600


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such image"):
        read_parameters(tmp_path / "missing.png")
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(ValueError, match="no generation parameters"):
        read_parameters(plain)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        read_parameters(junk)


def test_model_hash_is_a1111s_and_is_cached(tmp_path, monkeypatch):
    """The first 10 hex digits of SHA-256 (AUTOMATIC1111's 'Model hash'); computed once per file
    version: the cache answers until the file's size or time changes."""
    import hashlib

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(model.read_bytes()).hexdigest()[:10]
    assert model_hash(model) == expected
    assert (tmp_path / "cache" / "sd-pipeline" / "model-hashes.json").is_file()

    def no_hashing(*args):
        raise AssertionError("hashed again although the cache holds this file")

    monkeypatch.setattr("sd_pipeline.metadata.hashlib.sha256", no_hashing)
    assert model_hash(model) == expected
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model.write_bytes(b"other weights" * 1000)  # a new size: the cached digest no longer holds
    assert model_hash(model) == hashlib.sha256(model.read_bytes()).hexdigest()[:10]


def test_model_hash_survives_a_broken_or_unwritable_cache(tmp_path, monkeypatch):
    import hashlib

    model = tmp_path / "model.bin"
    model.write_bytes(b"abc")
    expected = hashlib.sha256(b"abc").hexdigest()[:10]
    broken = tmp_path / "broken"
    (broken / "sd-pipeline").mkdir(parents=True)
    (broken / "sd-pipeline" / "model-hashes.json").write_text("{not json")
    monkeypatch.setenv("XDG_CACHE_HOME", str(broken))
    assert model_hash(model) == expected  # and the cache is rewritten
    assert "sha256" in (broken / "sd-pipeline" / "model-hashes.json").read_text()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert model_hash(model) == expected

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from sd_pipeline.training.data import DataError, ImageFolder, check_resolution


def write(folder, name, size=(80, 64), caption="a caption", colour=(200, 10, 10)):
    folder.mkdir(parents=True, exist_ok=True)
    img = np.zeros((size[1], size[0], 3), np.uint8)
    img[:] = colour
    img[:, : size[0] // 2, 1] = 255  # left half differs, so crops and flips are visible
    Image.fromarray(img).save(folder / name)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption + "\n")


def test_txt_layout_resize_crop_flip(tmp_path):
    write(tmp_path, "a.png", size=(80, 64), caption="first")
    write(tmp_path, "b.jpg", size=(64, 64), caption="second")
    (tmp_path / "notes.md").write_text("ignored")
    data = ImageFolder.load(tmp_path, 32)
    assert len(data) == 2 and data.captions == ["first", "second"]
    assert data.images[0].shape == (32, 40, 3)  # shorter side to 32, aspect kept
    images, captions = data.batch([0, 1])
    assert images.shape == (2, 3, 32, 32) and captions == ["first", "second"]
    assert images.min() >= -1 and images.max() <= 1
    # Centre crop of the 40-wide image: columns 4..35.
    expect = torch.from_numpy(data.images[0][:, 4:36]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(images[0], expect)

    flip = ImageFolder.load(tmp_path, 32, random_flip=True, random_crop=True)
    seen = set()
    for seed in range(12):
        out, _ = flip.batch([1], torch.Generator().manual_seed(seed))
        seen.add(bool(out[0, 1, 5, 2] > 0.9))  # green channel bright on the left unless flipped
    assert seen == {True, False}
    again = flip.batch([0, 1], torch.Generator().manual_seed(3))[0]
    assert torch.equal(again, flip.batch([0, 1], torch.Generator().manual_seed(3))[0])


def test_metadata_jsonl(tmp_path):
    write(tmp_path, "x.png", caption=None)
    write(tmp_path, "y.png", caption=None)
    rows = [{"file_name": "x.png", "text": "ex"}, {"file_name": "y.png", "caption": "why"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = ImageFolder.load(tmp_path, 64)
    assert data.captions == ["ex", "why"]


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match=r"no usable training images.*empty"):
        ImageFolder.load(tmp_path, 64)
    with pytest.raises(DataError, match="not a folder"):
        ImageFolder.load(tmp_path / "missing", 64)


def test_image_without_caption_alone_is_an_error(tmp_path):
    write(tmp_path, "lonely.png", caption=None)
    with pytest.raises(DataError, match=r"lonely.png: no caption \(expected lonely.txt"):
        ImageFolder.load(tmp_path, 64)


def test_corrupt_image_alone_is_an_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    (tmp_path / "bad.txt").write_text("x")
    with pytest.raises(DataError, match=r"bad.png: cannot read the image"):
        ImageFolder.load(tmp_path, 64)


def test_many_bad_files_is_an_error(tmp_path):
    write(tmp_path, "good.png")
    write(tmp_path, "nocap.png", caption=None)
    with pytest.raises(DataError, match="1 of 2 files are unusable"):
        ImageFolder.load(tmp_path, 64)


def test_a_few_bad_files_among_many_warn(tmp_path, caplog):
    for i in range(20):
        write(tmp_path, f"img{i:02d}.png", size=(64, 64))
    write(tmp_path, "orphan.png", caption=None)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    (tmp_path / "broken.txt").write_text("x")
    with caplog.at_level(logging.WARNING):
        data = ImageFolder.load(tmp_path, 64)
    assert len(data) == 20
    assert "orphan.png: no caption" in caplog.text and "broken.png: cannot read" in caplog.text


def test_resolution_must_be_multiple_of_8(tmp_path):
    write(tmp_path, "a.png")
    with pytest.raises(DataError, match=r"multiple of 8, got 60 .try 56 or 64"):
        ImageFolder.load(tmp_path, 60)
    check_resolution(64)

"""Hostile and careless file input and output (issue 17): nothing hangs, nothing is lost,
nothing is left behind, every image mode reads right, and every error names the file."""

from __future__ import annotations

import colorsys
import contextlib
import errno
import multiprocessing
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_pipeline import files
from sd_pipeline.files import handle_sigterm, remove_stale_temporaries
from sd_pipeline.images import (
    MAX_IMAGE_PIXELS,
    load_image,
    load_mask,
    tensor_to_pil,
    to_mask,
    to_pil,
)
from sd_pipeline.metadata import (
    MAX_PARAMETERS_TEXT,
    GenerationParameters,
    read_parameters,
    save_image,
)
from sd_pipeline.outputs import plan_outputs, write_outputs

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width=1, height=1, *chunks: bytes) -> bytes:
    """A greyscale PNG declaring ``width`` x ``height`` with the given extra chunks (its one
    IDAT holds a single row: enough for a header-only read, too short to decode)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" + b"\0" * min(width, 64))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + b"".join(chunks)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def _all_files(folder: Path) -> list[str]:
    return sorted(os.path.relpath(p, folder) for p in folder.rglob("*"))


# ---------------------------------------------------------------- 1. parameters: linear, capped

HOSTILE_TAILS = {
    "no colon": lambda n: "a" * n,
    "words without colon": lambda n: "ab cd " * (n // 6),
    "digits and letters": lambda n: "4a" * (n // 2),
    "open quotes": lambda n: 'k: "x, ' * (n // 7),
    "quotes only": lambda n: '"' * n,
    "escapes": lambda n: 'k: "\\' * (n // 5),
}


@pytest.mark.parametrize("shape", HOSTILE_TAILS)
def test_parameters_parse_in_linear_time(shape):
    """A last line of ``Steps: 4, `` and then text without colons took 9 s at 40k characters
    (quadratic). The bound is wide (a loaded machine parses 40k linear characters in well under
    0.1 s; quadratic work needs ~10 s at 40k and minutes at 200k), so it cannot flake."""
    for n in (40_000, 200_000):
        text = "a prompt\nSteps: 4, " + HOSTILE_TAILS[shape](n)
        start = time.process_time()
        params = GenerationParameters.from_text(text)
        elapsed = time.process_time() - start
        assert elapsed < 2.0, f"{n} characters took {elapsed:.2f} s"
        assert params.steps == 4 and params.prompt == "a prompt"


def test_parameters_parse_like_a_regex_findall():
    """The linear parser finds the pairs AUTOMATIC1111's regex finds, junk included."""
    p = GenerationParameters.from_text(
        'x\nSteps: 3, 4junk, ab cd, Seed: 9, odd "text", Model: "a, b: c", Size: 8x16'
    )
    assert (p.steps, p.seed, p.model, p.width, p.height) == (3, 9, "a, b: c", 8, 16)


def _parameters_png(path: Path, text: str, kind: bytes) -> Path:
    data = text.encode("utf-8" if kind == b"iTXt" else "latin-1")
    if kind == b"tEXt":
        body = b"parameters\0" + data
    elif kind == b"zTXt":
        body = b"parameters\0\0" + zlib.compress(data, 9)
    else:
        body = b"parameters\0\1\0\0\0" + zlib.compress(data, 9)
    path.write_bytes(_png(1, 1, _chunk(b"tEXt", b"Software\0test"), _chunk(kind, body)))
    return path


@pytest.mark.parametrize("kind", [b"tEXt", b"zTXt", b"iTXt"])
def test_parameters_text_is_capped(tmp_path, kind):
    """More than MAX_PARAMETERS_TEXT characters of text is refused with a clear error, before
    parsing (a 1.1 KB PNG can carry 1 MB of compressed text); up to it reads as before."""
    fits = "a prompt " * ((MAX_PARAMETERS_TEXT - 200) // 9) + "\nSteps: 5, Seed: 2"
    assert read_parameters(_parameters_png(tmp_path / "fits.png", fits, kind)).seed == 2
    over = "a prompt " * (MAX_PARAMETERS_TEXT // 9 + 10) + "\nSteps: 5"
    with pytest.raises(ValueError, match=r"over\.png: its 'parameters' text.* over the 256 KiB"):
        read_parameters(_parameters_png(tmp_path / "over.png", over, kind))


def test_a_small_png_with_a_megabyte_of_hostile_text_is_refused_at_once(tmp_path):
    text = "Steps: 4, " + "a" * 1_000_000
    path = _parameters_png(tmp_path / "bomb.png", text, b"zTXt")
    assert path.stat().st_size < 2000
    start = time.process_time()
    with pytest.raises(ValueError, match="MAX_PARAMETERS_TEXT"):
        read_parameters(path)
    assert time.process_time() - start < 2.0


def test_parameters_of_any_text_chunk_kind_are_read(tmp_path):
    text = "une île, 猫\nSteps: 6, Seed: 3"
    assert read_parameters(_parameters_png(tmp_path / "i.png", text, b"iTXt")).prompt == (
        "une île, 猫"
    )
    written = save_image(Image.new("RGB", (4, 4)), tmp_path / "w.png", "猫\nSteps: 2")
    assert read_parameters(written).prompt == "猫"


# ---------------------------------------------------------------- 2. parallel runs, one folder


def _parallel_writer(folder, worker, barrier, results):
    try:
        image = Image.new("RGB", (8, 8), (worker * 40, 0, 0))
        image.info["parameters"] = f"worker {worker}\nSteps: 1"
        paths = plan_outputs(folder, [7, 8])  # every worker plans 00000-7.png, 00001-8.png
        barrier.wait(timeout=60)
        written = write_outputs([image, image.copy()], paths)
        results.put((worker, [str(p) for p in written]))
    except BaseException as e:
        results.put((worker, f"{type(e).__name__}: {e}"))


def test_parallel_runs_into_one_folder_keep_every_image(tmp_path):
    """Processes that planned the same names at once each keep their images, under numbers
    that never repeat (before: all but one failed with 'appeared while generating')."""
    folder = tmp_path / "out"
    folder.mkdir()
    workers = 4
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["sd_pipeline.outputs"])
    barrier, results = context.Barrier(workers), context.Queue()
    processes = [
        context.Process(target=_parallel_writer, args=(folder, i, barrier, results))
        for i in range(workers)
    ]
    for p in processes:
        p.start()
    answers = dict(results.get(timeout=120) for _ in processes)
    for p in processes:
        p.join(timeout=60)
    assert all(isinstance(v, list) for v in answers.values()), answers
    names = _all_files(folder)
    assert len(names) == 2 * workers, names  # nothing lost, no staging left
    numbers = sorted(int(n.split("-")[0]) for n in names)
    assert numbers == list(range(2 * workers))  # no number twice
    for worker, written in answers.items():
        assert len(written) == 2
        for path in written:
            assert read_parameters(path).prompt == f"worker {worker}"
            assert Image.open(path).getpixel((0, 0)) == (worker * 40, 0, 0)


def test_write_outputs_returns_where_it_wrote(tmp_path):
    """The planned numbers are a guess: a file that appeared meanwhile moves them on."""
    folder = tmp_path / "out"
    paths = plan_outputs(folder, [1, 2])
    assert [p.name for p in paths] == ["00000-1.png", "00001-2.png"]
    folder.mkdir()
    Image.new("RGB", (2, 2)).save(folder / "00000-9.png")  # another program, meanwhile
    written = write_outputs([Image.new("RGB", (2, 2))] * 2, paths)
    assert [p.name for p in written] == ["00001-1.png", "00002-2.png"]
    assert _all_files(folder) == ["00000-9.png", "00001-1.png", "00002-2.png"]


# ---------------------------------------------------------------- 3. killed runs leave no litter


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    dead = _dead_pid()
    folder = tmp_path / "out"
    folder.mkdir()
    stale_dir = folder / f".sd-generate-{dead}-abcd1234"
    stale_dir.mkdir()
    (stale_dir / "00000.png").write_bytes(b"partial")
    stale_tmp = folder / f".model.safetensors.{dead}-x1y2z3_4.tmp"
    stale_tmp.write_bytes(b"partial")
    old_style = folder / ".sd-generate-oldstyle"
    old_style.mkdir()
    (old_style / "00003-1.png").write_bytes(b"partial")
    os.utime(old_style, (time.time() - 7200, time.time() - 7200))
    live_dir = folder / f".sd-generate-{os.getpid()}-live0000"  # this process: running
    live_dir.mkdir()
    locked = folder / f".state.safetensors.{dead}-locked00.tmp"  # a writer in another pid
    locked.write_bytes(b"being written")  # namespace: its pid looks dead, its lock is held
    holder = os.open(locked, os.O_RDONLY)
    import fcntl

    fcntl.flock(holder, fcntl.LOCK_EX)
    others = [folder / ".hidden-notes", folder / f".x.{dead}-short.tmp", folder / "00001-2.png"]
    for other in others:
        other.write_bytes(b"not ours")
    try:
        removed = remove_stale_temporaries(folder)
    finally:
        os.close(holder)
    assert sorted(removed) == sorted([stale_dir, stale_tmp, old_style])
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [live_dir.name, locked.name] + [o.name for o in others]
    )


def test_the_next_run_into_a_folder_clears_what_a_killed_one_left(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    litter = folder / f".sd-generate-{_dead_pid()}-killed00"
    litter.mkdir()
    (litter / "00000.png").write_bytes(b"half")
    written = write_outputs([Image.new("RGB", (2, 2))], plan_outputs(folder, [3]))
    assert _all_files(folder) == [written[0].name]


SLOW_WRITER = """
import sys, time
sys.path.insert(0, {src!r})
from pathlib import Path
from PIL import Image
import sd_pipeline.outputs as outputs
from sd_pipeline.files import handle_sigterm

folder, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "term":
    handle_sigterm()
real_save = outputs.save_image

def slow_save(image, path, parameters=None):
    real_save(image, path, parameters)
    (folder.parent / "staged").write_text("1")
    time.sleep(60)

outputs.save_image = slow_save
try:
    outputs.write_outputs([Image.new("RGB", (4, 4))] * 3, outputs.plan_outputs(folder, [1, 2, 3]))
except KeyboardInterrupt:
    sys.exit(130)
"""


def _kill_while_writing(tmp_path, mode: str, sig: int) -> int:
    folder = tmp_path / "out"
    script = tmp_path / "writer.py"
    script.write_text(SLOW_WRITER.format(src=SRC))
    child = subprocess.Popen([sys.executable, str(script), str(folder), mode])
    deadline = time.monotonic() + 120
    while not (tmp_path / "staged").exists():
        assert child.poll() is None, "the writer ended early"
        assert time.monotonic() < deadline, "the writer never staged an image"
        time.sleep(0.05)
    child.send_signal(sig)
    return child.wait(timeout=60)


def test_sigterm_while_writing_cleans_up_like_ctrl_c(tmp_path):
    code = _kill_while_writing(tmp_path, "term", signal.SIGTERM)
    assert code == 130  # KeyboardInterrupt, not the signal's default death
    assert _all_files(tmp_path / "out") == []  # no staging folder, no partial batch


def test_sigkill_while_writing_leaves_nothing_after_the_next_run(tmp_path):
    assert _kill_while_writing(tmp_path, "kill", signal.SIGKILL) == -signal.SIGKILL
    folder = tmp_path / "out"
    assert any(name.startswith(".sd-generate-") for name in os.listdir(folder))  # the litter
    written = write_outputs([Image.new("RGB", (2, 2))], plan_outputs(folder, [5]))
    assert _all_files(folder) == [written[0].name] == ["00000-5.png"]


def test_handle_sigterm_and_the_cli_installs_it(monkeypatch):
    from sd_pipeline.cli import main

    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        assert main(["--list-samplers"]) == 0
        assert signal.getsignal(signal.SIGTERM) is files._interrupt
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs between bytecodes
        mine = lambda *a: None  # noqa: E731 - an application's own handler is left alone
        signal.signal(signal.SIGTERM, mine)
        handle_sigterm()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- 4. every PIL mode reads right


def _rng(seed=0):
    return np.random.default_rng(seed)


def _composite(rgb, alpha):
    """Over white, as AUTOMATIC1111's flatten (the default img2img background is white)."""
    a = alpha[..., None].astype(np.float64) / 255.0
    return rgb.astype(np.float64) * a + 255.0 * (1.0 - a)


def _luma(rgb):
    """ITU-R 601-2, the greyscale of PIL's and AUTOMATIC1111's convert('L')."""
    rgb = rgb.astype(np.float64)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _mode_cases():
    """(image, expected RGB as floats, expected mask as floats, tolerance) per mode, each
    expectation computed from the pixel values by the mode's definition, not through PIL."""
    r = _rng()
    shape = (6, 5)
    cases = {}
    bits = r.integers(0, 2, shape).astype(bool)
    grey = np.where(bits, 255.0, 0.0)
    cases["1"] = (Image.fromarray(bits), np.stack([grey] * 3, -1), grey, 0)
    g = r.integers(0, 256, shape, dtype=np.uint8)
    cases["L"] = (Image.fromarray(g, "L"), np.stack([g] * 3, -1), g, 0)
    a = r.integers(0, 256, shape, dtype=np.uint8)
    a[0, 0] = 0
    cases["LA"] = (
        Image.fromarray(np.stack([g, a], -1), "LA"),
        _composite(np.stack([g] * 3, -1), a),
        a,  # some transparency: the alpha is the mask
        1,
    )
    palette = r.integers(0, 256, (256, 3), dtype=np.uint8)
    index = r.integers(0, 256, shape, dtype=np.uint8)
    p = Image.fromarray(index, "P")
    p.putpalette(palette.flatten().tolist())
    cases["P"] = (p, palette[index], _luma(palette[index]), 1)
    pt = p.copy()
    pt.info["transparency"] = int(index[0, 0])
    clear = index == index[0, 0]
    cases["P+transparency"] = (
        pt,
        np.where(clear[..., None], 255, palette[index]),
        np.where(clear, 0, 255),
        0,
    )
    pa = Image.merge("PA", (p, Image.fromarray(a, "L")))
    cases["PA"] = (pa, _composite(palette[index], a), a, 1)
    rgb = r.integers(0, 256, (*shape, 3), dtype=np.uint8)
    cases["RGB"] = (Image.fromarray(rgb, "RGB"), rgb, _luma(rgb), 1)
    cases["RGBA"] = (
        Image.fromarray(np.dstack([rgb, a]), "RGBA"),
        _composite(rgb, a),
        a,
        1,
    )
    opaque = np.full(shape, 255, np.uint8)
    cases["RGBA opaque"] = (
        Image.fromarray(np.dstack([rgb, opaque]), "RGBA"),
        rgb,
        _luma(rgb),  # no transparency: read by its grey level
        1,
    )
    cmyk = r.integers(0, 256, (*shape, 4), dtype=np.uint8).astype(np.float64)
    c_rgb = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255  # the naive CMYK -> RGB
    cases["CMYK"] = (Image.fromarray(cmyk.astype(np.uint8), "CMYK"), c_rgb, _luma(c_rgb), 1)
    ycc = r.integers(16, 236, (*shape, 3), dtype=np.uint8).astype(np.float64)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128  # JFIF (full-range BT.601)
    y_rgb = np.clip(np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr,
                              y + 1.772 * cb], -1), 0, 255)  # fmt: skip
    cases["YCbCr"] = (Image.fromarray(ycc.astype(np.uint8), "YCbCr"), y_rgb, _luma(y_rgb), 2)
    hsv = r.integers(0, 256, (*shape, 3), dtype=np.uint8)
    h_rgb = (
        np.array(
            [[colorsys.hsv_to_rgb(*(px / 255.0)) for px in row] for row in hsv.astype(np.float64)]
        )
        * 255
    )
    cases["HSV"] = (Image.fromarray(hsv, "HSV"), h_rgb, _luma(h_rgb), 2)
    wide = r.integers(0, 65536, shape).astype(np.uint16)
    wide[0, :3] = [0, 65535, 257]
    scaled = wide / 257.0  # 0..65535 is black..white
    cases["I;16"] = (Image.fromarray(wide), np.stack([scaled] * 3, -1), scaled, 0.51)
    big_endian = Image.frombytes("I;16B", shape[::-1], wide.astype(">u2").tobytes())
    cases["I;16B"] = (big_endian, np.stack([scaled] * 3, -1), scaled, 0.51)
    cases["I"] = (
        Image.fromarray(wide.astype(np.int32), "I"),
        np.stack([scaled] * 3, -1),
        scaled,
        0.51,
    )
    f = r.random(shape).astype(np.float32)
    f[0, :2] = [0.0, 1.0]
    cases["F"] = (Image.fromarray(f, "F"), np.stack([f * 255.0] * 3, -1), f * 255.0, 0.51)
    return cases


MODE_CASES = _mode_cases()


@pytest.mark.parametrize("mode", MODE_CASES)
def test_every_mode_converts_to_rgb_and_to_a_mask(mode):
    image, rgb, mask, tolerance = MODE_CASES[mode]
    assert image.mode == mode.split()[0].split("+")[0]
    got = np.asarray(to_pil(image), dtype=np.float64)
    assert got.shape == (*image.size[::-1], 3)
    assert np.abs(got - rgb).max() <= tolerance + 1e-9, mode
    grey = to_mask(image)
    assert grey.mode == "L"
    # The mask of a colour image is its luma, rounded once more: one more level of slack.
    assert np.abs(np.asarray(grey, dtype=np.float64) - mask).max() <= tolerance + 1.0, mode


def test_lab_converts_through_its_colour_space():
    """PIL's LAB: L 0..255 for 0..100, a and b signed bytes. Reference points: white, black,
    sRGB mid-grey (L* 53.59) and sRGB red (D50 Lab 54.29, 80.81, 69.89, Lindbloom's tables)."""
    lab = np.array(
        [[[255, 0, 0], [0, 0, 0], [round(53.59 * 2.55), 0, 0], [round(54.29 * 2.55), 81, 70]]],
        np.uint8,
    )
    got = np.asarray(to_pil(Image.fromarray(lab, "LAB")), dtype=np.float64)[0]
    expected = np.array([[255, 255, 255], [0, 0, 0], [128, 128, 128], [255, 0, 0]])
    assert np.abs(got - expected).max() <= 12, got
    assert np.abs(got[:3] - expected[:3]).max() <= 3
    assert np.asarray(to_mask(Image.fromarray(lab, "LAB")))[0, 0] >= 250


def test_a_16_bit_png_reads_as_its_grey_levels(tmp_path):
    """A 16-bit greyscale PNG came in as solid white (PIL clips I;16 at 255)."""
    wide = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    path = tmp_path / "depth.png"
    Image.fromarray(wide).save(path)
    expected = np.round(wide / 257.0)
    assert np.abs(np.asarray(load_image(path))[..., 0] - expected).max() <= 0.5
    assert np.abs(np.asarray(load_mask(path)) - expected).max() <= 0.5


def test_exif_orientation_is_applied_to_files(tmp_path):
    """A phone photo stored sideways with an orientation tag comes in upright (A1111 too)."""
    image = Image.new("RGB", (4, 2), "red")
    image.putpixel((0, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "photo.png"
    image.save(path, exif=exif)
    upright = load_image(path)
    assert upright.size == (2, 4) and upright.getpixel((1, 0)) == (0, 0, 255)


def test_non_finite_pixels_are_refused():
    f = np.full((4, 4), np.nan, np.float32)
    with pytest.raises(ValueError, match="non-finite"):
        to_pil(Image.fromarray(f, "F"))
    with pytest.raises(ValueError, match="non-finite"):
        to_mask(f)
    with pytest.raises(ValueError, match="non-finite"):
        to_pil(np.full((4, 4, 3), np.inf, np.float32))
    with pytest.raises(ValueError, match="non-finite"):  # a decoded NaN latent: no black PNG
        tensor_to_pil(torch.full((1, 3, 4, 4), float("nan")))


# ---------------------------------------------------------------- 5. FIFOs, sockets, bombs


def _returns_within(fn, seconds=10.0):
    """fn's exception (it must raise) within ``seconds``: a hang fails instead of blocking."""
    outcome = {}

    def target():
        try:
            fn()
            outcome["error"] = None
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return thread.is_alive(), outcome.get("error")


@pytest.fixture()
def specials(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.png"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    yield {"a FIFO": fifo, "a socket": sock_path, "a character device": Path("/dev/null")}
    sock.close()
    # A reader still blocked on the FIFO (before the fix) gets its writer and returns.
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("reader", [load_image, load_mask, read_parameters])
def test_special_files_are_refused_at_once(specials, reader):
    for kind, path in specials.items():
        hung, error = _returns_within(lambda p=path: reader(p))
        assert not hung, f"{reader.__name__} blocked on {kind}"
        assert isinstance(error, ValueError) and f"is {kind}" in str(error), error
        assert str(path) in str(error)


def _cli_error(capsys, *argv):
    from sd_pipeline.cli import main

    code = main([*argv, "--no-progress"])
    err = capsys.readouterr().err
    return code, err


def test_cli_refuses_a_fifo_as_init_image_or_png(specials, tmp_path, capsys):
    fifo = str(specials["a FIFO"])
    for argv in (["x", "--init-image", fifo], ["--from-png", fifo]):
        hung, _ = _returns_within(lambda a=argv: _cli_error(capsys, *a, "-o", str(tmp_path)))
        assert not hung, argv
    code, err = _cli_error(capsys, "--from-png", fifo, "-o", str(tmp_path / "o.png"))
    assert code == 2 and "is a FIFO" in err and "Traceback" not in err


def test_decompression_bombs_are_one_clear_error(tmp_path, capsys):
    """A 200-byte PNG declaring 100000 x 100000 pixels, and ones just over PIL's warning and
    over our own limit: a ValueError naming the file and the limit, never PIL's exception."""
    for name, (w, h) in {
        "huge.png": (100_000, 100_000),  # PIL's DecompressionBombError
        "warned.png": (10_000, 10_000),  # PIL's DecompressionBombWarning
        "over.png": (8192, 8193),  # only our limit
    }.items():
        path = tmp_path / name
        path.write_bytes(_png(w, h))
        for reader in (load_image, load_mask):
            with pytest.raises(ValueError, match=rf"{name}: .*MAX_IMAGE_PIXELS"):
                reader(path)
    assert MAX_IMAGE_PIXELS == 8192 * 8192
    code, err = _cli_error(capsys, "x", "--init-image", str(tmp_path / "huge.png"), "-o",
                           str(tmp_path / "o.png"))  # fmt: skip
    assert code == 2 and "huge.png" in err and "Traceback" not in err
    assert err.count("\n") == 1  # one line: the error, before anything else is printed


def test_parameters_of_a_huge_picture_are_read_without_decoding_it(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png(100_000, 100_000, _chunk(b"tEXt", b"parameters\0cat\nSteps: 3")))
    assert read_parameters(path).steps == 3


# ---------------------------------------------------------------- 6. truthful errors


def test_png_reading_errors_are_clear(tmp_path):
    good = _parameters_png(tmp_path / "good.png", "x\nSteps: 2", b"tEXt").read_bytes()
    cases = {
        "cut.png": (good[:60], "not a readable PNG"),
        "crc.png": (good.replace(b"x\nSteps: 2", b"y\nSteps: 2"), "damaged"),
        "junk.png": (b"not an image at all", "not a readable image"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=message):
            read_parameters(tmp_path / name)
    Image.new("RGB", (4, 4)).save(tmp_path / "photo.jpg")
    with pytest.raises(ValueError, match="a JPEG image carries no generation parameters"):
        read_parameters(tmp_path / "photo.jpg")
    with pytest.raises(ValueError, match="is a folder"):
        read_parameters(tmp_path)


def test_image_reading_errors_say_what_is_wrong(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64)).save(good)
    cases = {
        "empty.png": (b"", "the file is empty"),
        "header.png": (good.read_bytes()[:40], "a PNG that is cut short or damaged"),
        "cut.png": (good.read_bytes()[:-30], "truncated"),
        "notes.png": (b"some words", "not in a format PIL reads"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        for reader in (load_image, load_mask):
            with pytest.raises(ValueError, match=rf"{name}: not a readable .*{message}"):
                reader(tmp_path / name)
    with pytest.raises(ValueError, match=r"empty\.png: not a readable image \(the file is empty"):
        read_parameters(tmp_path / "empty.png")


def test_unreadable_files_are_reported_truthfully(tmp_path, monkeypatch):
    path = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(path)
    real_open = os.open

    def refusing_open(name, *args, **kwargs):
        if os.fspath(name) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", refusing_open)
    for reader in (load_image, load_mask, read_parameters):
        with pytest.raises(PermissionError, match="permission denied") as caught:
            reader(path)
        assert "no such" not in str(caught.value).lower() and str(path) in str(caught.value)
    monkeypatch.undo()
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError, match="broken symbolic link"):
        load_image(link)
    with pytest.raises(FileNotFoundError, match="no such image file"):
        load_image(tmp_path / "missing.png")


def _raise(error):
    def fail(*args, **kwargs):
        raise error

    return fail


def test_disk_full_and_permission_errors_name_the_path(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    images = [Image.new("RGB", (4, 4))] * 2
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", _raise(full))
    with pytest.raises(OSError, match=r"cannot write .*out/00000-1\.png: no space left") as e:
        write_outputs(images, plan_outputs(folder, [1, 2]))
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match=r"cannot write .*single\.png: no space left"):
        save_image(images[0], tmp_path / "single.png")
    monkeypatch.undo()
    assert _all_files(tmp_path) == ["out"]  # nothing half-written, no staging left

    denied = PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr("sd_pipeline.outputs.os.link", _raise(denied))
    with pytest.raises(OSError, match=r"cannot write .*out/00000-1\.png: permission denied"):
        write_outputs(images, plan_outputs(folder, [1, 2]))
    monkeypatch.undo()
    monkeypatch.setattr("sd_pipeline.files.tempfile.mkdtemp", _raise(denied))
    with pytest.raises(OSError, match=r"cannot write .*out: permission denied"):
        write_outputs(images, plan_outputs(folder, [1, 2]))
    monkeypatch.undo()
    assert _all_files(tmp_path) == ["out"]


def test_placement_is_all_or_nothing(tmp_path, monkeypatch):
    """An interrupt while the batch is being placed takes back what was placed."""
    import sd_pipeline.outputs as outputs

    real_link, calls = outputs._link, []

    def link_then_interrupt(source, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_link(source, path)

    monkeypatch.setattr(outputs, "_link", link_then_interrupt)
    folder = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_outputs([Image.new("RGB", (4, 4))] * 3, plan_outputs(folder, [1, 2, 3]))
    assert _all_files(folder) == []


def test_writing_works_without_hard_links(tmp_path, monkeypatch):
    """FAT and some network shares have no hard links: placement falls back to a rename."""
    monkeypatch.setattr("sd_pipeline.outputs.os.link", _raise(OSError(errno.EPERM, "no links")))
    folder = tmp_path / "out"
    written = write_outputs([Image.new("RGB", (4, 4))] * 2, plan_outputs(folder, [1, 2]))
    assert _all_files(folder) == [p.name for p in written] == ["00000-1.png", "00001-2.png"]


def test_a_hung_lock_holder_does_not_stop_writing(tmp_path, monkeypatch, caplog):
    """A run stopped while holding a folder's lock (SIGSTOP, a debugger) is waited for only so
    long; placement goes on without the lock and still never overwrites."""
    import fcntl

    folder = tmp_path / "out"
    folder.mkdir()
    holder = os.open(folder, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    monkeypatch.setattr(files, "_LOCK_WAIT_S", 0.2)
    try:
        written = write_outputs([Image.new("RGB", (4, 4))], plan_outputs(folder, [1]))
    finally:
        os.close(holder)
    assert [p.name for p in written] == ["00000-1.png"]
    assert "holds its lock" in caplog.text


def test_the_readme_names_the_limits():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in ("MAX_PARAMETERS_TEXT", "MAX_IMAGE_PIXELS"):
        assert name in readme

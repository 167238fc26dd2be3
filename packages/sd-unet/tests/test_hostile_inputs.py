"""Hostile and careless input to the UNet's loader and writer (issue 17): real `.ckpt` files
with trainer state load and nothing in a pickle runs; special files are refused at once;
messages say what is wrong; configs in a single file's metadata or a config.json are used or
refused clearly; a failed save names its file."""

import argparse
import dataclasses
import functools
import json
import os
import pickle
import random
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import random_unet
from safetensors.torch import save_file

from sd_unet import CheckpointError, UNetConfig, load_state_dict
from sd_unet import UNet as Model

# What differs between the three components' copies of these tests: the model, its place in an
# SD single file, its diffusers folder, its config.
PREFIX = "model.diffusion_model."
METADATA_KEY = "sd_unet.config"
FOLDER, WEIGHTS = "unet", "diffusion_pytorch_model.safetensors"
# 4 heads: the shapes cannot tell (inference says 8 for a UNet of SD 1.x's kind)
UNINFERABLE = dataclasses.replace(UNetConfig.tiny(), num_heads=4)
BAD_METADATA = [('{"num_heads": "8"}', "num_heads"), ('{"channel_mult": 4}', "channel_mult"),
                ('{"heads": 8}', "heads"), ("[1, 2]", "not a JSON object"),
                ("{", "unreadable"),
                ('{"num_heads": 8, "num_head_channels": 64}', "exactly one"),
                ('{"transformer_depth": "2"}', "transformer_depth"),
                ('{"transformer_depth": [1, 2, 3, 4, 5]}', "one per level"),
                ('{"transformer_depth": {"a": 1}}', "transformer_depth"),
                ('{"transformer_depth_middle": [1]}', "transformer_depth_middle"),
                ('{"adm_in_channels": "2816"}', "adm_in_channels")]  # fmt: skip
BAD_CONFIG_JSON = [
    ("layers_per_block", [1], "expected an integer"),
    ("in_channels", "4", "expected an integer"),
    ("cross_attention_dim", True, "expected an integer"),
    ("norm_num_groups", 0, "expected an integer from 1"),
    ("block_out_channels", 32, "expected a non-empty list"),
    ("block_out_channels", [10**12] * 3, "expected an integer from 1 to"),
    ("down_block_types", "CrossAttnDownBlock2D", "expected a non-empty list"),
    ("down_block_types", [1, 2, 3], "expected a string"),
    ("attention_head_dim", "8", "expected an integer"),
    ("transformer_layers_per_block", [[1]], "expected an integer"),
    ("use_linear_projection", "no", "expected true or false"),
    ("sample_size", 10**6, "is 1000000; expected an integer from 1 to 8192"),
    ("sample_size", [10**6, 10**6], r"\[0\] is 1000000"),
]


def random_model(config) -> Model:
    return random_unet(config)


@pytest.fixture(scope="module")
def tiny() -> Model:
    return random_unet(UNetConfig.tiny())


def assert_same_weights(a: Model, b: Model) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def save_folder(model: Model, folder) -> None:
    model.save_diffusers(folder)


def sd_state(model: Model) -> dict[str, torch.Tensor]:
    return {PREFIX + k: v.clone().contiguous() for k, v in model.state_dict().items()}


def write_sd(model: Model, path, metadata=None):
    """An SD single file (``.safetensors`` with ``metadata``, or a ``.ckpt``) holding ``model``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = sd_state(model) | {"first_stage_model.decoder.conv_in.bias": torch.zeros(4)}
    if path.suffix == ".safetensors":
        save_file(state, path, metadata=metadata)
    else:
        torch.save({"state_dict": state, "global_step": 1}, path)
    return path


def finishes(fn, timeout: float = 20.0) -> str:
    """Run ``fn`` in a forked child and return what it raised (``"Type: message"``, or "" if
    nothing); fail if it is still running after ``timeout`` seconds, killing it. (A thread
    would not do: a read blocked in native code can hold the GIL, and the test with it.)"""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once, running no cleanup of the parent's
        try:
            fn()
            message = ""
        except BaseException as e:  # handed to the parent
            message = f"{type(e).__name__}: {e}"
        os.write(write_end, message.encode()[:60000])
        os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"still running after {timeout} s")
        return os.read(read_end, 65536).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)


# ---------------------------------------------------------------------------- #3: metadata


def test_config_in_a_single_files_metadata_is_used(tmp_path):
    """What sd-train writes: an SD single file carrying each component's config in its
    metadata; here one that the shapes cannot tell (see ``UNINFERABLE``)."""
    model = random_model(UNINFERABLE)
    config = json.dumps(dataclasses.asdict(UNINFERABLE))
    path = tmp_path / "model.safetensors"
    write_sd(model, path, metadata={METADATA_KEY: config, "other.config": "{}"})
    for source in (path, load_state_dict(path)):
        loaded = Model.from_checkpoint(source)
        assert loaded.config == UNINFERABLE
        assert_same_weights(loaded, model)


@pytest.mark.parametrize("text, field", BAD_METADATA)
def test_bad_config_metadata_is_one_clear_error(tiny, tmp_path, text, field):
    path = write_sd(tiny, tmp_path / "model.safetensors", metadata={METADATA_KEY: text})
    with pytest.raises(CheckpointError, match=field) as info:
        Model.from_checkpoint(path)
    assert str(path) in str(info.value) and f"{METADATA_KEY!r} metadata" in str(info.value)


# ---------------------------------------------------------------------------- #4: real .ckpt


def lightning_checkpoint(state: dict, path, marker) -> dict[str, types.ModuleType]:
    """A checkpoint as PyTorch Lightning writes one: a `ModelCheckpoint` callback, an
    `AttributeDict` of hyper-parameters, numpy scalars and arrays, optimizer and loop state
    beside the `state_dict`. The Lightning classes exist only while pickling (stand-ins in
    sys.modules); unpickling them for real would create ``marker``."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks",
             "pytorch_lightning.callbacks.model_checkpoint", "pytorch_lightning.utilities",
             "pytorch_lightning.utilities.parsing"]  # fmt: skip
    modules = {name: types.ModuleType(name) for name in names}

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_score, self.kth = "val/loss", torch.tensor(0.25), {}

        def __setstate__(self, state):
            open(marker, "w").close()
            self.__dict__.update(state)

    class AttributeDict(dict):
        pass

    for cls, module in [(ModelCheckpoint, names[2]), (AttributeDict, names[4])]:
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(modules[module], cls.__name__, cls)
    saved = {k: sys.modules.get(k) for k in names}
    sys.modules.update(modules)
    try:
        torch.save(
            {
                "epoch": 6,
                "global_step": np.int64(840000),
                "pytorch-lightning_version": "1.4.2",
                "state_dict": OrderedDict(state),
                "callbacks": {ModelCheckpoint: ModelCheckpoint().__dict__, "cb": ModelCheckpoint()},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}],
                "lr_schedulers": [],
                "hyper_parameters": AttributeDict(lr=np.float64(1e-4), betas=np.array([0.9, 0.99])),
                "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 7}}}},
                "hparams": argparse.Namespace(base_learning_rate=1e-4),  # older Lightning
                "dtypes": [np.dtype("float32"), {1, 2}, frozenset(), complex(1, 2), b"\x00"],
            },
            path,
        )
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return modules


def test_a_lightning_checkpoint_loads_and_runs_nothing(tiny, tmp_path, monkeypatch):
    marker = tmp_path / "lightning-code-ran"
    path = tmp_path / "sd.ckpt"
    lightning_checkpoint(sd_state(tiny), path, marker)
    # an importable "pytorch_lightning" whose import would leave a mark: it is never imported
    fake = tmp_path / "site" / "pytorch_lightning"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    assert_same_weights(Model.from_checkpoint(path), tiny)
    state = load_state_dict(path)
    assert sorted(state) == sorted(sd_state(tiny))
    assert not marker.exists()
    assert "pytorch_lightning" not in sys.modules


def test_the_lightning_checkpoint_is_live(tiny, tmp_path, monkeypatch):
    """torch's own safe load refuses such a file, and an unrestricted one runs its classes'
    code once they are importable (so the test above can fail)."""
    marker = tmp_path / "lightning-code-ran"
    path = tmp_path / "sd.ckpt"
    modules = lightning_checkpoint(sd_state(tiny), path, marker)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    torch.load(path, weights_only=False)
    assert marker.exists()


class _Reduce:
    """Unpickling this calls ``fn(*args)``."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def calls(marker) -> dict:
    """Calls that create ``marker``, by name: what a malicious pickle would run."""
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": _Reduce(os.system, (f"touch {marker}",)),
        "builtins.eval": _Reduce(eval, (code,)),
        "builtins.exec": _Reduce(exec, (code,)),
        "subprocess.check_call": _Reduce(subprocess.check_call, (["touch", str(marker)],)),
        "functools.partial of os.system": _Reduce(
            functools.partial(os.system, f"touch {marker}"), ()
        ),
    }


def hand_written(marker) -> dict:
    """The same, as pickle opcodes written by hand (GLOBAL, MARK/TUPLE, REDUCE)."""
    cmd = f"touch {marker}".encode()
    code = f"open({str(marker)!r}, 'w').close()".encode()
    return {
        "GLOBAL os system, REDUCE": b"cos\nsystem\n(S'" + cmd + b"'\ntR.",
        "GLOBAL posix system, protocol 2": b"\x80\x02cposix\nsystem\nq\x00X"
        + len(cmd).to_bytes(4, "little")
        + cmd
        + b"\x85R.",
        "GLOBAL builtins eval": b"cbuiltins\neval\n(S'" + code + b"'\ntR.",
        "GLOBAL __builtin__ exec": b"c__builtin__\nexec\n(S'" + code + b"'\ntR.",
        "getattr to reach os.system": b"cbuiltins\ngetattr\n(cos\nsystem\nS'x'\ntR.",
    }


@pytest.mark.parametrize("name", [*calls("m"), *hand_written("m")])
def test_the_payloads_are_live(tmp_path, name):
    """Each payload does run its code under a plain unpickle (so the tests below can fail)."""
    marker = tmp_path / "code-ran"
    data = {k: pickle.dumps(v) for k, v in calls(marker).items()} | hand_written(marker)
    if name.startswith("getattr"):  # it reaches os.system through a global the loader refuses
        with pytest.raises(AttributeError):
            pickle.loads(data[name])
        return
    pickle.loads(data[name])
    assert marker.exists()


@pytest.mark.parametrize("name", list(hand_written("m")))
def test_a_hand_written_pickle_that_would_run_code_is_refused(tmp_path, name):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(hand_written(marker)[name])
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused to load: .*refused global"):
        Model.from_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", list(calls("m")))
@pytest.mark.parametrize("container", ["torch.save", "lightning checkpoint", "load_state_dict"])
def test_a_checkpoint_that_would_run_code_is_refused(tiny, tmp_path, name, container):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    state = sd_state(tiny) | {"ema": calls(marker)[name]}
    if container == "lightning checkpoint":
        lightning_checkpoint(state, path, tmp_path / "unused")
    else:
        torch.save({"state_dict": state, "global_step": 1}, path)
    load = load_state_dict if container == "load_state_dict" else Model.from_checkpoint
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused to load: .*refused global"):
        load(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------- #13: messages


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_are_not_reported_as_code(tmp_path, seed):
    path = tmp_path / "noise.ckpt"
    path.write_bytes(random.Random(seed).randbytes(4096))
    with pytest.raises(CheckpointError) as info:
        Model.from_checkpoint(path)
    assert "not a readable checkpoint" in str(info.value)
    assert "run code" not in str(info.value)


@pytest.mark.parametrize("data", [b"c\xff\xfe \x01\n\x00\x9c\n.", b"c3 4\n%%\n.", b"c\n\n."])
def test_garbage_after_a_global_opcode_is_not_reported_as_code(tmp_path, data):
    path = tmp_path / "noise.ckpt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        Model.from_checkpoint(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_an_unreadable_file_says_so(tiny, tmp_path, monkeypatch, suffix):
    """A file this process may not read (chmod 000 for a user who is not root; root reads any
    file, so the denial is simulated where Python first opens it, as the OS would refuse it)."""
    path = write_sd(tiny, tmp_path / f"sd{suffix}")
    if os.geteuid() != 0:
        path.chmod(0)
    else:
        real_open = open

        def denying_open(file, *args, **kwargs):
            if os.fspath(file) == str(path):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr("builtins.open", denying_open)
    with pytest.raises(CheckpointError) as info:
        Model.from_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "Permission denied" in message
    assert "No such file" not in message and "truncated" not in message


def test_a_file_in_a_folder_that_cannot_be_searched_says_so(tiny, tmp_path, monkeypatch):
    """A folder on the way without search permission (for root, which may search any, the
    denial is simulated where the path is first looked at): not "no such file"."""
    path = write_sd(tiny, tmp_path / "locked" / "sd.safetensors")
    real_stat = os.stat

    def denying_stat(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(file, *args, **kwargs)

    if os.geteuid() != 0:
        path.parent.chmod(0o600)
    else:
        monkeypatch.setattr("os.stat", denying_stat)
    try:
        with pytest.raises(CheckpointError, match=r"cannot read it \(Permission denied") as info:
            Model.from_checkpoint(path)
    finally:
        path.parent.chmod(0o755)
    assert str(path) in str(info.value) and "No such file" not in str(info.value)


def test_a_full_disk_while_saving_names_the_file_and_leaves_nothing(tiny, tmp_path):
    """A write that fails part way (the file-size limit stands in for a full disk: both are
    an OSError from write) raises an OSError naming the file, and leaves no partial file."""
    path = tmp_path / "out" / "model.safetensors"
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, old_limit[1]))
    try:
        with pytest.raises(OSError, match=re.escape(str(path))):
            tiny.save(path)
        if hasattr(tiny, "save_diffusers"):
            with pytest.raises(OSError, match=re.escape(str(tmp_path / "folder"))):
                tiny.save_diffusers(tmp_path / "folder")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert list(path.parent.iterdir()) == []
    assert not (tmp_path / "folder").exists() or list((tmp_path / "folder").iterdir()) == []


def test_dtype_none_gives_float32_for_every_tensor(tiny, tmp_path):
    """A file with a float16 / float64 mix, loaded with dtype=None (under a float64 default
    dtype too): every floating tensor comes out float32, in all three components."""
    state = sd_state(tiny)
    for i, key in enumerate(sorted(state)):
        state[key] = state[key].to(torch.float16 if i % 2 else torch.float64)
    path = tmp_path / "mixed.safetensors"
    save_file(state, path)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        loaded = Model.from_checkpoint(path)
    finally:
        torch.set_default_dtype(previous)
    dtypes = {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()}
    assert dtypes == {torch.float32}


# ---------------------------------------------------------------------------- #6: special files


def _fifo(path):
    os.mkfifo(path)
    return path


def _socket(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    return path


def _link(target):
    def make(path):
        path.symlink_to(target)
        return path

    return make


SPECIAL = {
    "FIFO .safetensors": ("model.safetensors", _fifo, "FIFO"),
    "FIFO .ckpt": ("model.ckpt", _fifo, "FIFO"),
    "FIFO, no suffix": ("model", _fifo, "FIFO"),
    "socket": ("model.ckpt", _socket, "socket"),
    "/dev/zero as .safetensors": ("model.safetensors", _link("/dev/zero"), "character device"),
    "/dev/urandom as .ckpt": ("model.ckpt", _link("/dev/urandom"), "character device"),
    "/dev/zero, no suffix": ("model", _link("/dev/zero"), "character device"),
}


@pytest.mark.parametrize("case", SPECIAL)
def test_a_special_file_is_refused_at_once(tmp_path, case):
    name, make, kind = SPECIAL[case]
    path = make(tmp_path / name)
    error = finishes(lambda: Model.from_checkpoint(path))
    assert error.startswith("CheckpointError: "), error
    assert f"is a {kind}, not a regular file" in error


@pytest.mark.parametrize("which", ["config.json", WEIGHTS])
def test_a_special_file_in_a_diffusers_folder_is_refused(tiny, tmp_path, which):
    folder = tmp_path / FOLDER
    save_folder(tiny, folder)
    (folder / which).unlink()
    _fifo(folder / which)
    error = finishes(lambda: Model.from_checkpoint(folder))
    assert error.startswith("CheckpointError: "), error
    assert f"{which}: is a FIFO" in error


# ---------------------------------------------------------------------------- #8, #10: config.json


@pytest.mark.parametrize("field, value, expected", BAD_CONFIG_JSON)
def test_a_bad_config_json_value_is_one_clear_error(tiny, tmp_path, field, value, expected):
    folder = tmp_path / FOLDER
    save_folder(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"config.json: {field}.*{expected}"):
        Model.from_checkpoint(folder)


@pytest.mark.parametrize("text", ["[1, 2]", '"unet"', "{", "\xff"])
def test_a_config_json_that_is_not_an_object(tiny, tmp_path, text):
    folder = tmp_path / FOLDER
    save_folder(tiny, folder)
    (folder / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=r"config\.json: "):
        Model.from_checkpoint(folder)


def test_a_huge_config_json_is_not_parsed(tiny, tmp_path):
    folder = tmp_path / FOLDER
    save_folder(tiny, folder)
    (folder / "config.json").write_text('{"a": "' + "x" * (2 << 20) + '"}')
    with pytest.raises(CheckpointError, match=r"config\.json: over 1048576 bytes"):
        Model.from_checkpoint(folder)


def test_a_config_given_is_used_instead_of_the_config_json(tiny, tmp_path):
    """The way past the limits: ``config=`` is used as it is, and config.json is not read."""
    folder = tmp_path / FOLDER
    save_folder(tiny, folder)
    (folder / "config.json").write_text('{"sample_size": 1000000, "in_channels": "x"}')
    assert_same_weights(Model.from_checkpoint(folder, config=tiny.config), tiny)

"""``sd-serve`` started for real, as a subprocess on a free loopback port, on tiny random-weight
checkpoints written here (sd-pipeline's ``random_tiny``, saved in the SD single-file layout)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from sd_pipeline import StableDiffusion
from sd_pipeline.pipeline import random_tiny

# The machine is shared and small: one thread per test process leaves the cores to the server.
torch.set_num_threads(1)

STARTUP_TIMEOUT = 120  # seconds: importing torch and loading a model on a busy 2-core machine


@dataclass
class RunningServer:
    host: str
    port: int
    process: subprocess.Popen
    log: Path
    auth: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self, **options) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=120, **options)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    """The installed ``sd-serve`` script beside this Python, else the module (same code)."""
    script = Path(sys.executable).with_name("sd-serve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sd_server"]


def start_server(tmp: Path, *args: str, auth: tuple[str, str] | None = None) -> RunningServer:
    port = free_port()
    log = tmp / f"server-{port}.log"
    command = [*serve_command(), "--port", str(port), "--outdir", str(tmp / "outputs"), *args]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
    server = RunningServer("127.0.0.1", port, process, log, auth)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sd-serve exited with {process.returncode}:\n{server.output()}")
        try:
            if httpx.get(f"{server.url}/internal/ping", auth=auth, timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"sd-serve did not answer in {STARTUP_TIMEOUT} s:\n{server.output()}")


def wait_for(predicate, timeout=60.0, every=0.05):
    """``predicate()``'s first true value, polled until ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def stop_server(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def _write_controlnet(path: Path, pipe) -> None:
    """A random ControlNet that fits the tiny model (zero convolutions random too)."""
    import dataclasses

    from sd_controlnet import ControlNet, ControlNetConfig

    unet = pipe.unet.config
    config = dataclasses.replace(ControlNetConfig.tiny(), context_dim=unet.context_dim,
                                 num_heads=unet.num_heads)  # fmt: skip
    g = torch.Generator().manual_seed(3)
    model = ControlNet(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g)
                * (0.3 / p[0].numel() ** 0.5 if p.ndim > 1 else 0.02)
            )
    model.save(path)


def _write_lora(path: Path, pipe) -> None:
    """A kohya LoRA on the model's own (CompVis) attention names, as AUTOMATIC1111-era files."""
    from safetensors.torch import save_file
    from torch import nn

    g = torch.Generator().manual_seed(1)
    state = {}
    for prefix, model in (("lora_unet_", pipe.unet), ("lora_te_", pipe.text_encoder)):
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name.endswith(("to_q", "q_proj")):
                key = prefix + name.replace(".", "_")
                state[f"{key}.lora_down.weight"] = torch.randn(2, m.in_features, generator=g)
                state[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 2, generator=g)
                state[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(state, str(path))


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny checkpoints (different random weights), a LoRA and an embedding file."""
    root = tmp_path_factory.mktemp("models")
    (root / "models").mkdir()
    (root / "loras").mkdir()
    (root / "embeddings").mkdir()
    (root / "controlnet").mkdir()
    tiny = random_tiny(seed=0)
    main = tiny.save(root / "tiny.safetensors")
    other = random_tiny(seed=1).save(root / "models" / "other.safetensors")
    _write_lora(root / "loras" / "style.safetensors", tiny)
    _write_controlnet(root / "controlnet" / "control_tiny.safetensors", tiny)
    width = tiny.text_encoder.config.width
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(2))
    torch.save({"string_to_param": {"*": vectors}, "name": "badhands"},
               root / "embeddings" / "badhands.pt")  # fmt: skip
    return {"main": main, "other": other, "root": root}


@pytest.fixture(scope="session")
def server(models, tmp_path_factory):
    """The server most tests share: the tiny model, a models folder, LoRAs and embeddings."""
    root = models["root"]
    running = start_server(
        tmp_path_factory.mktemp("server"),
        "--checkpoint", str(models["main"]),
        "--models-dir", str(root / "models"),
        "--lora-dir", str(root / "loras"),
        "--embeddings", str(root / "embeddings"),
        "--controlnet-dir", str(root / "controlnet"),
        "--max-body-mb", "4",
    )  # fmt: skip
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def guarded(models, tmp_path_factory):
    """A server that wants credentials and lets one job wait behind the running one."""
    running = start_server(
        tmp_path_factory.mktemp("guarded"),
        "--checkpoint", str(models["main"]), "--api-auth", "alice:secret,bob:hunter2",
        "--queue-size", "1", auth=("alice", "secret"),
    )  # fmt: skip
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def pipe(models) -> StableDiffusion:
    """The same checkpoint, loaded here: what the server's answers are checked against."""
    return StableDiffusion.from_checkpoint(models["main"], device="cpu")


def chromium() -> str | None:
    """Debian's chromium (``apt-get install -y chromium``); Playwright never downloads one."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # requests (inside webuiapi) and httpx would send 127.0.0.1 through a configured proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


os.environ.setdefault("PYTHONUNBUFFERED", "1")

"""AUTOMATIC1111's ControlNet extension API: ``alwayson_scripts.controlnet.args`` (what
``webuiapi.ControlNetUnit`` sends) turned into sd-pipeline's ControlNet units, and its
``/controlnet/model_list`` / ``/controlnet/module_list``."""

from __future__ import annotations

import dataclasses
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd_pipeline.controlnet import ControlUnit
from sd_server.images import BadInput, decode_image

__all__ = ["PREPROCESSOR_NAMES", "ControlNetFile", "ControlNets"]

SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
# The extension writes a model as "name [hash]"; the name is the file's stem.
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]+\]$")
# The extension's control modes by number, as webuiapi may send them.
CONTROL_MODES = {0: "balanced", 1: "prompt", 2: "control"}
RESIZE_MODES = {0: "just_resize", 1: "crop_and_resize", 2: "resize_and_fill"}


def preprocessor_names() -> list[str]:
    from sd_controlnet import PREPROCESSORS

    return list(PREPROCESSORS)


PREPROCESSOR_NAMES = preprocessor_names()


@dataclass(frozen=True)
class ControlNetFile:
    """A unit's ControlNet named by its file, for a worker process to load onto its own
    device (what a request carries to a :class:`sd_server.pool.WorkerPool`)."""

    path: Path


class ControlNets:
    """The ControlNet files of ``--controlnet-dir``, each loaded once, when first asked for.

    ``by_file``: units carry a :class:`ControlNetFile` instead of the weights (the server's
    worker processes load them with :meth:`attach`, each on its device)."""

    def __init__(self, folder: Path | None, *, by_file: bool = False):
        self.folder = folder
        self.by_file = by_file
        self._loaded: dict[tuple[Path, str, str], Any] = {}
        self._lock = threading.Lock()

    def files(self) -> list[Path]:
        if self.folder is None:
            return []
        return sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in SUFFIXES)

    def names(self) -> list[str]:
        return [p.stem for p in self.files()]

    def load(self, name: str, pipe, field: str):
        """The ControlNet ``name`` for ``pipe`` (a pipeline or its ModelInfo)."""
        stem = _HASH_SUFFIX.sub("", name.strip())
        path = next((p for p in self.files() if p.stem == stem), None)
        if path is None:
            known = ", ".join(self.names()) or "none (start sd-serve with --controlnet-dir)"
            raise BadInput(field, f"ControlNet model {name!r} not found; available: {known}")
        if self.by_file:
            return ControlNetFile(path)
        return self._model(path, pipe, field)

    def attach(self, request, pipe):
        """``request`` with each unit's :class:`ControlNetFile` replaced by the ControlNet,
        loaded onto ``pipe``'s device (in a worker process)."""
        units = tuple(
            dataclasses.replace(u, model=self._model(u.model.path, pipe, "ControlNet"))
            if isinstance(u.model, ControlNetFile) else u
            for u in request.controls
        )  # fmt: skip
        return dataclasses.replace(request, controls=units) if units else request

    def _model(self, path: Path, pipe, field: str):
        from sd_controlnet import ControlNet

        key = (path, str(pipe.device), str(pipe.dtype))
        with self._lock:
            if key not in self._loaded:
                try:
                    model = ControlNet.from_checkpoint(path, device=pipe.device, dtype=pipe.dtype)
                except ValueError as e:
                    raise BadInput(field, str(e)) from None
                model.name = path.stem
                self._loaded = {key: model}  # one set of weights at a time per server
            return self._loaded[key]

    def units(self, scripts: Any, pipe, warnings: list[str]) -> tuple[ControlUnit, ...]:
        """The enabled units of ``alwayson_scripts`` (its ``controlnet`` entry)."""
        if not isinstance(scripts, dict):
            return ()
        entry = scripts.get("controlnet") or scripts.get("ControlNet")
        if entry is None:
            return ()
        args = entry.get("args") if isinstance(entry, dict) else None
        if not isinstance(args, list):
            raise BadInput("alwayson_scripts.controlnet.args", "must be a list of units")
        units = []
        for i, raw in enumerate(args):
            field = f"alwayson_scripts.controlnet.args[{i}]"
            if not isinstance(raw, dict):
                raise BadInput(field, "must be an object (a ControlNet unit)")
            if raw.get("enabled", True) is False or raw.get("model") in (None, "", "None"):
                continue
            units.append(self._unit(raw, field, pipe, warnings))
        return tuple(units)

    def _unit(self, raw: dict, field: str, pipe, warnings: list[str]) -> ControlUnit:
        image = raw.get("input_image", raw.get("image"))
        if image in (None, ""):
            raise BadInput(f"{field}.input_image", "is needed (the control image)")
        module = str(raw.get("module", "none") or "none")
        params = {}
        for key in ("processor_res", "threshold_a", "threshold_b"):
            if raw.get(key) not in (None, -1):
                params[key] = raw[key]
        for ignored in ("lowvram", "low_vram", "pixel_perfect", "mask"):
            if raw.get(ignored):
                warnings.append(f"{field}.{ignored} is not supported and was ignored")
        try:
            return ControlUnit(
                self.load(str(raw["model"]), pipe, f"{field}.model"),
                decode_image(image, f"{field}.input_image"),
                weight=float(raw.get("weight", 1.0)),
                start=float(raw.get("guidance_start", 0.0)),
                end=float(raw.get("guidance_end", 1.0)),
                mode=CONTROL_MODES.get(raw.get("control_mode"), raw.get("control_mode", 0)),
                resize_mode=RESIZE_MODES.get(raw.get("resize_mode"),
                                             raw.get("resize_mode", "crop_and_resize")),
                preprocessor=module,
                preprocessor_params=params,
            )  # fmt: skip
        except (TypeError, ValueError) as e:
            raise BadInput(field, str(e)) from None

"""A LoRA file: read once, then merged into a model's weights or applied on the fly.

    lora = LoRA.from_file("style.safetensors")
    lora.merge(unet, weight=0.8)         # into the weights: no cost per step
    lora.merge(text_encoder, weight=0.5)
    lora.unmerge(unet)                   # the original weights back, bit for bit
    lora.attach(unet, weight=0.8)        # or on the fly, the weights untouched
    lora.detach(unet)

``merge`` keeps a reference to each weight it replaces (it writes a new tensor into the
parameter instead of changing the old one in place), so ``unmerge`` restores the very tensors
the model had. Several LoRAs may be merged or attached at once, each with its own weight;
unmerging one of several restores the originals and merges the others again, so the result
never depends on the order of unmerges.

``merge(..., in_place=True)`` is the other way (diffusers' ``fuse_lora``): the update is added
into the weights' own memory and ``unmerge`` subtracts it again in float32. No second copy of
the adapted weights and no fresh memory to fault in (where memory is scarce that can cost as
much as the merge's arithmetic), for an unmerge equal to the originals to float32 rounding
instead of bit for bit. The weights merged in place are the base the kept-copy merges start
from.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from sd_lora import attached, names
from sd_lora.layers import ALIASES, PARAMS, Layer, LoRAError, Scratch

logger = logging.getLogger(__name__)

_SUFFIXES = sorted([*PARAMS, *ALIASES], key=len, reverse=True)
_COMPONENTS = (  # a layer name's prefix -> the model part it adapts
    ("lora_unet_", "unet"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te_", "te"),
    ("unet.", "unet"),
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te"),
)
_PICKLES = (".pt", ".ckpt", ".pth", ".bin")


@dataclass
class _State:
    """What sd-lora has done to one model: kept original weights, merged and attached LoRAs."""

    originals: dict[tuple[int, str], tuple[nn.Parameter, torch.Tensor]] = field(
        default_factory=dict
    )
    merged: list[tuple[LoRA, float]] = field(default_factory=list)  # in the order merged
    in_place: set[int] = field(default_factory=set)  # ids of the merged LoRAs added in place
    attached: dict[int, tuple[LoRA, float, list]] = field(default_factory=dict)
    # merged weights taken out again, kept for the next merge to write into: their memory is
    # touched already, where a fresh tensor's first write page-faults (where memory is scarce,
    # as slow as the merge's arithmetic). Released by remove_all.
    spare: dict[tuple, list[torch.Tensor]] = field(default_factory=dict)

    def take_spare(self, like: torch.Tensor) -> torch.Tensor | None:
        found = self.spare.get(_spare_key(like, torch.is_inference_mode_enabled()))
        return found.pop() if found else None

    def keep_spare(self, t: torch.Tensor) -> None:
        self.spare.setdefault(_spare_key(t), []).append(t)


def _spare_key(t: torch.Tensor, inference: bool | None = None) -> tuple:
    # a tensor made under torch.inference_mode can be written in place only there (and a
    # tensor written there is one, outside it): each kind is kept for its own mode
    inference = t.is_inference() if inference is None else inference
    return tuple(t.shape), t.stride(), t.dtype, t.device, inference


_STATES: weakref.WeakKeyDictionary[nn.Module, _State] = weakref.WeakKeyDictionary()


def _state(root: nn.Module) -> _State:
    if root not in _STATES:
        _STATES[root] = _State()
    return _STATES[root]


class LoRA:
    """The layers of one LoRA / LyCORIS file, keyed by their names in the file."""

    def __init__(self, layers: list[Layer], metadata: dict[str, str] | None = None,
                 name: str = "lora"):  # fmt: skip
        self.layers = {layer.name: layer for layer in layers}
        self.metadata = dict(metadata or {})
        self.name = name

    def __repr__(self):
        kinds = Counter(layer.kind for layer in self.layers.values())
        return f"LoRA({self.name!r}, {len(self.layers)} layers, {dict(kinds)}, rank={self.rank})"

    # -----------------------------------------------------------------------------------------
    # Reading

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> LoRA:
        """A LoRA from a ``.safetensors`` file (or a ``.pt``/``.ckpt`` pickle, opened with
        ``weights_only=True``). Raises LoRAError naming any key it cannot use."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such LoRA file")
        if path.suffix.lower() == ".safetensors":
            tensors, metadata = _read_safetensors(path)
        elif path.suffix.lower() in _PICKLES:
            tensors, metadata = _read_pickle(path), {}
        else:
            raise LoRAError(f"{path}: not a LoRA file; expected .safetensors (or .pt / .ckpt)")
        return cls.from_state_dict(tensors, metadata, name=path.stem, source=str(path))

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], metadata: dict | None = None,
                        name: str = "lora", source: str | None = None) -> LoRA:  # fmt: skip
        """A LoRA from a file's tensors (kohya, LyCORIS or diffusers/PEFT names)."""
        source = source or name
        groups: dict[str, dict[str, torch.Tensor]] = {}
        unknown = []
        for key, tensor in tensors.items():
            layer, param = _split_key(key)
            if layer is None:
                unknown.append(key)
            else:
                groups.setdefault(layer, {})[param] = tensor
        layers, unsupported = [], []
        peft = _peft_config(metadata or {}, source)
        for layer_name, group in groups.items():
            component, path = _component(layer_name)
            if component is None:
                unknown.extend(f"{layer_name}.{p}" for p in group)
                continue
            if peft and "alpha" not in group and "lora_down.weight" in group:
                group.update(_peft_alpha(peft, layer_name, path, group["lora_down.weight"]))
            try:
                layers.append(Layer(layer_name, component, path, group))
            except LoRAError as e:
                unsupported.append(str(e))
        if unknown:
            raise LoRAError(
                f"{source}: {len(unknown)} keys that are not LoRA / LyCORIS tensors of a Stable "
                f"Diffusion UNet or text encoder: {_some(unknown)} (expected lora_unet_* / "
                "lora_te_* with .lora_down.weight, .hada_w1_a, .lokr_w1, .diff, ... or "
                "unet.* / text_encoder.* with .lora_A.weight / .lora_B.weight)"
            )
        if unsupported:
            raise LoRAError(f"{source}: {len(unsupported)} unsupported layers: {unsupported[0]}")
        if not layers:
            raise LoRAError(f"{source}: no LoRA layers in this file")
        return cls(layers, metadata, name)

    # -----------------------------------------------------------------------------------------
    # What it holds

    def keys(self) -> list[str]:
        """The names of its layers, as in the file (without the tensor suffixes)."""
        return list(self.layers)

    @property
    def rank(self) -> int | None:
        """The rank most of its layers have (kohya's ``network_dim``); None if none has one."""
        ranks = [layer.rank for layer in self.layers.values() if layer.rank is not None]
        return Counter(ranks).most_common(1)[0][0] if ranks else None

    @property
    def alpha(self) -> float | None:
        """The alpha most of its layers have (kohya's ``network_alpha``); None if none has one."""
        alphas = [layer.alpha for layer in self.layers.values() if layer.alpha is not None]
        return Counter(alphas).most_common(1)[0][0] if alphas else None

    def components(self) -> set[str]:
        """The model parts it adapts: "unet", "te" (and SDXL's "te1", "te2")."""
        return {layer.component for layer in self.layers.values()}

    # -----------------------------------------------------------------------------------------
    # Applying

    def targets(self, root: nn.Module) -> list[tuple[Layer, nn.Module]]:
        """Its layers for ``root`` (a UNet or a text encoder), each with the module it adapts.

        An SDXL model's parts take their layers (``lora_te1_``/``text_encoder.`` CLIP-L,
        ``lora_te2_``/``text_encoder_2.`` bigG: see ``names.sdxl_part``). Raises LoRAError for
        a LoRA of another architecture: an SDXL one on an SD 1.x/2.x model, or layers this
        model does not have."""
        kind, found = names.index(root)
        base = self.metadata.get("ss_base_model_version", "") + self.metadata.get(
            "modelspec.architecture", ""
        )
        part = names.sdxl_part(root)  # None: an SD 1.x/2.x model
        sdxl = {"te1", "te2"} & self.components() or "sdxl" in base or "-xl-" in base
        if sdxl and part is None:
            raise LoRAError(
                f"{self.name}: an SDXL LoRA (lora_te1_/lora_te2_ keys for its two text encoders, "
                "or SDXL in its metadata); this model is SD 1.x/2.x"
            )
        wanted = (kind,) if part is None else names.SDXL_COMPONENTS[part]
        modules = dict(root.named_modules())
        pairs, missing = [], []
        for layer in self.layers.values():
            if layer.component not in wanted:
                continue
            path = found.get(names.flat(_rename_processor(layer.path)))
            if path is None:
                missing.append(layer.name)
            else:
                pairs.append((layer, modules[path]))
        if missing:
            what = "UNet" if kind == "unet" else "text encoder"
            raise LoRAError(
                f"{self.name}: {len(missing)} of its layers are not in this {what}: "
                f"{_some(missing)} (a LoRA for another architecture, e.g. SDXL or SD 2.x?)"
            )
        return pairs

    def merge(self, module: nn.Module, weight: float = 1.0, *, in_place: bool = False) -> None:
        """Add its update, times ``weight``, to the weights of ``module`` (a UNet or a text
        encoder). Computed in float32 and rounded once into the weights' dtype. Merging a LoRA
        that is already merged changes its weight.

        ``in_place=True``: added into the weights' own memory, for ``unmerge`` to subtract
        again (the module docstring); float32 weights only, and not IA3 or DoRA layers (they
        scale the weight: subtracting would not undo them). Anything else holding those
        tensors (a ``state_dict()`` taken before) sees the change."""
        weight = _check_weight(weight)
        state = _state(module)
        if any(lora is self for lora, _ in state.merged):
            if not in_place and id(self) not in state.in_place:  # rebuilt: bit for bit
                state.merged = [(lo, weight if lo is self else w) for lo, w in state.merged]
                _rebuild(module, state)
                return
            self.unmerge(module)  # out at its old weight, in again below
        pairs = self.targets(module)  # every check first: a bad LoRA changes nothing
        if not pairs:  # e.g. a UNet-only LoRA given the text encoder: nothing of it is here
            logger.debug("%s: no layers for this %s", self.name, type(module).__name__)
            return
        if in_place:
            _add_in_place(module, pairs, weight, state)
            state.in_place.add(id(self))
        else:
            _merge(pairs, weight, state)
        state.merged.append((self, weight))

    def unmerge(self, module: nn.Module) -> None:
        """Take it out of the weights of ``module``: the weights it changed are the original
        tensors again (bit for bit), with any other merged LoRA merged again. One merged
        ``in_place`` is subtracted: the weights equal the originals to float32 rounding."""
        state = _state(module)
        if not any(lora is self for lora, _ in state.merged):
            raise LoRAError(f"{self.name}: not merged into this {type(module).__name__}")
        weight = next(w for lo, w in state.merged if lo is self)
        state.merged = [(lo, w) for lo, w in state.merged if lo is not self]
        if id(self) in state.in_place:
            state.in_place.discard(id(self))
            _add_in_place(module, self.targets(module), -weight, state)
        else:
            _rebuild(module, state)

    def attach(self, module: nn.Module, weight: float = 1.0) -> None:
        """Apply it on the fly, the weights untouched (switch LoRAs between images without
        touching the weights): each adapted layer adds its update at every call, beside the
        layer or folded into the weight it computes with, whichever costs less at that call's
        size (see ``sd_lora.attached``). Attaching it again changes its weight."""
        weight = _check_weight(weight)
        key = id(self)
        applies = [attached.attach(layer, target, weight, (key, layer.name))
                   for layer, target in self.targets(module)]  # fmt: skip
        state = _state(module)
        if key in state.attached:
            self.detach(module)
        if applies:
            state.attached[key] = (self, weight, [apply() for apply in applies])

    def detach(self, module: nn.Module) -> None:
        """Take it off ``module`` again: the hooks and folded forwards ``attach`` put there."""
        state = _state(module)
        if id(self) not in state.attached:
            raise LoRAError(f"{self.name}: not attached to this {type(module).__name__}")
        for handle in state.attached.pop(id(self))[2]:
            handle.remove()


def applied(module: nn.Module) -> list[tuple[LoRA, float, str]]:
    """The LoRAs on ``module``: (LoRA, weight, "merged" or "attached"), in the order applied."""
    state = _STATES.get(module)
    if state is None:
        return []
    merged = [(lora, w, "merged") for lora, w in state.merged]
    return merged + [(lora, w, "attached") for lora, w, _ in state.attached.values()]


def remove_all(module: nn.Module) -> None:
    """Unmerge and detach every LoRA from ``module``: its original weights back, no hooks."""
    state = _STATES.get(module)
    if state is None:
        return
    for lora, _, _ in list(state.attached.values()):
        lora.detach(module)
    # the kept-copy merges out first (the kept originals back: they hold the in-place updates),
    # so that subtracting each in-place one has no kept-copy merge to make again on top
    state.merged = [(lora, w) for lora, w in state.merged if id(lora) in state.in_place]
    _rebuild(module, state)
    for lora, _ in reversed(state.merged):
        lora.unmerge(module)
    state.spare.clear()


# ---------------------------------------------------------------------------------------------
# Merging


@torch.no_grad()
def _merge(pairs: list[tuple[Layer, nn.Module]], weight: float, state: _State) -> None:
    updates, scratch = [], Scratch()
    for layer, target in pairs:  # compute every update before writing any
        w = target.weight
        new = layer.merged(w, weight, state.take_spare(w), scratch)
        updates.append((layer, target, "weight", new))
        bias = layer.bias_delta()
        if bias is not None:
            b = getattr(target, "bias", None)
            if b is None:
                raise LoRAError(f"{layer.name}: a bias update (diff_b) for a layer without one")
            new = (b.float() + bias.to(b.device) * weight).to(b.dtype)
            updates.append((layer, target, "bias", new))
    for layer, _, _, new in updates:  # float32 cannot overflow from the finite factors checked
        if torch.finfo(new.dtype).bits < 32 and not torch.isfinite(new).all():
            raise LoRAError(
                f"{layer.name}: merging at weight {weight} gives values beyond {new.dtype}'s "
                "range (merge into float32 weights, or use a smaller weight)"
            )
    for _, target, name, new in updates:
        param = getattr(target, name)
        if id(param) not in state.originals:
            state.originals[id(param)] = (param, param.data)
        param.data = new


@torch.no_grad()
def _rebuild(root: nn.Module, state: _State) -> None:
    """The original weights, then each still-merged LoRA merged again in its order."""
    for param, original in state.originals.values():
        if param.data.data_ptr() != original.data_ptr():  # a merged tensor: its memory is reused
            state.keep_spare(param.data)
        same = original.device == param.device and original.dtype == param.dtype
        param.data = original if same else original.to(param.device, param.dtype)
    state.originals.clear()
    for lora, weight in state.merged:
        if id(lora) not in state.in_place:  # those are in the originals already
            _merge(lora.targets(root), weight, state)


@torch.no_grad()
def _add_in_place(root: nn.Module, pairs: list[tuple[Layer, nn.Module]], weight: float,
                  state: _State) -> None:  # fmt: skip
    """Each layer's update times ``weight`` added into its weights' memory (a negative weight
    takes it out). Where a kept-copy merge is on top, the update goes into the kept original
    and the kept-copy merges are made again on it. A layer that does not fit (a LoRA of
    another model) raises after the ones before it are taken out again."""
    for layer, target in pairs:  # what can be checked without arithmetic, before any change
        tensors = [target.weight] + ([target.bias] if "diff_b" in layer.tensors else [])
        if any(t is None or t.dtype != torch.float32 for t in tensors):
            dtype = target.weight.dtype
            raise LoRAError(
                f"{layer.name}: an in-place merge needs float32 weights (subtracting the update "
                f"from {dtype} ones would not give them back); merge it without in_place"
            )
        if not layer.additive:
            raise LoRAError(
                f"{layer.name}: an {'IA3' if layer.kind == 'ia3' else 'DoRA'} layer scales the "
                "weight, so subtracting cannot undo it; merge it without in_place"
            )

    def base(param: nn.Parameter) -> torch.Tensor:
        kept = state.originals.get(id(param))
        return param.data if kept is None else kept[1]

    def add(layer: Layer, target: nn.Module, w: float) -> None:
        layer.add_to(base(target.weight), w, scratch)
        bias = layer.bias_delta()
        if bias is not None:
            base(target.bias).add_(bias.to(target.bias.device), alpha=w)

    done, scratch = [], Scratch()
    try:
        for layer, target in pairs:
            add(layer, target, weight)
            done.append((layer, target))
    except (LoRAError, RuntimeError):
        for layer, target in reversed(done):
            add(layer, target, -weight)
        raise
    if any(id(target.weight) in state.originals for _, target in pairs):
        _rebuild(root, state)


# ---------------------------------------------------------------------------------------------
# Files and names


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise LoRAError(f"{path}: not a readable .safetensors file ({e})") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; each means the same here
        raise LoRAError(
            f"{path}: cannot be opened safely (weights_only=True): {str(e).splitlines()[0]}"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LoRAError(f"{path}: not a LoRA file (expected a dict of tensors)")
    return data


def _split_key(key: str) -> tuple[str | None, str]:
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], ALIASES.get(suffix, suffix)
    return None, ""


def _component(layer: str) -> tuple[str | None, str]:
    layer = layer.removeprefix("base_model.model.")  # a PEFT model saved whole
    for prefix, component in _COMPONENTS:
        if layer.startswith(prefix):
            return component, layer[len(prefix) :]
    return None, layer


def _peft_config(metadata: dict, source: str) -> dict:
    """The PEFT LoraConfig values diffusers records in a file's metadata ({"unet.r": 4,
    "unet.lora_alpha": 8, "unet.alpha_pattern": {...}, "text_encoder.r": ...}); {} if none."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        config = json.loads(text)
    except ValueError:
        raise LoRAError(f"{source}: its lora_adapter_metadata is not JSON") from None
    return config if isinstance(config, dict) else {}


def _peft_alpha(config: dict, layer_name: str, path: str, down: torch.Tensor) -> dict:
    """A PEFT layer's alpha as a kohya ``alpha`` tensor: lora_alpha, or its alpha_pattern entry
    (with use_rslora, the ``scale`` alpha / sqrt(rank) instead); {} where the metadata says
    nothing about the layer's part (PEFT's default alpha is the rank: scale 1)."""
    part = layer_name.removeprefix("base_model.model.").split(".")[0]
    alpha = config.get(f"{part}.lora_alpha")
    if alpha is None:
        return {}
    for pattern, value in (config.get(f"{part}.alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", path):  # PEFT's own matching rule
            alpha = value
            break
    if config.get(f"{part}.use_rslora"):
        return {"scale": torch.tensor(alpha / math.sqrt(down.shape[0]))}
    return {"alpha": torch.tensor(float(alpha))}


def _rename_processor(path: str) -> str:
    """Old diffusers attention processors: ``attn1.processor.to_q_lora`` adapts ``attn1.to_q``,
    ``to_out_lora`` adapts ``to_out.0``."""
    if ".processor." not in path or not path.endswith("_lora"):
        return path
    head, _, proj = path.rpartition(".processor.")
    proj = proj.removesuffix("_lora")
    return f"{head}.{'to_out.0' if proj == 'to_out' else proj}"


def _check_weight(weight: float) -> float:
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
    ):
        raise ValueError(f"LoRA weight must be a finite number; got {weight!r}")
    return float(weight)


def _some(items: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")

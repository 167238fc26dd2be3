"""Trainable LoRA adapters: low-rank layers beside a frozen model's own, saved in kohya's layout.

    network = inject(unet, rank=8, alpha=4.0, targets="attention")      # the UNet's layers
    inject(text_encoder, rank=8, alpha=4.0, network=network)           # and the text encoder's
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)        # only the adapters train
    ...
    network.save("style.safetensors")   # lora_unet_* / lora_te_* keys, as kohya_ss writes them

Each adapted layer gets a :class:`LoRALayer` (``lora_down``: the layer's input to ``rank``
channels, with the layer's own kernel, stride and padding for a convolution; ``lora_up``: 1x1 back
to its output) whose output, times ``alpha / rank``, a forward hook adds to the layer's output.
``lora_up`` starts at zero (as kohya's and PEFT's), so the injected model starts as the model.

The network's own ``state_dict()`` is the kohya file: its children are named as kohya names the
layers (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``: the diffusers
module path, derived by :mod:`sd_lora.names`; ``lora_te_text_model_encoder_layers_0_...``), each
with ``lora_down.weight``, ``lora_up.weight`` and ``alpha``. AUTOMATIC1111, ComfyUI, diffusers'
``load_lora_weights`` and :meth:`sd_lora.LoRA.from_file` read it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from sd_lora import names
from sd_lora.layers import LoRAError
from sd_lora.lora import LoRA

__all__ = ["TARGETS", "LoRALayer", "LoRANetwork", "inject"]

# Which layers a network adapts (kohya's names for the same choices in brackets):
# - attention: the attention projections (q, k, v, out) of the UNet's transformers and of the
#   text encoder's layers;
# - transformer: every linear and 1x1 conv layer of those transformers, their feed-forward and
#   proj_in / proj_out too (kohya's default "networks.lora" targets);
# - all: also the ResBlocks' convolutions and time projections and the up/downsamplers (LoCon:
#   kohya's conv_dim), every linear and conv layer of the UNet's blocks.
TARGETS = ("attention", "transformer", "all")
_ATTENTION = (".to_q", ".to_k", ".to_v", ".to_out.0", ".q_proj", ".k_proj", ".v_proj", ".out_proj")
_UNET_BLOCKS = ("input_blocks.", "middle_block.", "output_blocks.")
_PREFIX = {"unet": "lora_unet_", "te": "lora_te_"}


class LoRALayer(nn.Module):
    """``alpha / rank * up(down(x))`` for one linear or conv layer: what the hook adds."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise LoRAError(f"a grouped convolution ({base}) cannot take a LoRA")
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride,
                                       base.padding, base.dilation, bias=False)  # fmt: skip
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = alpha / rank

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """kohya's (and PEFT's) start: ``down`` as a default layer's weight, ``up`` zero."""
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x)) * self.scale


class LoRANetwork(nn.Module):
    """The adapters of one or more models, as children named by their kohya layer names, so
    that ``state_dict()`` is a kohya LoRA file's tensors."""

    def __init__(self):
        super().__init__()
        self.settings: dict[str, object] = {}
        self._hooks: list = []

    def layer_names(self) -> list[str]:
        return [name for name, _ in self.named_children()]

    def remove(self) -> None:
        """Take the hooks off the adapted models (the adapters' weights stay here)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def metadata(self) -> dict[str, str]:
        """kohya's ``ss_network_*`` metadata for this network (strings, as safetensors holds)."""
        meta = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(self.settings.get("rank")),
            "ss_network_alpha": str(self.settings.get("alpha")),
            "ss_base_model_version": "sd_v1",
            "ss_v2": "False",
        }
        args = {"targets": self.settings.get("targets")}
        if any(isinstance(m.lora_down, nn.Conv2d) and m.lora_down.kernel_size != (1, 1)
               for m in self.children()):  # fmt: skip
            args.update(conv_dim=meta["ss_network_dim"], conv_alpha=meta["ss_network_alpha"])
        meta["ss_network_args"] = json.dumps(args)
        return meta

    def kohya_state_dict(self, overrides: dict[str, torch.Tensor] | None = None) -> dict:
        """The tensors of the kohya file on the CPU, contiguous (``overrides``: other values for
        some keys, an EMA's weights say)."""
        overrides = overrides or {}
        return {k: overrides.get(k, v).detach().cpu().contiguous()
                for k, v in self.state_dict().items()}  # fmt: skip

    def to_lora(self, name: str = "lora") -> LoRA:
        """The adapters as a :class:`~sd_lora.LoRA`, to merge or attach elsewhere."""
        return LoRA.from_state_dict(self.kohya_state_dict(), self.metadata(), name=name)

    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
        """Write the kohya ``.safetensors`` file atomically (a temporary file renamed): a
        file at ``path`` is always complete."""
        path = Path(path)
        meta = {**self.metadata(), **(metadata or {})}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(self.kohya_state_dict(), tmp, meta)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _wanted(kind: str, path: str, module: nn.Module, targets: str) -> bool:
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return False
    if kind == "te":
        return ".self_attn." in path or (targets != "attention" and ".mlp." in path)
    if not path.startswith(_UNET_BLOCKS) or path == "input_blocks.0.0":  # conv_in stays
        return False
    if targets == "attention":
        return ".transformer_blocks." in path and path.endswith(_ATTENTION)
    if targets == "transformer":
        one_by_one = not isinstance(module, nn.Conv2d) or module.kernel_size == (1, 1)
        in_transformer = ".transformer_blocks." in path or path.endswith((".proj_in", ".proj_out"))
        return in_transformer and one_by_one
    return True


def _kohya_names(kind: str, root: nn.Module, paths: list[str]) -> dict[str, str]:
    if kind == "unet":
        owners = [n for n, m in root.named_modules() if next(m.parameters(False), None) is not None]
        theirs = names.unet_diffusers_names(owners)  # the same set names.index works from
        return {p: _PREFIX[kind] + names.flat(theirs[p]) for p in paths}
    return {
        p: _PREFIX[kind] + "text_model_" + names.flat(p.removeprefix("text_model.")) for p in paths
    }


def inject(module: nn.Module, rank: int = 4, alpha: float = 1.0, targets: str = "attention",
           network: LoRANetwork | None = None,
           generator: torch.Generator | None = None) -> LoRANetwork:  # fmt: skip
    """Add trainable LoRA adapters to ``module`` (a UNet with CompVis names or a CLIP text
    encoder with transformers names) and return the network holding them (``network``, when
    given, gets these layers too: one network, one file, for the UNet and the text encoder).

    The module's own weights are left as they are (freeze them: only ``network.parameters()``
    belong in the optimizer). The adapters are float32 on the device of the layers they adapt;
    ``generator`` seeds their initial ``lora_down`` weights."""
    if targets not in TARGETS:
        raise LoRAError(f"unknown LoRA targets {targets!r}; choose from: {', '.join(TARGETS)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoRAError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise LoRAError(f"LoRA alpha must be a positive number, got {alpha!r}")
    network = LoRANetwork() if network is None else network
    kind = names.kind_of_model(module)
    chosen = {p: m for p, m in module.named_modules() if _wanted(kind, p, m, targets)}
    if not chosen:
        raise LoRAError(f"{type(module).__name__} has no layers for LoRA targets {targets!r}")
    for path, key in _kohya_names(kind, module, list(chosen)).items():
        if hasattr(network, key):
            raise LoRAError(f"{key}: this layer has a LoRA adapter already (injected twice?)")
        base = chosen[path]
        layer = LoRALayer(base, rank, alpha).to(base.weight.device)
        layer.reset_parameters(generator)
        network.add_module(key, layer)
        network._hooks.append(base.register_forward_hook(_adder(layer)))
    network.settings.update(rank=rank, alpha=alpha, targets=targets)
    return network


def _adder(layer: LoRALayer):
    def hook(module, inputs, output):
        return output + layer(inputs[0]).to(output.dtype)

    return hook

"""The UNet's architecture as a frozen dataclass: the CompVis config's terms, the presets
(SD 1.x, SD 2.x, SDXL base and refiner, tiny test sizes) and what the model derives from it
(heads per level, the time embedding's width, the family)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UNetConfig:
    """The UNet's architecture, in the CompVis config's terms (``model.params.unet_config``)."""

    in_channels: int = 4  # 9 for the inpainting UNet: latents, mask, masked-image latents
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors with attention
    num_heads: int = 8  # SD 1.x: a fixed number of heads per level ...
    num_head_channels: int = -1  # ... SD 2.x: a fixed head width (64), so heads vary per level
    # Transformer blocks per SpatialTransformer: one number for every level with attention, or
    # one per level (SDXL: (0, 2, 10)); None is 1. Stored as a number where the levels with
    # attention agree, else one per level with 0 where a level has none (so configs compare).
    transformer_depth: int | tuple[int, ...] | None = None
    transformer_depth_middle: int | None = None  # None: the deepest level's (SGM's default)
    context_dim: int = 768  # CLIP ViT-L/14 text width; 1024 for SD 2.x's OpenCLIP ViT-H/14
    use_linear_in_transformer: bool = False  # SD 2.x: linear proj_in/proj_out, not 1x1 convs
    norm_groups: int = 32
    # SDXL's added conditioning (label_emb): 2816 = 1280 (pooled OpenCLIP bigG text embedding)
    # + 6 x 256 (sizes and crop) for the base model, 2560 = 1280 + 5 x 256 (sizes, crop and
    # aesthetic score) for the refiner; 0 for SD 1.x/2.x, which have none.
    adm_in_channels: int = 0

    def __post_init__(self):
        if (self.num_heads == -1) == (self.num_head_channels == -1):
            raise ValueError(
                "set exactly one of num_heads (SD 1.x: 8) and num_head_channels (SD 2.x: 64), "
                f"the other to -1; got num_heads={self.num_heads}, "
                f"num_head_channels={self.num_head_channels}"
            )
        for mult in self.channel_mult:
            channels = self.model_channels * mult
            if channels % self.norm_groups:
                raise ValueError(
                    f"model_channels * channel_mult = {channels} is not a multiple of "
                    f"norm_groups={self.norm_groups}"
                )
        if not _is_int(self.adm_in_channels) or self.adm_in_channels < 0:
            raise ValueError(f"adm_in_channels must be 0 or more, got {self.adm_in_channels!r}")
        # (4, 2, 1) in the CompVis yaml, (1, 2, 4) from the weights: one order, so they compare
        object.__setattr__(self, "attention_resolutions", tuple(sorted(self.attention_resolutions)))
        self._normalize_depths()

    def _normalize_depths(self):
        """Check the depths, and store them in the one form that makes equal configs compare
        equal (a file's config, a preset's, one inferred from the weights)."""
        depth, levels = self.transformer_depth, len(self.channel_mult)
        depth = 1 if depth is None else depth
        per_level = [depth] * levels if _is_int(depth) else depth
        if not isinstance(per_level, list | tuple) or len(per_level) != levels:
            raise ValueError(
                f"transformer_depth must be a number or one per level ({levels}), got {depth!r}"
            )
        attention = [2**level in self.attention_resolutions for level in range(levels)]
        for d in per_level:
            if not _is_int(d) or not 0 <= d <= 1024:
                raise ValueError(
                    f"transformer_depth {depth!r}: each must be a whole number, 0 to 1024"
                )
        used = [d for d, a in zip(per_level, attention) if a]
        if 0 in used:
            raise ValueError(
                f"transformer_depth {depth!r} is 0 at a level with attention "
                f"(attention_resolutions={self.attention_resolutions})"
            )
        middle = self.transformer_depth_middle
        middle = (used[-1] if used else per_level[-1]) if middle is None else middle
        if not _is_int(middle) or not 1 <= middle <= 1024:
            raise ValueError(f"transformer_depth_middle must be 1 or more, got {middle!r}")
        if len(set(used)) <= 1:
            depth = used[0] if used else 1
        else:
            depth = tuple(d if a else 0 for d, a in zip(per_level, attention))
        object.__setattr__(self, "transformer_depth", depth)
        object.__setattr__(self, "transformer_depth_middle", middle)

    @classmethod
    def sd15(cls) -> UNetConfig:
        """Stable Diffusion 1.x (also 1.4 and 1.5)."""
        return cls()

    @classmethod
    def sd2(cls) -> UNetConfig:
        """Stable Diffusion 2.x: 64-wide heads, linear projections, 1024-wide context."""
        return cls(num_heads=-1, num_head_channels=64, context_dim=1024,
                   use_linear_in_transformer=True)  # fmt: skip

    @classmethod
    def sdxl(cls) -> UNetConfig:
        """SDXL base (SGM's ``sd_xl_base.yaml``): three levels, attention on the last two with
        2 and 10 transformer blocks, 2048-wide context (CLIP-L and OpenCLIP bigG side by side),
        the added conditioning of 2816 numbers."""
        return cls(channel_mult=(1, 2, 4), attention_resolutions=(2, 4), num_heads=-1,
                   num_head_channels=64, transformer_depth=(0, 2, 10), context_dim=2048,
                   use_linear_in_transformer=True, adm_in_channels=2816)  # fmt: skip

    @classmethod
    def sdxl_refiner(cls) -> UNetConfig:
        """The SDXL refiner (``sd_xl_refiner.yaml``): 384 channels, four levels, attention on the
        middle two (4 blocks each), OpenCLIP bigG's 1280-wide context, 2560 added numbers."""
        return cls(model_channels=384, attention_resolutions=(2, 4), num_heads=-1,
                   num_head_channels=64, transformer_depth=4, context_dim=1280,
                   use_linear_in_transformer=True, adm_in_channels=2560)  # fmt: skip

    @classmethod
    def tiny_sdxl(cls) -> UNetConfig:
        """A small UNet of SDXL's shape, for tests: no attention at the first level, depths 1 and
        2 after it, 64-wide heads (two per level), a 32-wide pooled embedding + 6 x 256 size numbers."""
        return cls(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                   attention_resolutions=(2, 4), num_heads=-1, num_head_channels=64,
                   transformer_depth=(0, 1, 2), context_dim=48, use_linear_in_transformer=True,
                   adm_in_channels=32 + 6 * 256)  # fmt: skip

    @classmethod
    def tiny_sdxl_refiner(cls) -> UNetConfig:
        """A small UNet of the refiner's shape: four levels, attention on the middle two, a
        32-wide pooled embedding + 5 x 256 numbers (sizes, crop, aesthetic score)."""
        return cls(model_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                   attention_resolutions=(2, 4), num_heads=-1, num_head_channels=64,
                   transformer_depth=2, context_dim=32, use_linear_in_transformer=True,
                   adm_in_channels=32 + 5 * 256)  # fmt: skip

    @classmethod
    def tiny(cls) -> UNetConfig:
        """A small UNet of the same shape, for tests: three levels, attention on the first two."""
        return cls(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                   attention_resolutions=(1, 2), context_dim=32)  # fmt: skip

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def depth(self, level: int) -> int:
        """Transformer blocks per SpatialTransformer at ``level`` (0 where it has none)."""
        if 2**level not in self.attention_resolutions:
            return 0
        d = self.transformer_depth
        return d if _is_int(d) else d[level]

    @property
    def family(self) -> str:
        """Which model this is shaped like, for a caller choosing text encoders and conditioning:
        "sdxl-refiner" (added conditioning = its context's width + 5 x 256: the refiner's pooled
        embedding is its context's width), "sdxl" (other added conditioning), "sd2" (1024-wide
        context) or "sd1"."""
        if self.adm_in_channels:
            refiner = self.adm_in_channels == self.context_dim + 5 * 256
            return "sdxl-refiner" if refiner else "sdxl"
        return "sd2" if self.context_dim == 1024 else "sd1"

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) of a transformer over ``channels`` channels."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

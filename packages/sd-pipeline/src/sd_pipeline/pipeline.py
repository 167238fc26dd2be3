"""Stable Diffusion composed from its four parts: txt2img, img2img and inpainting.

    text  --CLIPTokenizer--> ids --CLIPTextModel--> context (B, 77, 768)
    noise --sample(sampler, UNet(x_t, t, context) with guidance)--> latents --VAE decode--> image

Each part comes from its own package (sd-clip, sd-unet, sd-vae, sd-samplers); this module only
joins them: prompt handling, classifier-free guidance, seeds, image/mask preparation, device and
precision placement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sd_clip import CLIPTextModel, CLIPTokenizer
from sd_pipeline import allocator
from sd_pipeline.images import (
    ImageLike,
    mask_to_tensor,
    pil_to_tensor,
    tensor_to_pil,
    to_mask,
    to_pil,
)
from sd_pipeline.metadata import GenerationParameters, model_hash
from sd_samplers import SAMPLERS, BrownianTreeNoise, GaussianNoise, NoiseSchedule, sample
from sd_unet import UNet, compile_frozen
from sd_vae import AutoencoderKL

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# SD 1.x was trained at 512x512 (v1-inference.yaml: image_size 64 latents x 8).
SD1_NATIVE_SIZE = 512
# Above this many pixels per side the VAE works in tiles (when tiling is left automatic).
AUTO_TILE_ABOVE = 1024
AUTO_TILE_SIZE = 512
# What txt2img/img2img/inpaint use when these are not given: AUTOMATIC1111's defaults, unless
# the model file names others (the bundled model does; see PIPELINE_METADATA).
GENERATION_DEFAULTS = {"steps": 20, "guidance_scale": 7.5, "sampler": "euler_a"}

OutputType = str  # "pil" | "tensor" (B, 3, H, W) in [-1, 1] | "latent" (scaled latents)


class StableDiffusion:
    """A text-to-image latent diffusion model: tokenizer, text encoder, UNet, VAE and schedule.

    Build it with :meth:`from_checkpoint` (an SD 1.x file or a diffusers model root),
    :meth:`from_components` (parts you built) or :meth:`default` (the bundled small model).

    ``offload=True`` keeps every part on the CPU and moves each to ``device`` only while it runs
    (slower, but the GPU holds one part at a time). ``vae_tiling``: ``None`` tiles the VAE for
    images larger than 1024 px a side, ``True`` always, ``False`` never; ``vae_tile_size`` is the
    tile side in pixels. ``defaults``: the ``steps``, ``guidance_scale`` and ``sampler`` used
    when a call leaves them out (read from the model file where it names them).
    """

    # On the CPU the first generation makes glibc keep freed blocks for reuse, process-wide (see
    # sd_pipeline.allocator: SD 1.5 steps stop faulting 3 GB of fresh pages each); set False
    # before generating to leave the process's allocator as it is.
    keep_freed_memory: bool = True

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        unet: UNet,
        tokenizer: CLIPTokenizer | None = None,
        schedule: NoiseSchedule | None = None,
        *,
        prediction: str = "epsilon",
        native_size: int = SD1_NATIVE_SIZE,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        offload: bool = False,
        vae_tiling: bool | None = None,
        vae_tile_size: int = AUTO_TILE_SIZE,
        name: str | None = None,
        source: Path | None = None,
        defaults: Mapping[str, Any] | None = None,
    ):
        self.vae, self.text_encoder, self.unet = vae, text_encoder, unet
        self.tokenizer = tokenizer or CLIPTokenizer(max_length=_max_positions(text_encoder))
        self.schedule = schedule or NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
        self.prediction = prediction
        self.native_size = native_size
        self.device = torch.device(device) if device is not None else _default_device()
        self.dtype = dtype or torch.float32
        self.offload = offload
        self.vae_tiling, self.vae_tile_size = vae_tiling, vae_tile_size
        self.name, self.source = name, source
        self.defaults = {**GENERATION_DEFAULTS, **(defaults or {})}
        self._hash: str | None = None
        self._compiled_unet: Callable | None = None  # see compile()
        _check_dtype(self.dtype, self.device)
        # The modules are the caller's: left in the mode, device and dtype they come in (the
        # loaders below place what they load; see _take).

    def _take(self) -> StableDiffusion:
        """Freeze the parts this class loaded itself and put them on its device and dtype."""
        for module in self._modules():
            module.eval().requires_grad_(False)
            module.to(device="cpu" if self.offload else self.device, dtype=self.dtype)
        return self

    # construction

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        vae: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **options,
    ) -> StableDiffusion:
        """Load an SD 1.x checkpoint: a single ``.safetensors``/``.ckpt`` file or a diffusers
        model root (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``).

        Each part reads only its own tensors (lazily from safetensors). ``vae``: a separate VAE
        file or folder that replaces the built-in one. A 9-channel (inpainting) UNet is detected
        from its weights. ``options`` go to the constructor (``offload``, ``vae_tiling``, ...).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
        if vae is not None and not Path(vae).exists():
            raise FileNotFoundError(f"{vae}: no such VAE file or folder")
        dtype = resolve_dtype(dtype)
        load = {"device": "cpu", "dtype": dtype}
        unet = UNet.from_checkpoint(path, **load)
        text_encoder = CLIPTextModel.from_checkpoint(path, **load)
        autoencoder = AutoencoderKL.from_checkpoint(vae if vae is not None else path, **load)
        options.setdefault("name", path.stem if path.is_file() else path.name)
        options.setdefault("source", path)
        if path.is_dir():
            options = {**_diffusers_root_options(path, autoencoder), **options}
        else:
            options = {**_file_options(path), **options}
        return cls(autoencoder, text_encoder, unet, device=device, dtype=dtype, **options)._take()

    @classmethod
    def from_components(
        cls,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        unet: UNet,
        tokenizer: CLIPTokenizer | None = None,
        schedule: NoiseSchedule | None = None,
        **options,
    ) -> StableDiffusion:
        """Join parts you built yourself (the tokenizer defaults to the bundled CLIP one, the
        schedule to SD 1.x's); ``options`` as in the constructor (``native_size``, ``device``,
        ``dtype``, ``prediction``, ...)."""
        return cls(vae, text_encoder, unet, tokenizer, schedule, **options)

    @classmethod
    def default(
        cls, *, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
    ) -> StableDiffusion:
        """The small model bundled with this package (``sd_pipeline/weights/``): offline, CPU.

        If the package holds no bundled weights, a tiny model with random weights is returned
        instead and a warning is logged: it runs, but its pictures are noise.
        """
        path = bundled_checkpoint()
        if path is not None:
            return cls.from_checkpoint(path, device=device, dtype=dtype, name="sd-pipeline-shapes")
        logger.warning(
            "sd_pipeline has no bundled weights in %s: using a tiny model with RANDOM weights "
            "(its images are noise); pass a checkpoint for real pictures",
            WEIGHTS_DIR,
        )
        return random_tiny(device=device, dtype=resolve_dtype(dtype))

    # the three tasks

    @torch.inference_mode()
    def txt2img(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 1,
        latents: torch.Tensor | None = None,
        callback: Callable[[dict], None] | None = None,
        progress: bool = True,
        clip_skip: int | None = None,
        output_type: OutputType = "pil",
        **sampler_options,
    ) -> list[Image.Image] | torch.Tensor:
        """Images from text. ``prompt``: one text or a list (``batch_size`` images of each).

        ``seed``: image i of the output uses ``seed + i`` (random when None), so a batch repeats
        single runs. ``latents``: the standard-normal starting noise (B, 4, h, w), overriding the
        seed. ``callback`` gets sd-samplers' per-step dict (``x``, ``i``, ``sigma``,
        ``denoised``). ``clip_skip=2`` conditions on CLIP's penultimate layer.
        """
        return self._generate(locals(), init=None, mask=None, strength=1.0, mask_blur=0.0)

    @torch.inference_mode()
    def img2img(
        self,
        prompt: str | Sequence[str],
        image: ImageLike,
        negative_prompt: str | Sequence[str] = "",
        *,
        strength: float = 0.6,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 1,
        latents: torch.Tensor | None = None,
        callback: Callable[[dict], None] | None = None,
        progress: bool = True,
        clip_skip: int | None = None,
        output_type: OutputType = "pil",
        **sampler_options,
    ) -> list[Image.Image] | torch.Tensor:
        """Images from text and a starting image, noised to depth ``strength`` (0 returns the
        image's VAE round trip, 1 ignores it). The image is resized to ``width`` x ``height``
        when given; otherwise its own size must be a multiple of 8. Other arguments as txt2img.
        """
        return self._generate(locals(), init=image, mask=None, strength=strength, mask_blur=0.0)

    @torch.inference_mode()
    def inpaint(
        self,
        prompt: str | Sequence[str],
        image: ImageLike,
        mask: ImageLike,
        negative_prompt: str | Sequence[str] = "",
        *,
        strength: float = 1.0,
        mask_blur: float = 0.0,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 1,
        latents: torch.Tensor | None = None,
        callback: Callable[[dict], None] | None = None,
        progress: bool = True,
        clip_skip: int | None = None,
        output_type: OutputType = "pil",
        **sampler_options,
    ) -> list[Image.Image] | torch.Tensor:
        """Repaint the white part of ``mask`` (same size as ``image``, greyscale-convertible).

        A 9-channel inpainting UNet is conditioned on the mask and the masked image's latents,
        as it was trained. An ordinary UNet keeps the unmasked region by latent blending: at
        every step its latents there are replaced by the image's latents noised to that step,
        and at the end by the clean latents, so unmasked pixels change only by the VAE round
        trip. ``mask_blur`` (pixels, Gaussian) softens the mask edge; without it the mask is
        binarised at 0.5.
        """
        return self._generate(
            locals(), init=image, mask=mask, strength=strength, mask_blur=mask_blur
        )

    # properties

    @property
    def is_inpainting_model(self) -> bool:
        """True for a 9-channel UNet (latents + mask + masked-image latents)."""
        return _unet_in_channels(self.unet) == 2 * _latent_channels(self.vae) + 1

    @property
    def model_hash(self) -> str | None:
        """AUTOMATIC1111's ``Model hash``: the first 10 hex digits of the file's SHA-256
        (cached on disk across runs: see ``sd_pipeline.metadata.model_hash``)."""
        if self._hash is None and self.source is not None and Path(self.source).is_file():
            self._hash = model_hash(self.source)
        return self._hash

    @property
    def scale(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return self.vae.config.downscale

    # the work

    def _generate(self, args: dict, *, init, mask, strength: float, mask_blur: float):
        args = {
            k: self.defaults[k] if v is None and k in self.defaults else v for k, v in args.items()
        }
        p = self._prepare(args, init, mask, strength, mask_blur)
        if self.keep_freed_memory and self.device.type == "cpu":
            allocator.keep_freed_memory()
        context = self._encode_prompts(p["prompts"], p["negatives"], p["cfg"], args["clip_skip"])
        init_latents = mask_latents = masked_latents = None
        if init is not None:
            init_latents = self._encode_image(p["image"], p["count"])
        if mask is not None:
            mask_latents = self._latent_mask(p["mask"], p["count"])
            if self.is_inpainting_model:
                masked = p["image"] * (p["mask"] < 0.5)
                masked_latents = self._encode_image(masked, p["count"])
        noise = p["noise"].to(self.device)
        with self._on_device(self.unet):
            latents = self._sample(
                p, args, noise, context, init_latents, mask_latents, masked_latents
            )
        if mask is not None and not self.is_inpainting_model:
            latents = mask_latents * latents + (1 - mask_latents) * init_latents
        if args["output_type"] == "latent":
            return latents
        images = self._decode(latents)
        if args["output_type"] == "tensor":
            return images
        if args["output_type"] != "pil":
            raise ValueError(
                f"unknown output_type {args['output_type']!r}; choose from: pil, tensor, latent"
            )
        pictures = tensor_to_pil(images)
        for picture, params in zip(pictures, self._parameters(p, args, strength, init)):
            picture.info["parameters"] = params.to_text()
        return pictures

    def _sample(self, p, args, noise, context, init_latents, mask_latents, masked_latents):
        options = dict(args["sampler_options"])
        if self.prediction != "epsilon":
            options.setdefault("prediction", self.prediction)
        common = dict(steps=args["steps"], callback=args["callback"], progress=args["progress"])
        if init_latents is not None:
            common["strength"] = p["strength"]
        n, generators = p["count"], p["generators"]
        # Image i of a batch must equal a single run with seed + i. Samplers that draw noise
        # while sampling get a noise source made of one source per image, each on its image's
        # generator; the few that take no noise source run one image at a time.
        groups = [slice(0, n)]
        if generators and _draws_noise(args["sampler"], options):
            if "noise_sampler" in _sampler_options(args["sampler"]):
                options.setdefault(
                    "noise_sampler", self._row_noise(args["sampler"], noise, generators)
                )
            else:
                groups = [slice(i, i + 1) for i in range(n)]
        outputs = []
        for rows in groups:
            model = self._guided_model(
                context=_rows(context, rows, n, p["cfg"]),
                scale=args["guidance_scale"],
                cfg=p["cfg"],
                init=None if init_latents is None else init_latents[rows],
                noise=noise[rows],
                mask=None if mask_latents is None else mask_latents[rows],
                masked=None if masked_latents is None else masked_latents[rows],
            )
            if init_latents is not None:
                common["init"] = init_latents[rows]
            generator = generators[rows.start] if generators else None
            x = sample(args["sampler"], model, noise[rows], self.schedule, generator=generator,
                       **common, **options)  # fmt: skip
            outputs.append(x)
        return torch.cat(outputs)

    def _row_noise(self, sampler: str, like: torch.Tensor, generators) -> Callable:
        """noise(sigma, sigma_next) for a batch: row i drawn from image i's generator."""
        rows = [like[i : i + 1] for i in range(len(generators))]
        if "sde" in sampler:  # a Brownian path per image over the schedule's whole sigma range
            lo, hi = self.schedule.sigma_min, self.schedule.sigma_max
            sources = [BrownianTreeNoise(r, lo, hi, g) for r, g in zip(rows, generators)]
        else:
            sources = [GaussianNoise(r, g) for r, g in zip(rows, generators)]
        return lambda sigma, sigma_next: torch.cat([s(sigma, sigma_next) for s in sources])

    def _guided_model(self, *, context, scale, cfg, init, noise, mask, masked):
        """model(x_t, t) for the sampler: the UNet with classifier-free guidance (the
        unconditional and conditional halves in one batch), inpainting conditioning or blending.
        """
        unet = self.unet if self._compiled_unet is None else self._compiled_unet
        dtype, schedule = self.dtype, self.schedule
        blend = mask is not None and masked is None
        extra = None if masked is None else torch.cat([mask, masked], dim=1)

        multiple = 2 ** (len(self.unet.config.channel_mult) - 1)

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1)
            t = t.expand(x.shape[0]) if t.numel() == 1 else t
            if blend:  # keep the unmasked region on the path of the noised original
                alpha_bar = schedule.alpha_bar(t).to(x.device).view(-1, 1, 1, 1)
                known = alpha_bar.sqrt() * init + (1 - alpha_bar).sqrt() * noise
                x = mask * x + (1 - mask) * known
            # With guidance the context has two rows per image, [unconditional; conditional],
            # and the latents one: the UNet runs what the text cannot reach yet once per image.
            x_in = x if extra is None else torch.cat([x, extra], dim=1)
            out = unet(_pad_to(x_in.to(dtype), multiple), t, context)
            out = out[..., : x.shape[-2], : x.shape[-1]].float()
            if not cfg:
                return out
            uncond, cond = out.chunk(2)
            return uncond + scale * (cond - uncond)

        return model

    def _prepare(self, args: dict, init, mask, strength: float, mask_blur: float) -> dict:
        """Check every argument and build what the run needs, before any model runs."""
        sampler_name = args["sampler"]
        check_sampler(sampler_name)
        steps = args["steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        batch_size = args["batch_size"]
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"strength must be in [0, 1] (0 keeps the image), got {strength}")
        if mask_blur < 0:
            raise ValueError(f"mask_blur must be >= 0 pixels, got {mask_blur}")
        prompts = _as_texts(args["prompt"], "prompt")
        negatives = _as_texts(args["negative_prompt"], "negative_prompt")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(
                f"give one negative prompt or one per prompt: got {len(negatives)} negative "
                f"prompts for {len(prompts)} prompts"
            )
        prompts = [p for p in prompts for _ in range(batch_size)]
        negatives = [p for p in negatives for _ in range(batch_size)]
        count = len(prompts)
        image = pil = None
        if init is not None:
            pil = to_pil(init)
        width, height = self._size(args["width"], args["height"], pil)
        tensors = {}
        if pil is not None:
            if pil.size != (width, height):
                pil = pil.resize((width, height), Image.Resampling.LANCZOS)
            image = pil_to_tensor(pil)
        if mask is not None:
            mask_image = to_mask(mask, size=to_pil(init).size)
            if mask_image.size != (width, height):
                mask_image = mask_image.resize((width, height), Image.Resampling.NEAREST)
            tensors["mask"] = mask_to_tensor(mask_image, blur=mask_blur)
        seed = args["seed"]
        latents = args["latents"]
        shape = (count, _latent_channels(self.vae), height // self.scale, width // self.scale)
        generators = []
        if latents is not None:
            latents = torch.as_tensor(latents)
            if tuple(latents.shape) != shape:
                raise ValueError(
                    f"latents must have shape {shape} for {count} image(s) at {width}x{height}, "
                    f"got {tuple(latents.shape)}"
                )
            noise = latents.float().cpu()
            if seed is not None:
                generators = [_generator(seed + i) for i in range(count)]
        else:
            if seed is None:
                seed = random_seed()
            generators = [_generator(seed + i) for i in range(count)]
            # Drawn on the CPU, row by row: the same seed gives the same picture on any device.
            noise = torch.cat([torch.randn(shape[1:], generator=g)[None] for g in generators])
        return dict(
            prompts=prompts,
            negatives=negatives,
            count=count,
            cfg=args["guidance_scale"] != 1.0,
            width=width,
            height=height,
            image=image,
            mask=tensors.get("mask"),
            seed=seed,
            noise=noise,
            generators=generators,
            strength=float(strength),
        )

    def _size(self, width, height, image: Image.Image | None) -> tuple[int, int]:
        if image is not None:
            width = image.size[0] if width is None else width
            height = image.size[1] if height is None else height
        width = self.native_size if width is None else width
        height = self.native_size if height is None else height
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if value % self.scale:
                lo, hi = value // self.scale * self.scale, -(-value // self.scale) * self.scale
                where = " (the image's size; pass width/height to resize it)" if image else ""
                raise ValueError(
                    f"{name} must be a multiple of {self.scale}, got {value}{where}; "
                    f"try {max(lo, self.scale)} or {hi}"
                )
        return width, height

    def _encode_prompts(self, prompts, negatives, cfg: bool, clip_skip: int | None):
        texts = (negatives + prompts) if cfg else prompts
        ids = self.tokenizer(texts).to(self.device)
        with self._on_device(self.text_encoder):
            if clip_skip is None or clip_skip == 1:
                return self.text_encoder(ids)
            return self.text_encoder(ids, clip_skip=clip_skip)

    def _encode_image(self, image: torch.Tensor, count: int) -> torch.Tensor:
        """Scaled latents of one image (the posterior mean), repeated ``count`` times."""
        with self._on_device(self.vae):
            posterior = self.vae.encode(
                image.to(self.device, self.dtype), tile_size=self._tile(image.shape[-2:])
            )
            latents = posterior.mean.float() * self.vae.config.scaling_factor
        return latents.expand(count, -1, -1, -1).contiguous()

    def _latent_mask(self, mask: torch.Tensor, count: int) -> torch.Tensor:
        """The pixel mask at latent resolution: nearest (as diffusers) when binary, area
        average when blurred."""
        h, w = mask.shape[-2] // self.scale, mask.shape[-1] // self.scale
        binary = bool(((mask == 0) | (mask == 1)).all())
        small = torch.nn.functional.interpolate(
            mask, size=(h, w), mode="nearest" if binary else "area"
        )
        return small.to(self.device).expand(count, -1, -1, -1).contiguous()

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self._on_device(self.vae):
            z = latents / self.vae.config.scaling_factor
            size = (z.shape[-2] * self.scale, z.shape[-1] * self.scale)
            return self.vae.decode(z, tile_size=self._tile(size)).float()

    def _tile(self, size) -> int | None:
        tiling = self.vae_tiling
        if tiling is None:
            tiling = max(size) > AUTO_TILE_ABOVE
        return self.vae_tile_size if tiling else None

    def _parameters(self, p: dict, args: dict, strength: float, init) -> list[GenerationParameters]:
        seed = p["seed"]
        return [
            GenerationParameters(
                prompt=prompt,
                negative_prompt=negative,
                steps=args["steps"],
                sampler=args["sampler"],
                cfg_scale=float(args["guidance_scale"]),
                seed=None if seed is None else seed + i,
                width=p["width"],
                height=p["height"],
                model_hash=self.model_hash,
                model=self.name,
                denoising_strength=strength if init is not None else None,
                clip_skip=args["clip_skip"],
            )
            for i, (prompt, negative) in enumerate(zip(p["prompts"], p["negatives"]))
        ]

    # placement

    def _modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.text_encoder, self.unet]

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module):
        """With offloading, move ``module`` to the device for the duration of the block."""
        if not self.offload:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")

    def compile(self, mode: str | None = None) -> StableDiffusion:
        """Run the UNet through ``torch.compile`` from now on; returns self.

        Inductor compiles it with *freezing* (``sd_unet.compile_frozen``): the weights become
        constants of the compiled graph, so their layouts are prepared once (oneDNN's blocked
        convolution weights on the CPU) and the element-wise work around them (GroupNorm + SiLU,
        GEGLU, residual adds) is fused; the prepared weights are a second copy beside the
        UNet's own (SD 1.5: +3.4 GB in float32). The first generation pays the compilation (a
        minute or more on a small CPU; inductor caches it on disk for later runs); a new image
        size or batch size compiles again. ``mode`` is ``torch.compile``'s (e.g.
        ``"max-autotune"``, or ``"reduce-overhead"`` for CUDA graphs on a GPU). Moving or
        casting the pipeline (``to``) drops the compiled UNet: call ``compile`` again after it.
        Not with ``offload=True`` (the weights must stay put).
        """
        if self.offload:
            raise ValueError(
                "compile() needs the UNet to stay on its device: not with offload=True"
            )
        self._compiled_unet = compile_frozen(self.unet, mode=mode)
        return self

    def to(self, device: str | torch.device | None = None, dtype=None) -> StableDiffusion:
        """Move (and cast) every part; returns self. Drops a compiled UNet (see ``compile``)."""
        self._compiled_unet = None
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = resolve_dtype(dtype)
        _check_dtype(self.dtype, self.device)
        for module in self._modules():
            module.to(device="cpu" if self.offload else self.device, dtype=self.dtype)
        return self

    def __repr__(self) -> str:
        kind = "inpainting" if self.is_inpainting_model else "txt2img"
        return (
            f"StableDiffusion({self.name or 'unnamed'}, {kind}, native {self.native_size}px, "
            f"device={self.device}, dtype={self.dtype})"
        )


# helpers


def check_sampler(name: str) -> None:
    """Raise a ValueError listing the valid names if ``name`` is not a sampler of sd-samplers."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from: {', '.join(SAMPLERS)}")


def random_seed() -> int:
    """A fresh seed in [0, 2**32) from the OS's entropy (not torch's global generator)."""
    return int.from_bytes(os.urandom(4), "little")


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or a name (``float16``, ``fp16``, ``bf16``, ...)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from: float32, float16, bfloat16")
    return _DTYPES[dtype]


def bundled_checkpoint() -> Path | None:
    """The bundled model's weight file (or diffusers folder) under ``sd_pipeline/weights/``."""
    if not WEIGHTS_DIR.is_dir():
        return None
    if (WEIGHTS_DIR / "unet").is_dir():
        return WEIGHTS_DIR
    files = sorted(WEIGHTS_DIR.glob("*.safetensors"))
    full = [f for f in files if not f.stem.startswith(("vae", "text", "unet"))]
    return (full or files or [None])[0]


def random_tiny(
    *, device: str | torch.device | None = None, dtype: torch.dtype | None = None, seed: int = 0
) -> StableDiffusion:
    """A tiny SD-shaped model with random weights (each part's ``tiny()`` config): for tests
    and for running without weights. Its images are noise."""
    from sd_clip import CLIPTextConfig
    from sd_unet import UNetConfig
    from sd_vae import AutoencoderKLConfig

    text_config = CLIPTextConfig.tiny()
    unet_config = dataclasses.replace(UNetConfig.tiny(), context_dim=text_config.width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(AutoencoderKLConfig.tiny())
        text_encoder = CLIPTextModel(text_config)
        unet = UNet(unet_config)
    return StableDiffusion(
        vae, text_encoder, unet, native_size=64, device=device, dtype=dtype, name="random-tiny"
    )._take()


def _diffusers_root_options(root: Path, vae: AutoencoderKL) -> dict:
    """Tokenizer, schedule, prediction type and native size from a diffusers model root."""
    import json

    options: dict = {}
    tokenizer = root / "tokenizer"
    if (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file():
        options["tokenizer"] = CLIPTokenizer.from_files(
            tokenizer / "vocab.json", tokenizer / "merges.txt"
        )
    scheduler = root / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        config = json.loads(scheduler.read_text())
        kind = config.get("beta_schedule", "scaled_linear")
        start, end = config.get("beta_start", 0.00085), config.get("beta_end", 0.012)
        steps = config.get("num_train_timesteps", 1000)
        if kind == "scaled_linear":
            options["schedule"] = NoiseSchedule.scaled_linear(start, end, steps)
        elif kind == "linear":
            options["schedule"] = NoiseSchedule.linear(start, end, steps)
        elif kind == "squaredcos_cap_v2":
            options["schedule"] = NoiseSchedule.cosine(steps)
        else:
            raise ValueError(f"{scheduler}: unsupported beta_schedule {kind!r}")
        prediction = config.get("prediction_type", "epsilon")
        options["prediction"] = "v" if prediction == "v_prediction" else prediction
    unet_config = root / "unet" / "config.json"
    if unet_config.is_file():
        sample_size = json.loads(unet_config.read_text()).get("sample_size")
        if isinstance(sample_size, int):
            options["native_size"] = sample_size * vae.config.downscale
    return options


# Where a checkpoint written by sd-pipeline's training keeps its pipeline settings (a JSON
# object in the safetensors header: resolution, prediction, schedule, and the generation
# defaults that suit the model: steps, sampler, guidance_scale).
PIPELINE_METADATA = "sd_pipeline.config"


def _file_options(path: Path) -> dict:
    """Native size, prediction type and schedule stored in a safetensors file's metadata."""
    import json

    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(PIPELINE_METADATA)
    except Exception:  # the component loaders already read this file: they report errors
        return {}
    if not text:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: unreadable {PIPELINE_METADATA} metadata ({e})") from e
    options: dict = {}
    defaults = {k: config[k] for k in GENERATION_DEFAULTS if config.get(k) is not None}
    if defaults:
        options["defaults"] = defaults
    if isinstance(config.get("resolution"), int):
        options["native_size"] = config["resolution"]
    if config.get("prediction") in ("epsilon", "v"):
        options["prediction"] = config["prediction"]
    schedule = config.get("schedule")
    if isinstance(schedule, dict):
        options["schedule"] = NoiseSchedule.scaled_linear(
            schedule.get("beta_start", 0.00085),
            schedule.get("beta_end", 0.012),
            schedule.get("num_timesteps", 1000),
        )
    return options


def _check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _generator(seed: int) -> torch.Generator:
    # CPU generators everywhere: sd-samplers draws on the CPU and copies, so a seed gives the
    # same noise on every device.
    return torch.Generator().manual_seed(int(seed) % 2**64)


def _as_texts(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{name} must be a str or a non-empty list of str, got {value!r}")


def _sampler_options(name: str) -> set[str]:
    return set(inspect.signature(SAMPLERS[name].fn).parameters)


def _draws_noise(name: str, options: dict) -> bool:
    """Whether a sampler draws random noise while it runs (with these options)."""
    accepted = _sampler_options(name)
    if "noise_sampler" in accepted or name == "ddpm":
        return True
    if "eta" in accepted and options.get("eta", 0) > 0:  # DDIM with eta > 0
        return True
    return "s_churn" in accepted and options.get("s_churn", 0) > 0


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad latents (replicating the edge) so that the UNet's downsamplings divide their sides:
    sizes that are multiples of 8 pixels but not of 8 * multiple work, cropped afterwards."""
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    if not pad_h and not pad_w:
        return x
    return torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


def _rows(context: torch.Tensor, rows: slice, n: int, cfg: bool) -> torch.Tensor:
    """The conditioning of some images, keeping the [unconditional; conditional] layout."""
    if not cfg:
        return context[rows]
    return torch.cat([context[:n][rows], context[n:][rows]])


def _latent_channels(vae: AutoencoderKL) -> int:
    return vae.config.latent_channels


def _unet_in_channels(unet: UNet) -> int:
    return unet.config.in_channels


def _max_positions(text_encoder: CLIPTextModel) -> int:
    return text_encoder.config.max_positions

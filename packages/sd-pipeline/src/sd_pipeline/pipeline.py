"""Stable Diffusion composed from its four parts: txt2img, img2img and inpainting.

    text  --CLIPTokenizer--> ids --CLIPTextModel--> context (B, 77, 768)
    noise --sample(sampler, UNet(x_t, t, context) with guidance)--> latents --VAE decode--> image

Each part comes from its own package (sd-clip, sd-unet, sd-vae, sd-samplers); this module only
joins them. A call runs the named steps of :meth:`StableDiffusion.run` in order: check inputs,
encode prompt, prepare latents, denoise, decode, postprocess (the sampling steps,
``prepare_latents`` and ``denoise``, are :class:`sd_pipeline.sampling.Sampling`'s).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sd_clip import CLIPTextModel, CLIPTokenizer
from sd_pipeline import allocator, infotext, loading, model_kind, single_file
from sd_pipeline import lora as lora_glue
from sd_pipeline.adapters import Adapters, without_lora_tags
from sd_pipeline.conditioning import Conditioning, encode_conditioning
from sd_pipeline.guidance import NonFiniteError
from sd_pipeline.hires import hires_request
from sd_pipeline.images import tensor_to_pil
from sd_pipeline.loading import GENERATION_DEFAULTS, bundled_checkpoint, resolve_dtype
from sd_pipeline.metadata import GenerationParameters, file_sha256, model_hash
from sd_pipeline.placement import Placement
from sd_pipeline.request import GenerationRequest, RequestError
from sd_pipeline.sampling import Sampling, Start
from sd_pipeline.sdxl import infotext_fields as sdxl_fields
from sd_pipeline.sdxl import text_conditioner
from sd_pipeline.tasks import Tasks
from sd_samplers import NoiseSchedule
from sd_unet import UNet
from sd_vae import AutoencoderKL

logger = logging.getLogger(__name__)

# SD 1.x was trained at 512x512 (v1-inference.yaml: image_size 64 latents x 8).
SD1_NATIVE_SIZE = 512
# Above this many pixels per side the VAE works in tiles (when tiling is left automatic).
AUTO_TILE_ABOVE = 1024
AUTO_TILE_SIZE = 512

OutputType = str  # "pil" | "tensor" (B, 3, H, W) in [-1, 1] | "latent" (scaled latents)


class StableDiffusion(Tasks, Adapters, Sampling, Placement):
    """A text-to-image latent diffusion model: tokenizer, text encoder, UNet, VAE and schedule.

    Build it with :meth:`from_checkpoint` (an SD 1.x/2.x or SDXL file or a diffusers model root),
    :meth:`from_components` (parts you built) or :meth:`default` (the bundled small model). The
    constructor takes the parts as they are: it neither moves, casts nor freezes them (the
    loaders put what they load in eval mode on ``device``); ``device`` and ``dtype`` default to
    the UNet's.

    ``offload=True`` keeps every part on the CPU and moves each to ``device`` only while it runs
    (slower, but the GPU holds one part at a time). ``vae_tiling``: ``None`` tiles the VAE for
    images larger than 1024 px a side, ``True`` always, ``False`` never; ``vae_tile_size`` is the
    tile side in pixels. ``defaults``: the ``steps``, ``guidance_scale`` and ``sampler`` used
    when a call leaves them out (read from the model file where it names them).

    SDXL: ``text_encoder`` is CLIP-L and ``text_encoder_2`` OpenCLIP bigG (with its tokenizer
    ``tokenizer_2``); the refiner has bigG alone, as ``text_encoder``. What the family changes
    (the encoders, the UNet's added conditioning) is ``self.conditioner``
    (``sd_pipeline.sdxl``), chosen from ``unet.config.family``.
    """

    # On the CPU the first generation makes glibc keep freed blocks for reuse, process-wide (see
    # sd_pipeline.allocator: SD 1.5 steps stop faulting 3 GB of fresh pages each); set False
    # before generating to leave the process's allocator as it is.
    keep_freed_memory: bool = True
    # AUTOMATIC1111's prompt settings: emphasis rescales each chunk back to its unweighted mean
    # (False: ComfyUI's "no normalisation"), and a full 75-token chunk is cut after its last
    # comma when that comma is at most this many tokens back.
    normalize_emphasis: bool = True
    comma_padding_backtrack: int = 20

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
        dtype: torch.dtype | str | None = None,
        offload: bool = False,
        vae_tiling: bool | None = None,
        vae_tile_size: int = AUTO_TILE_SIZE,
        name: str | None = None,
        source: Path | None = None,
        defaults: Mapping[str, Any] | None = None,
        embeddings: Mapping[str, Any] | str | os.PathLike | None = None,
        lora_dir: str | os.PathLike | None = None,
        text_encoder_2: CLIPTextModel | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
    ):
        self.vae, self.text_encoder, self.unet = vae, text_encoder, unet
        self.text_encoder_2 = text_encoder_2
        self.conditioner = text_conditioner(
            unet.config.family, (text_encoder, text_encoder_2), (tokenizer, tokenizer_2)
        )
        self.tokenizer = self.conditioner.tokenizers[0]
        self.schedule = schedule or NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
        if prediction not in model_kind.PREDICTIONS:
            raise ValueError(f"prediction must be 'epsilon' or 'v', got {prediction!r}")
        self.prediction = prediction
        self.native_size = native_size
        weight = next(unet.parameters())
        self.device = torch.device(device) if device is not None else weight.device
        self.dtype = resolve_dtype(dtype) or weight.dtype
        self.offload = offload
        self.vae_tiling, self.vae_tile_size = vae_tiling, vae_tile_size
        self.name, self.source = name, source
        self.defaults = {**GENERATION_DEFAULTS, **(defaults or {})}
        self.lora_dir = None if lora_dir is None else Path(lora_dir)  # for <lora:...> in prompts
        self._loras: list[tuple[str, str]] = []  # (name, hash) of load_lora's, for the metadata
        self._prompt_loras: list[tuple[str, str]] = []  # and of the running prompts' tags
        self.embeddings: dict[str, Any] = {}  # trigger word -> sd_clip.Embedding
        if embeddings is not None:
            self.load_embeddings(embeddings)
        self._hash: str | None = None
        self._compiled_unet: Callable | None = None  # see compile()
        self._stopped = False  # a callback raised StopSampling in the last run
        self._refiners: dict[Path, StableDiffusion] = {}  # refiners loaded from paths, kept
        # a PNG's Lora hashes (name -> hash), to find its LoRAs by hash where a name is not found
        self.recorded_lora_hashes: dict[str, str] = {}

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
        """Load an SD 1.x, 2.x or SDXL (base or refiner) checkpoint: a single
        ``.safetensors``/``.ckpt`` file or a diffusers model root (``unet/``, ``vae/``,
        ``text_encoder/``, ``tokenizer/``, ``scheduler/``; SDXL's ``text_encoder_2/``...).

        Each part reads only its own tensors (lazily from safetensors). ``vae``: a separate VAE
        file or folder that replaces the built-in one. A 9-channel (inpainting) UNet is detected
        from its weights; ``prediction`` (``"epsilon"`` or ``"v"``) and ``native_size`` from
        the files, else as ``sd_pipeline.model_kind`` infers them (SD 2.x-v: 768 px); pass
        ``prediction=`` to override. ``options`` go to the constructor (``offload``, ...).
        Any problem with the files raises :class:`sd_pipeline.CheckpointError`.
        """
        path = loading.existing(path, "checkpoint")
        vae = None if vae is None else loading.existing(vae, "VAE")
        parts, family = loading.load_parts(path, vae, resolve_dtype(dtype))
        options.setdefault("name", path.stem if path.is_file() else path.name)
        options.setdefault("source", path)
        options = {**family, **loading.settings_options(path, parts["vae"]), **options}
        keys = loading.checkpoint_keys(path)  # (a safetensors header; [] for other sources)
        options.update(model_kind.kind_options(parts["unet"], keys, options))
        return cls.from_components(**parts, device=device, dtype=dtype, **options)

    @classmethod
    def from_components(
        cls,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        unet: UNet,
        tokenizer: CLIPTokenizer | None = None,
        schedule: NoiseSchedule | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **options,
    ) -> StableDiffusion:
        """Join parts you built yourself, moved to ``device`` (default: CUDA if available) and
        cast to ``dtype`` (default float32), or kept on the CPU with ``offload=True``. The
        tokenizer defaults to the bundled CLIP one, the schedule to SD 1.x's; ``options`` as in
        the constructor (``native_size``, ``prediction``, ...)."""
        device = torch.device(device) if device is not None else _default_device()
        dtype = resolve_dtype(dtype) or torch.float32
        home = "cpu" if options.get("offload") else device
        for module in (vae, text_encoder, unet, options.get("text_encoder_2")):
            if module is not None:
                module.to(device=home, dtype=dtype)
        return cls(vae, text_encoder, unet, tokenizer, schedule, device=device, dtype=dtype,
                   **options)  # fmt: skip

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
            loading.WEIGHTS_DIR,
        )
        return random_tiny(device=device, dtype=dtype)

    def save(self, path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> Path:
        """Write the model as one SD single file (``.safetensors``, original layout), each
        part's config and the pipeline's settings in its metadata, atomically; it loads back
        with :meth:`from_checkpoint` (and its parts with each package's own loader); SDXL
        models in SGM's layout (``single_file.text_layouts``)."""
        settings = {
            "resolution": self.native_size,
            "prediction": self.prediction,
            **{k: self.defaults[k] for k in GENERATION_DEFAULTS},
        }
        parts = {"vae": self.vae, "text_encoder": self.text_encoder, "unet": self.unet}
        if self.text_encoder_2 is not None:
            parts["text_encoder_2"] = self.text_encoder_2
        return single_file.save(path, parts, settings, dtype=resolve_dtype(dtype))

    # the named steps

    @torch.inference_mode()
    def run(
        self,
        request: GenerationRequest,
        *,
        latents: torch.Tensor | None = None,
        callback: Callable[[dict], None] | None = None,
        progress: bool = True,
    ) -> list[Image.Image] | torch.Tensor:
        """Carry out a request: the steps below, in order (for each of ``n_iter`` batches, and
        with the hires fix's second pass when asked). ``latents``, ``callback`` and
        ``progress`` as in :meth:`txt2img`."""
        request = self.check_inputs(request, latents)
        if self.keep_freed_memory and self.device.type == "cpu":
            allocator.keep_freed_memory()
        with self._loras_of_prompts(request):
            if request.n_iter == 1:
                return self._run_one(request, latents, callback, progress)
            batches = [self._run_one(request.iteration(j), None, callback, progress)
                       for j in range(request.n_iter)]  # fmt: skip
        if request.output_type == "pil":
            return [picture for batch in batches for picture in batch]
        return torch.cat(batches)

    def _run_one(self, request, latents, callback, progress):
        start = self.prepare_latents(request, latents)
        result = self.denoise(request, self.encode_prompt(request), start, callback, progress)
        if request.hires is not None and not self._stopped:
            second = hires_request(self, request, result)
            start = self.prepare_latents(second, None)
            result = self.denoise(second, self.encode_prompt(second), start, callback, progress)
        if request.output_type == "latent":
            return result
        self._release_scratch(start)
        return self.postprocess(request, self.decode(result), start)

    def _release_scratch(self, start: Start) -> None:
        """Between the steps and the decode on the CPU: the step models' Winograd workspaces
        emptied and the heap's free memory handed back (``allocator.release_free_memory``), so
        that what the steps used is not resident beside the decoder's activations, the peak of
        a generation. The next generation's first step allocates them again."""
        if self.device.type != "cpu":
            return
        models = [self.unet, *(control.model for control in start.controls)]
        if start.refiner is not None:
            models.append(start.refiner.pipe.unet)
        for model in models:  # a UNet or ControlNet holds the one its convolutions share
            workspace = getattr(model, "workspace", None)
            if workspace is not None:
                workspace.clear()
        allocator.release_free_memory()

    def check_inputs(
        self, request: GenerationRequest, latents: torch.Tensor | None = None
    ) -> GenerationRequest:
        """The request with the model's defaults filled in, checked against this model."""
        resolved = request.resolve(self.defaults, self.native_size, self.scale)
        if latents is not None and request.seed is None:  # the noise is given: no seed made it
            resolved = dataclasses.replace(resolved, seed=None)
        request = resolved
        layers = self.conditioner.layers
        if request.clip_skip is not None and request.clip_skip > layers:
            raise RequestError(
                "clip_skip", f"must be at most {layers} (the text encoder's layers), got "
                f"{request.clip_skip}"
            )  # fmt: skip
        if latents is not None:
            shape = self._latent_shape(request)
            if tuple(latents.shape) != shape:
                raise ValueError(
                    f"latents must have shape {shape} for {request.count} image(s) at "
                    f"{request.width}x{request.height}, got {tuple(latents.shape)}"
                )
        return request

    def encode_prompt(self, request: GenerationRequest) -> Conditioning:
        """Each image's text conditioning over the steps: its prompt's ``AND`` parts and its
        negative prompt, each a schedule of contexts (1, 77 k, width) in AUTOMATIC1111's prompt
        language (emphasis, ``BREAK``, prompt editing, embeddings); each part's texts are
        encoded together, as AUTOMATIC1111 does, and each distinct text once."""

        def encode(texts: list[str]):  # contexts, or (contexts, pooled) for SDXL
            return self.conditioner.encode(
                texts, embeddings=self.embeddings, clip_skip=request.clip_skip,
                normalize=self.normalize_emphasis,
                comma_padding_backtrack=self.comma_padding_backtrack,
            )  # fmt: skip

        prompts = [(without_lora_tags(p), n) for p, n in request.image_prompts]
        with self._on_device(self.conditioner.encoders):
            return encode_conditioning(encode, prompts, request.steps, request.guided)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in about [-1, 1], float32, from scaled latents."""
        with self._on_device(self.vae):
            z = latents / self.vae.config.scaling_factor
            size = (z.shape[-2] * self.scale, z.shape[-1] * self.scale)
            images = self.vae.decode(z, tile_size=self._tile(size)).float()
        if not bool(torch.isfinite(images).all()):
            raise NonFiniteError(
                "the VAE decoded NaN or infinite pixels: nothing was written. Likely causes: "
                "VAE weights with NaN/inf, or float16 overflow (try dtype float32 or bfloat16)"
            )
        return images

    def postprocess(
        self, request: GenerationRequest, images: torch.Tensor, start: Start
    ) -> list[Image.Image] | torch.Tensor:
        """Inpainting's paste-back of the kept pixels, then PIL images carrying their
        generation parameters (AUTOMATIC1111's ``parameters`` text), or the tensor."""
        if start.mask is not None and request.keep_unmasked:
            mask = start.mask.to(images.device)
            images = mask * images + (1 - mask) * start.image.to(images.device)
        if request.output_type == "tensor":
            return images
        pictures = tensor_to_pil(images)
        for picture, params in zip(pictures, self.parameters(request)):
            picture.info["parameters"] = params.to_text()
        return pictures

    def parameters(self, request: GenerationRequest) -> list[GenerationParameters]:
        """What made each image of a resolved request, as the PNG metadata records it."""
        extra = {**infotext.extra_fields(request), **self._ti_hashes(request),
                 **infotext.control_fields(request),
                 **sdxl_fields(self, request)}  # fmt: skip
        loras = dict(self._loras + self._prompt_loras)
        if loras:
            extra["Lora hashes"] = lora_glue.lora_hashes(loras.items())
        return infotext.image_parameters(request, extra, self.model_hash, self.name)

    # properties and helpers of the steps

    @property
    def is_inpainting_model(self) -> bool:
        """True for a 9-channel UNet (latents + mask + masked-image latents)."""
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1

    @property
    def model_hash(self) -> str | None:
        """AUTOMATIC1111's ``Model hash``: the first 10 hex digits of the file's SHA-256
        (cached on disk across runs: see ``sd_pipeline.metadata.model_hash``)."""
        if self._hash is None and self.source is not None and Path(self.source).is_file():
            self._hash = model_hash(self.source)
        return self._hash

    @property
    def sha256(self) -> str | None:
        """The model file's whole SHA-256 (hex), cached as ``model_hash`` is."""
        if self.source is None or not Path(self.source).is_file():
            return None
        return file_sha256(self.source)

    @property
    def scale(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return self.vae.config.downscale

    def _latent_shape(self, request: GenerationRequest) -> tuple[int, int, int, int]:
        channels = self.vae.config.latent_channels
        return (request.count, channels, request.height // self.scale, request.width // self.scale)

    def _encode_image(self, image: torch.Tensor, count: int) -> torch.Tensor:
        """Scaled latents of one image (the posterior mean), repeated ``count`` times."""
        with self._on_device(self.vae):
            posterior = self.vae.encode(
                image.to(self.device, self.dtype), tile_size=self._tile(image.shape[-2:])
            )
            latents = posterior.mean.float() * self.vae.config.scaling_factor
        return latents.expand(count, -1, -1, -1).contiguous()

    def _tile(self, size) -> int | None:
        tiling = self.vae_tiling
        if tiling is None:
            tiling = max(size) > AUTO_TILE_ABOVE
        return self.vae_tile_size if tiling else None

    def __repr__(self) -> str:
        kind = "inpainting" if self.is_inpainting_model else "txt2img"
        return (
            f"StableDiffusion({self.name or 'unnamed'}, {kind}, native {self.native_size}px, "
            f"device={self.device}, dtype={self.dtype})"
        )


def random_tiny(
    *, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None, seed=0
) -> StableDiffusion:
    """A tiny SD-shaped model with random weights (each part's ``tiny()`` config): for tests
    and for running without weights. Its images are noise."""
    parts = loading.random_parts(seed)
    for part in parts.values():
        part.requires_grad_(False)
    return StableDiffusion.from_components(
        **parts, native_size=64, device=device, dtype=dtype, name="random-tiny"
    )


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

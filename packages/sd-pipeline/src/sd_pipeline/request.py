"""One generation request: every setting of a txt2img, img2img or inpainting run, checked once.

``StableDiffusion.txt2img`` / ``img2img`` / ``inpaint`` build a :class:`GenerationRequest` from
their keywords, ``sd-generate`` builds the same object from its flags or a PNG's parameters (and
checks it before loading any model), and a server would build it from JSON. Settings left
``None`` are the model's to choose: :meth:`GenerationRequest.resolve` fills them from the
pipeline's defaults and native size, and :meth:`GenerationRequest.check` is the one place where
types and ranges are checked.

Resource limits (:data:`LIMITS`) keep a typo or a hostile PNG from allocating until memory runs
out; ``limits=False`` (``sd-generate --no-limits``) lifts them for those who mean it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from sd_samplers import SAMPLERS, SCHEDULERS

__all__ = [
    "HIRES_UPSCALERS",
    "LIMITS",
    "TASKS",
    "GenerationRequest",
    "HiresFix",
    "Limits",
    "RequestError",
    "as_texts",
]

TASKS = ("txt2img", "img2img", "inpaint")
OUTPUT_TYPES = ("pil", "tensor", "latent")
# The strength a task uses when none is given: img2img keeps the picture's layout
# (AUTOMATIC1111's 0.75 is often too much for small models; diffusers' default is 0.8, ours 0.6
# as before), inpainting repaints the masked region from scratch.
DEFAULT_STRENGTH = {"img2img": 0.6, "inpaint": 1.0}


@dataclass(frozen=True)
class Limits:
    """Upper bounds checked before anything is allocated (when a request has ``limits=True``).

    Each is far above what SD models are used at (AUTOMATIC1111's interface stops at 150 steps,
    2048 px and a batch of 8) and well below what would exhaust a large machine's memory.
    """

    steps: int = 1000  # the training schedule has 1000 timesteps; DDIM cannot take more
    side: int = 4096  # pixels per side
    images: int = 64  # images per call (prompts x batch_size)
    pixels: int = 64 * 1024 * 1024  # pixels per call, all images together (64 at 1024x1024)
    guidance_scale: float = 100.0  # |guidance_scale|; AUTOMATIC1111's interface stops at 30
    mask_blur: float = 512.0  # pixels
    iterations: int = 100  # n_iter: batches run one after the other (AUTOMATIC1111 stops at 100)


LIMITS = Limits()


class RequestError(ValueError):
    """A setting that cannot be used: ``field`` names it, ``problem`` says what is wrong.

    ``str(e)`` is ``"<field> <problem>"``; the CLI swaps the field for the flag or PNG field that
    the value came from.
    """

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def as_texts(value: str | Sequence[str], name: str) -> tuple[str, ...]:
    """One text or a non-empty list of texts, as a tuple."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(f"{name} must be a str or a non-empty list of str, got {value!r}")


HIRES_UPSCALERS = (
    # AUTOMATIC1111's latent upscalers (torch interpolation of the latents) ...
    "latent", "latent-antialiased", "latent-bicubic", "latent-bicubic-antialiased",
    "latent-nearest", "latent-nearest-exact",
    # ... and a pixel-space one: decode, resize the picture, encode again
    "lanczos",
)  # fmt: skip
# AUTOMATIC1111's names for them, as its PNG metadata writes them
HIRES_UPSCALER_LABELS = {
    "latent": "Latent", "latent-antialiased": "Latent (antialiased)",
    "latent-bicubic": "Latent (bicubic)",
    "latent-bicubic-antialiased": "Latent (bicubic antialiased)",
    "latent-nearest": "Latent (nearest)", "latent-nearest-exact": "Latent (nearest-exact)",
    "lanczos": "Lanczos",
}  # fmt: skip


@dataclass(frozen=True)
class HiresFix:
    """AUTOMATIC1111's "hires fix": after the first pass, upscale by ``scale`` and run an
    img2img pass at ``denoise`` strength over a ladder of ``steps`` steps (None: the request's),
    with another sampler or prompt when given."""

    scale: float = 2.0
    steps: int | None = None
    denoise: float = 0.7
    upscaler: str = "latent"
    sampler: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None

    def check(self) -> None:
        _number("hires.scale", self.scale, low=1.0, high=8.0, limit=False)
        _integer("hires.steps", self.steps, low=1, high=LIMITS.steps)
        _number("hires.denoise", self.denoise, low=0.0, high=1.0, limit=False)
        if self.upscaler not in HIRES_UPSCALERS:
            raise RequestError(
                "hires.upscaler",
                f"{self.upscaler!r} is unknown; choose from: {', '.join(HIRES_UPSCALERS)}",
            )
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise RequestError("hires.sampler", f"{self.sampler!r} is unknown")


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. ``None`` means "the model's default" until :meth:`resolve`."""

    task: str = "txt2img"  # txt2img | img2img | inpaint
    prompts: tuple[str, ...] = ("",)
    negative_prompts: tuple[str, ...] = ("",)  # one for all prompts, or one per prompt
    steps: int | None = None
    sampler: str | None = None
    scheduler: str | None = None  # a sigma schedule of sd-samplers' SCHEDULERS (karras, ...)
    guidance_scale: float | None = None  # 1 switches classifier-free guidance off
    # CFG rescale's phi in [0, 1] (Lin et al. 2023; diffusers' guidance_rescale; 0.7 is theirs)
    guidance_rescale: float = 0.0
    # sample on the schedule rescaled to zero terminal SNR (AUTOMATIC1111's Noise schedule)
    zero_terminal_snr: bool = False
    seed: int | None = None  # image i uses seed + i; None or -1: a random seed
    width: int | None = None  # None: the image's size, else the model's native size
    height: int | None = None
    batch_size: int = 1  # images per prompt
    strength: float | None = None  # img2img / inpaint: how far to noise the image (0..1)
    mask_blur: float = 0.0  # inpaint: Gaussian blur of the mask edge, in pixels
    keep_unmasked: bool = True  # inpaint: paste the original pixels back outside the mask
    clip_skip: int | None = None  # 2: condition on CLIP's penultimate layer
    output_type: str = "pil"  # pil | tensor (B, 3, H, W) in [-1, 1] | latent (scaled)
    sampler_options: tuple[tuple[str, Any], ...] = ()  # eta, s_noise, ... for the sampler
    image: Image.Image | None = field(default=None, compare=False, repr=False)
    mask: Image.Image | None = field(default=None, compare=False, repr=False)
    # img2img from latents (scaled, (count, 4, h, w)) instead of an image: the hires fix does
    init_latents: Any = field(default=None, compare=False, repr=False)
    limits: bool = True  # check LIMITS
    # AUTOMATIC1111's seed extras (see sd_pipeline.noise): a variation seed mixed in, the size
    # (width, height) the seed's noise is drawn at, and the source of the random numbers
    subseed: int | None = None  # image i uses subseed + i
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None
    rng: str = "cpu"  # cpu | gpu | nv
    n_iter: int = 1  # batches, one after the other; seeds continue from batch to batch
    hires: HiresFix | None = None
    # ControlNet units (sd_pipeline.controlnet.ControlUnit), their residuals summed
    controls: tuple = field(default=(), compare=False, repr=False)
    # SDXL's added conditioning (sd_pipeline.sdxl): sizes (height, width) as diffusers takes
    # them (None: the output's size), the crop (top, left) (None: 0, 0); the refiner's aesthetic
    # scores for the prompt and the negative prompt (diffusers' and AUTOMATIC1111's 6 and 2.5)
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    # AUTOMATIC1111's refiner: a model (a checkpoint path or a StableDiffusion) that takes over
    # in the same sampler run once refiner_switch (0..1) of the way is done
    refiner: Any = field(default=None, compare=False)
    refiner_switch: float = 0.8
    # Approximate speed-ups, off by default (sd_pipeline.approximate): ToMe's share of the
    # self-attention tokens merged at the first level (0 to 0.75), and DeepCache's interval
    # (the whole UNet every N calls, its shallow branch between; 1 is off)
    token_merging_ratio: float = 0.0
    deepcache_interval: int = 1

    # derived facts

    @property
    def count(self) -> int:
        """How many images the request makes."""
        return len(self.prompts) * self.batch_size

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (it is skipped at scale 1)."""
        return self.guidance_scale != 1.0

    @property
    def image_prompts(self) -> list[tuple[str, str]]:
        """(prompt, negative prompt) of each image, in output order."""
        negatives = self.negative_prompts
        if len(negatives) == 1:
            negatives = negatives * len(self.prompts)
        return [pair for pair in zip(self.prompts, negatives) for _ in range(self.batch_size)]

    @property
    def seeds(self) -> list[int | None]:
        return [None if self.seed is None else self.seed + i for i in range(self.count)]

    @property
    def all_seeds(self) -> list[int | None]:
        """The seeds of every image of every batch (``n_iter`` of them), in output order."""
        total = self.count * self.n_iter
        return [None if self.seed is None else self.seed + i for i in range(total)]

    @property
    def subseeds(self) -> list[int | None]:
        return [None if self.subseed is None else self.subseed + i for i in range(self.count)]

    def iteration(self, j: int) -> GenerationRequest:
        """Batch ``j`` of ``n_iter``: one batch, its seeds (and subseeds) following on from
        the batches before it, as AUTOMATIC1111 numbers them."""
        shift = j * self.count
        return dataclasses.replace(
            self,
            n_iter=1,
            seed=None if self.seed is None else self.seed + shift,
            subseed=None if self.subseed is None else self.subseed + shift,
        )

    # resolution and checks

    def resolve(
        self, defaults: Mapping[str, Any], native_size: int, multiple: int = 8
    ) -> GenerationRequest:
        """The request with every ``None`` filled: steps, sampler and guidance from
        ``defaults``, the size from the image or ``native_size``, the task's strength and a
        random seed; then checked, including that the size is a multiple of ``multiple``."""
        self.check()
        filled = {k: defaults[k] for k in ("steps", "sampler", "guidance_scale")
                  if getattr(self, k) is None and k in defaults}  # fmt: skip
        width, height = self.width, self.height
        if self.image is not None:
            width = self.image.size[0] if width is None else width
            height = self.image.size[1] if height is None else height
        elif self.init_latents is not None:
            width = self.init_latents.shape[-1] * multiple if width is None else width
            height = self.init_latents.shape[-2] * multiple if height is None else height
        filled["width"] = native_size if width is None else width
        filled["height"] = native_size if height is None else height
        if self.strength is None and self.task in DEFAULT_STRENGTH:
            filled["strength"] = DEFAULT_STRENGTH[self.task]
        if self.seed is None or self.seed == -1:
            filled["seed"] = random_seed()
        if self.subseed == -1 or (self.subseed is None and self.subseed_strength):
            filled["subseed"] = random_seed()
        resolved = dataclasses.replace(self, **filled).check()
        for name in ("steps", "sampler", "guidance_scale"):
            if getattr(resolved, name) is None:
                raise RequestError(name, "has no value and the model names no default")
        resolved._check_size_multiple(multiple)
        return resolved

    def check(self) -> GenerationRequest:
        """Check every setting that is set, as far as it can be without a model; returns self.
        Raises RequestError (or TypeError for prompts that are not text)."""
        self._check_task()
        self._check_prompts()
        _integer("steps", self.steps, low=1, high=LIMITS.steps if self.limits else None)
        _integer("batch_size", self.batch_size, low=1)
        if self.seed is not None and self.seed != -1:
            _integer("seed", self.seed, low=0, high=2**63 - 1, limit=False)
        _integer("clip_skip", self.clip_skip, low=1)
        self._check_seed_extras()
        for name in ("width", "height"):
            _integer(name, getattr(self, name), low=1, high=LIMITS.side if self.limits else None)
        self._check_guidance()
        self._check_sampler()
        if self.strength is not None:
            _number("strength", self.strength, low=0.0, high=1.0, limit=False)
        _number("mask_blur", self.mask_blur, low=0.0,
                high=LIMITS.mask_blur if self.limits else None)  # fmt: skip
        if self.output_type not in OUTPUT_TYPES:
            raise RequestError(
                "output_type", f"is {self.output_type!r}; choose from: {', '.join(OUTPUT_TYPES)}"
            )
        self._check_sdxl()
        _number("token_merging_ratio", self.token_merging_ratio, low=0.0, high=0.75, limit=False)
        _integer("deepcache_interval", self.deepcache_interval, low=1, high=1000, limit=False)
        if self.limits:
            self._check_totals()
        return self

    def _check_sdxl(self) -> None:
        for name in ("original_size", "crop_top_left", "target_size"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, tuple) or len(value) != 2:
                raise RequestError(
                    name, f"must be a pair of integers (height, width), got {value!r}"
                )
            for v in value:
                _integer(name, v, low=0 if name == "crop_top_left" else 1, high=LIMITS.side * 4,
                         limit=False)  # fmt: skip
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            _number(name, getattr(self, name), low=None, high=None)
        _number("refiner_switch", self.refiner_switch, low=None, high=None)
        if not 0.0 <= self.refiner_switch <= 1.0:
            raise RequestError(
                "refiner_switch", "must be in [0, 1] (the fraction of the way after which the "
                f"refiner takes over), got {self.refiner_switch:g}"
            )  # fmt: skip
        path = isinstance(self.refiner, (str, os.PathLike))
        if self.refiner is not None and not path and not hasattr(self.refiner, "conditioner"):
            raise RequestError(
                "refiner", f"must be a checkpoint path or a StableDiffusion, got {self.refiner!r}"
            )

    def _check_seed_extras(self) -> None:
        if self.subseed is not None and self.subseed != -1:
            _integer("subseed", self.subseed, low=0, high=2**63 - 1, limit=False)
        _number("subseed_strength", self.subseed_strength, low=0.0, high=1.0, limit=False)
        if self.seed_resize_from is not None:
            if not isinstance(self.seed_resize_from, tuple) or len(self.seed_resize_from) != 2:
                raise RequestError(
                    "seed_resize_from", f"must be (width, height), got {self.seed_resize_from!r}"
                )
            for value in self.seed_resize_from:
                _integer("seed_resize_from", value, low=8,
                         high=LIMITS.side if self.limits else None)  # fmt: skip
        if self.rng not in ("cpu", "gpu", "nv"):
            raise RequestError("rng", f"is {self.rng!r}; choose from: cpu, gpu, nv")
        _integer("n_iter", self.n_iter, low=1, high=LIMITS.iterations if self.limits else None)
        if self.controls:
            from sd_pipeline.controlnet import ControlUnit

            if not all(isinstance(u, ControlUnit) for u in self.controls):
                raise RequestError("controls", "must be sd_pipeline.controlnet.ControlUnit's")
        if self.hires is not None:
            if not isinstance(self.hires, HiresFix):
                raise RequestError("hires", f"must be a HiresFix, got {self.hires!r}")
            if self.task != "txt2img":
                raise RequestError("hires", "is a txt2img option (AUTOMATIC1111's hires fix)")
            self.hires.check()

    def _check_task(self) -> None:
        if self.task not in TASKS:
            raise RequestError("task", f"is {self.task!r}; choose from: {', '.join(TASKS)}")
        if self.task != "txt2img" and self.image is None and self.init_latents is None:
            raise RequestError("image", f"is needed for {self.task} (the picture to start from)")
        if self.task == "inpaint" and self.mask is None:
            raise RequestError("mask", "is needed for inpaint (white repaints, black keeps)")
        if self.task != "inpaint" and self.mask is not None:
            raise RequestError("mask", "is only used for inpainting: use inpaint()")
        if self.task == "txt2img" and self.strength is not None and self.strength != 1.0:
            raise RequestError("strength", "needs a starting image: use img2img()")

    def _check_prompts(self) -> None:
        as_texts(list(self.prompts), "prompt")
        as_texts(list(self.negative_prompts), "negative_prompt")
        n, k = len(self.prompts), len(self.negative_prompts)
        if k not in (1, n):
            raise RequestError(
                "negative_prompt",
                f"count does not fit: give one negative prompt or one per prompt: got {k} "
                f"negative prompts for {n} prompts",
            )

    def _check_guidance(self) -> None:
        _number("guidance_rescale", self.guidance_rescale, low=None, high=None)
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise RequestError(
                "guidance_rescale", f"must be in [0, 1] (0: off; 0.7 is Lin et al.'s), got "
                f"{self.guidance_rescale:g}"
            )  # fmt: skip
        if not isinstance(self.zero_terminal_snr, bool):
            raise RequestError(
                "zero_terminal_snr", f"must be True or False, got {self.zero_terminal_snr!r}"
            )
        if self.guidance_scale is None:
            return
        bound = LIMITS.guidance_scale if self.limits else None
        _number("guidance_scale", self.guidance_scale, low=-bound if bound else None, high=bound)

    def _check_sampler(self) -> None:
        if self.sampler is None:
            if self.sampler_options:
                raise RequestError("sampler_options", "need a sampler to go with")
            return
        spec = SAMPLERS.get(self.sampler) if isinstance(self.sampler, str) else None
        if spec is None:
            raise RequestError(
                "sampler", f"{self.sampler!r} is unknown; choose from: {', '.join(SAMPLERS)}"
            )
        if self.scheduler is not None:
            if self.scheduler not in SCHEDULERS:
                raise RequestError(
                    "scheduler", f"{self.scheduler!r} is unknown; choose from: "
                    f"{', '.join(SCHEDULERS)}"
                )  # fmt: skip
            if not spec.takes_scheduler:
                raise RequestError(
                    "scheduler", f"does not apply to sampler {self.sampler!r}, which runs on "
                    "the original CompVis timesteps (AUTOMATIC1111 ignores it there too)"
                )  # fmt: skip
        accepted = spec.accepted_options()
        for name, value in self.sampler_options:
            if name not in accepted:
                raise RequestError(
                    "sampler_options",
                    f"{name!r} is not an option of sampler {self.sampler!r}; its options: "
                    f"{', '.join(sorted(accepted)) or 'none'}",
                )
            if isinstance(value, numbers.Number) and not math.isfinite(value):
                raise RequestError("sampler_options", f"{name}={value} is not a finite number")

    def _check_totals(self) -> None:
        if self.count > LIMITS.images:
            raise RequestError(
                "batch_size",
                f"asks for {self.count} images in one call; at most {LIMITS.images}" + LIFT,
            )
        if self.width is not None and self.height is not None:
            factor = 1.0 if self.hires is None else self.hires.scale**2
            pixels = int(self.width * self.height * self.count * factor)
            if pixels > LIMITS.pixels:
                raise RequestError(
                    "batch_size",
                    f"x size is {self.count} images of {self.width}x{self.height} = "
                    f"{pixels / 2**20:.0f} Mpx in one call; at most {LIMITS.pixels // 2**20} Mpx"
                    + LIFT,
                )

    def _check_size_multiple(self, multiple: int) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if value % multiple:
                lo, hi = (
                    max(multiple, value // multiple * multiple),
                    -(-value // multiple) * multiple,
                )
                given = getattr(self.image, "size", None) if self.image is not None else None
                where = " (the image's size; pass width/height to resize it)" if given else ""
                raise RequestError(
                    name, f"must be a multiple of {multiple}, got {value}{where}; try {lo} or {hi}"
                )


def random_seed() -> int:
    """A fresh seed in [0, 2**32) from the OS's entropy (not torch's global generator)."""
    return int.from_bytes(os.urandom(4), "little")


LIFT = " (lift with limits=False, or sd-generate --no-limits)"


def _integer(name: str, value, *, low: int, high: int | None = None, limit: bool = True) -> None:
    """An integer (not a bool) in [low, high]; ``limit``: ``high`` is one of LIMITS."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RequestError(name, f"must be an integer, got {value!r}")
    if value < low:
        raise RequestError(
            name,
            f"must be a positive integer, got {value}"
            if low == 1
            else f"must be at least {low}, got {value}",
        )
    if high is not None and value > high:
        raise RequestError(name, f"must be at most {high}, got {value}{LIFT if limit else ''}")


def _number(name: str, value, *, low: float | None, high: float | None, limit: bool = True) -> None:
    """A finite real number in [low, high]; ``limit``: ``high`` is one of LIMITS."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RequestError(name, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise RequestError(name, f"must be a finite number, got {value}")
    if low == 0.0 and high == 1.0 and not 0.0 <= value <= 1.0:
        raise RequestError(name, f"must be in [0, 1] (0 keeps the image), got {value}")
    if low is not None and value < low:
        raise RequestError(name, f"must be at least {low:g}, got {value:g}")
    if high is not None and value > high:
        raise RequestError(name, f"must be at most {high:g}, got {value:g}{LIFT if limit else ''}")

"""Sampling: what a request starts from and the sampler run from it to clean latents.

:class:`Sampling` is the part of ``StableDiffusion`` that runs the ``prepare_latents`` and
``denoise`` steps of ``StableDiffusion.run``: the starting noise (one generator per image), the
image's latents and mask for img2img and inpainting, and the guided UNet (ControlNets, SDXL's
refiner) that sd-samplers samples. :class:`Start` carries one step's result to the next.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from PIL import Image

from sd_pipeline.approximate import approximate
from sd_pipeline.conditioning import Conditioning
from sd_pipeline.controlnet import ControlledUNet, prepare_controls
from sd_pipeline.guidance import GuidedModel, Inpainting, StopSampling
from sd_pipeline.images import latent_mask, mask_to_tensor, pil_to_tensor
from sd_pipeline.noise import request_noise, row_noise
from sd_pipeline.request import GenerationRequest, random_seed
from sd_pipeline.sdxl import RefinerStage, RefinerSwitch
from sd_samplers import SAMPLERS, NoiseSchedule, sample, steps_for_strength

__all__ = ["Sampling", "Start"]


@dataclasses.dataclass
class Start:
    """What sampling starts from: the noise (and each image's generator) and, for img2img and
    inpainting, the image in pixels and latents, and the mask."""

    noise: torch.Tensor
    generators: list[torch.Generator]
    image: torch.Tensor | None = None  # (1, 3, H, W) in [-1, 1]
    mask: torch.Tensor | None = None  # (1, 1, H, W) in [0, 1], 1 = repaint
    init_latents: torch.Tensor | None = None
    inpainting: Inpainting | None = None
    controls: list = dataclasses.field(default_factory=list)  # prepared ControlNet units
    refiner: RefinerStage | None = None  # the second stage that takes over (SDXL's refiner)


class Sampling:
    """The sampling steps of a pipeline (``unet``, ``schedule``, ``conditioner``,
    ``prediction``, ``device``, ``dtype``, ``scale`` and ``_encode_image`` come from
    ``StableDiffusion``; ``_stopped`` records that a callback stopped the last run)."""

    def prepare_latents(self, request: GenerationRequest, latents: torch.Tensor | None) -> Start:
        """The starting noise (drawn on the CPU, one generator per image, so that a seed gives
        the same picture on any device and image i of a batch equals a run with seed + i) and,
        for img2img and inpainting, the image's latents and the mask."""
        seeds = [random_seed() if s is None else s for s in request.seeds]
        generators = [_generator(seed) for seed in seeds]
        shape = self._latent_shape(request)[1:]
        if latents is not None:
            noise = torch.as_tensor(latents).float().cpu()
        else:
            noise = torch.stack([request_noise(request, i, seed, g, shape, self.scale, self.device)
                                 for i, (seed, g) in enumerate(zip(seeds, generators))])  # fmt: skip
        start = Start(noise=noise.to(self.device), generators=generators)
        # the refiner as AUTOMATIC1111 runs it with the hires fix: in the second pass only
        start.refiner = RefinerStage.of(self, request) if request.hires is None else None
        if request.controls:
            start.controls = prepare_controls(request.controls, request.width, request.height,
                                              unet=self.unet, device=self.device,
                                              dtype=self.dtype)  # fmt: skip
        if request.init_latents is not None:
            start.init_latents = request.init_latents.to(self.device, torch.float32)
            return start
        if request.image is None:
            return start
        size = (request.width, request.height)
        picture = request.image
        if picture.size != size:
            picture = picture.resize(size, Image.Resampling.LANCZOS)
        start.image = pil_to_tensor(picture)
        start.init_latents = self._encode_image(start.image, request.count)
        if request.mask is not None:
            self._prepare_mask(request, start, size)
        return start

    def _prepare_mask(self, request: GenerationRequest, start: Start, size) -> None:
        mask = request.mask
        if mask.size != size:
            mask = mask.resize(size, Image.Resampling.NEAREST)
        start.mask = mask_to_tensor(mask, blur=request.mask_blur)
        masked = None
        if self.is_inpainting_model:
            masked = self._encode_image(start.image * (start.mask < 0.5), request.count)
        start.inpainting = Inpainting(
            mask=latent_mask(start.mask, self.scale, request.count).to(self.device),
            init=start.init_latents,
            noise=start.noise,
            masked=masked,
        )

    def denoise(
        self,
        request: GenerationRequest,
        conditioning: Conditioning,
        start: Start,
        callback: Callable[[dict], None] | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """Run the sampler from the starting noise (or the noised image) to clean latents.

        Image i of a batch must equal a single run with seed + i: samplers that take a noise
        source get one made of one source per image, each on its image's generator; the few
        that draw noise from the generator directly run one image at a time.
        """
        spec = SAMPLERS[request.sampler]
        options = dict(request.sampler_options)
        if self.prediction != "epsilon":
            options.setdefault("prediction", self.prediction)
        n, groups = request.count, [slice(0, request.count)]
        if spec.noise is not None:
            schedule = self.sampling_schedule(request)
            options.setdefault(
                "noise_sampler", row_noise(spec.noise, start.noise, start.generators, schedule)
            )
        elif spec.draws_noise(options):
            groups = [slice(i, i + 1) for i in range(n)]
        self._stopped = False
        outputs = []
        with self._on_device(self.unet), RefinerStage.on_device(start.refiner):
            for rows in groups:
                if self._stopped:  # stopped while an earlier image ran
                    outputs.append(self._starting_latents(start, rows))
                    continue
                outputs.append(self._sample_rows(request, conditioning, start, rows, options,
                                                 callback, progress))  # fmt: skip
        latents = torch.cat(outputs)
        if start.inpainting is not None and start.inpainting.masked is None:
            mask = start.inpainting.mask
            latents = mask * latents + (1 - mask) * start.init_latents
        return latents

    def _sample_rows(self, request, conditioning, start: Start, rows: slice, options, callback,
                     progress) -> torch.Tensor:  # fmt: skip
        model = guided = self._guided_model(request, conditioning, start, rows)
        if start.refiner is not None:
            second = start.refiner.pipe._guided_model(  # (the ControlNets fit the base only)
                request, start.refiner.conditioning, dataclasses.replace(start, controls=[]), rows
            )
            model = RefinerSwitch(guided, second, request.refiner_switch, len(self.schedule.sigmas))
        extra = {}
        if start.init_latents is not None:
            extra = dict(init=start.init_latents[rows], strength=request.strength)
        latest = {}

        def on_step(d: dict) -> None:
            model.step = d["i"] + 1  # the prompt schedules' step counter
            if start.controls:
                guided.unet.callback(d)
            latest["denoised"] = d["denoised"]
            if callback is not None:
                callback(d)

        try:
            x = sample(request.sampler, model, start.noise[rows], guided.schedule, request.steps,
                       generator=start.generators[rows.start], callback=on_step,
                       progress=progress, scheduler=request.scheduler, **extra,
                       **options)  # fmt: skip
        except StopSampling:
            self._stopped = True
            x = latest.get("denoised", self._starting_latents(start, rows))
        model.check_finite()
        return x

    def _guided_model(self, request, conditioning, start: Start, rows: slice) -> GuidedModel:
        """The UNet (with the ControlNet units, SDXL's added conditioning) as the sampler's
        guided ``model(x_t, t)`` for some images."""
        spec = SAMPLERS[request.sampler]
        unet = self.unet if self._compiled_unet is None else self._compiled_unet
        unet = approximate(self.unet, unet, request, request.seeds[rows.start])
        if start.controls:  # the step a unit acts at counts the steps that run
            run = request.steps
            if start.init_latents is not None:
                run = steps_for_strength(request.steps, request.strength)
            unet = ControlledUNet(unet, start.controls, run)
        return GuidedModel(
            unet,
            conditioning,
            rows,
            scale=request.guidance_scale * spec.cfg_scale_multiplier,
            guided=request.guided,
            schedule=self.sampling_schedule(request),
            dtype=self.dtype,
            multiple=2 ** (len(self.unet.config.channel_mult) - 1),
            inpainting=_inpainting_rows(start.inpainting, rows),
            calls_per_step=2 if spec.second_order else 1,
            warmup_calls=spec.warmup_calls,
            rescale=request.guidance_rescale,
            added=self.conditioner.added(request),
        )

    def _starting_latents(self, start: Start, rows: slice) -> torch.Tensor:
        """What an image that was never sampled is: its image's latents, or its noise."""
        if start.init_latents is not None:
            return start.init_latents[rows]
        return start.noise[rows]

    def sampling_schedule(self, request: GenerationRequest) -> NoiseSchedule:
        """The schedule a request samples on: the model's, or (``zero_terminal_snr``) that
        rescaled to zero terminal SNR (``NoiseSchedule.zero_terminal_snr``: a 1000-entry
        table, cheap to make per call)."""
        return self.schedule.zero_terminal_snr() if request.zero_terminal_snr else self.schedule


def _generator(seed: int) -> torch.Generator:
    # CPU generators everywhere: sd-samplers draws on the CPU and copies, so a seed gives the
    # same noise on every device.
    return torch.Generator().manual_seed(int(seed) % 2**64)


def _inpainting_rows(p: Inpainting | None, rows: slice) -> Inpainting | None:
    if p is None:
        return None
    masked = None if p.masked is None else p.masked[rows]
    return Inpainting(mask=p.mask[rows], init=p.init[rows], noise=p.noise[rows], masked=masked)

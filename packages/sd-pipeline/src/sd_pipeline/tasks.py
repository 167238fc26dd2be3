"""The three tasks as keyword methods: each builds a GenerationRequest and runs it.

:class:`Tasks` is the part of ``StableDiffusion`` a user calls most; it holds no state and only
translates keywords into a request (``StableDiffusion.run`` does the work).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from sd_pipeline.images import ImageLike, to_mask, to_pil
from sd_pipeline.request import GenerationRequest, HiresFix, as_texts

__all__ = ["Tasks"]

Output = list[Image.Image] | torch.Tensor


class Tasks:
    """txt2img, img2img and inpaint. Arguments they share:

    ``prompt``: one text or a list (``batch_size`` images of each), in AUTOMATIC1111's prompt
    language. ``sampler`` (an sd-samplers name) may run on another sigma ``scheduler``
    (``karras``, ``exponential``, ``sgm_uniform``, ...: AUTOMATIC1111's "Schedule type").
    ``seed``: image i uses ``seed + i`` (random when None or -1), so a batch repeats
    single runs; ``subseed``/``subseed_strength`` mix in a variation seed,
    ``seed_resize_from=(w, h)`` keeps a seed's composition at another size, ``rng`` picks the
    random numbers' source (``"cpu"``, ``"gpu"``, ``"nv"``: see ``sd_pipeline.noise``).
    ``n_iter`` batches run one after the other, their seeds following on. ``controlnets``: a
    list of ``sd_pipeline.controlnet.ControlUnit`` (a ControlNet, its control image, weight,
    start/end, control and resize mode, preprocessor), their residuals summed. ``refiner``
    (a checkpoint path or a loaded ``StableDiffusion``: SDXL's refiner) takes over in the same
    sampler run once ``refiner_switch`` of the way is done (AUTOMATIC1111's refiner). SDXL's
    added conditioning: ``original_size``, ``target_size`` (height, width; default: the output
    size) and ``crop_top_left`` (top, left; default 0, 0), as diffusers; the refiner's
    ``aesthetic_score`` and ``negative_aesthetic_score`` (6 and 2.5). ``latents``: the
    standard-normal starting noise (B, 4, h, w), overriding the seed. ``callback`` gets
    sd-samplers' per-step dict (``x``, ``i``, ``sigma``, ``denoised``); it may raise
    ``sd_pipeline.StopSampling`` to stop early and get what there is. ``clip_skip=2``
    conditions on CLIP's penultimate layer. ``guidance_rescale`` (phi in [0, 1]) is CFG
    rescale, ``zero_terminal_snr=True`` samples on the schedule rescaled to zero terminal SNR
    (both for v-prediction models trained so; Lin et al. 2023). ``output_type``: ``"pil"`` (carrying their
    generation parameters), ``"tensor"`` (B, 3, H, W) in [-1, 1] or ``"latent"``.
    ``limits=False`` lifts the size, step and batch limits (``sd_pipeline.LIMITS``). Other
    keywords are the sampler's options (``eta``, ``s_noise``, ...).
    """

    def run(self, request, *, latents=None, callback=None, progress=True) -> Output:
        raise NotImplementedError

    def txt2img(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        zero_terminal_snr: bool = False,
        sampler: str | None = None,
        scheduler: str | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 1,
        n_iter: int = 1,
        subseed: int | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from: tuple[int, int] | None = None,
        rng: str = "cpu",
        controlnets: Sequence | None = None,
        refiner=None,
        refiner_switch: float = 0.8,
        original_size: tuple[int, int] | None = None,
        crop_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        hires: HiresFix | None = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[dict], None] | None = None,
        progress: bool = True,
        clip_skip: int | None = None,
        output_type: str = "pil",
        limits: bool = True,
        **sampler_options,
    ) -> Output:
        """Images from text; ``hires`` adds AUTOMATIC1111's hires fix (``HiresFix``)."""
        request = GenerationRequest(
            task="txt2img",
            prompts=as_texts(prompt, "prompt"),
            negative_prompts=as_texts(negative_prompt, "negative_prompt"),
            steps=steps,
            sampler=sampler,
            scheduler=scheduler,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            zero_terminal_snr=zero_terminal_snr,
            seed=seed,
            width=width,
            height=height,
            batch_size=batch_size,
            n_iter=n_iter,
            subseed=subseed,
            subseed_strength=subseed_strength,
            seed_resize_from=seed_resize_from,
            rng=rng,
            controls=tuple(controlnets or ()),
            refiner=refiner,
            refiner_switch=refiner_switch,
            original_size=original_size,
            crop_top_left=crop_top_left,
            target_size=target_size,
            aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score,
            hires=hires,
            clip_skip=clip_skip,
            output_type=output_type,
            sampler_options=tuple(sampler_options.items()),
            limits=limits,
        )
        return self.run(request, latents=latents, callback=callback, progress=progress)

    def img2img(
        self,
        prompt: str | Sequence[str],
        image: ImageLike | None = None,
        negative_prompt: str | Sequence[str] = "",
        *,
        strength: float = 0.6,
        steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        zero_terminal_snr: bool = False,
        sampler: str | None = None,
        scheduler: str | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 1,
        n_iter: int = 1,
        subseed: int | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from: tuple[int, int] | None = None,
        rng: str = "cpu",
        controlnets: Sequence | None = None,
        refiner=None,
        refiner_switch: float = 0.8,
        original_size: tuple[int, int] | None = None,
        crop_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        init_latents: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[dict], None] | None = None,
        progress: bool = True,
        clip_skip: int | None = None,
        output_type: str = "pil",
        limits: bool = True,
        **sampler_options,
    ) -> Output:
        """Images from text and a starting image, noised to depth ``strength`` (0 returns the
        image's VAE round trip, 1 ignores it). The image is resized to ``width`` x ``height``
        when given; otherwise its own size must be a multiple of 8. ``init_latents`` (scaled
        latents, one row per image) start from latents instead of an image, as the hires fix's
        second pass does.
        """
        request = GenerationRequest(
            task="img2img",
            prompts=as_texts(prompt, "prompt"),
            negative_prompts=as_texts(negative_prompt, "negative_prompt"),
            steps=steps,
            sampler=sampler,
            scheduler=scheduler,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            zero_terminal_snr=zero_terminal_snr,
            seed=seed,
            width=width,
            height=height,
            batch_size=batch_size,
            n_iter=n_iter,
            subseed=subseed,
            subseed_strength=subseed_strength,
            seed_resize_from=seed_resize_from,
            rng=rng,
            controls=tuple(controlnets or ()),
            refiner=refiner,
            refiner_switch=refiner_switch,
            original_size=original_size,
            crop_top_left=crop_top_left,
            target_size=target_size,
            aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score,
            strength=strength,
            clip_skip=clip_skip,
            output_type=output_type,
            sampler_options=tuple(sampler_options.items()),
            image=None if image is None else to_pil(image),
            init_latents=init_latents,
            limits=limits,
        )
        return self.run(request, latents=latents, callback=callback, progress=progress)

    def inpaint(
        self,
        prompt: str | Sequence[str],
        image: ImageLike,
        mask: ImageLike,
        negative_prompt: str | Sequence[str] = "",
        *,
        strength: float = 1.0,
        mask_blur: float = 0.0,
        keep_unmasked: bool = True,
        steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        zero_terminal_snr: bool = False,
        sampler: str | None = None,
        scheduler: str | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 1,
        n_iter: int = 1,
        subseed: int | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from: tuple[int, int] | None = None,
        rng: str = "cpu",
        controlnets: Sequence | None = None,
        refiner=None,
        refiner_switch: float = 0.8,
        original_size: tuple[int, int] | None = None,
        crop_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        latents: torch.Tensor | None = None,
        callback: Callable[[dict], None] | None = None,
        progress: bool = True,
        clip_skip: int | None = None,
        output_type: str = "pil",
        limits: bool = True,
        **sampler_options,
    ) -> Output:
        """Repaint the white part of ``mask`` (same size as ``image``, greyscale-convertible).

        A 9-channel inpainting UNet is conditioned on the mask and the masked image's latents,
        as it was trained. An ordinary UNet keeps the unmasked region by latent blending: at
        every step its latents there are replaced by the image's latents noised to that step,
        and at the end by the clean latents. ``keep_unmasked`` (the default, as AUTOMATIC1111)
        then pastes the original pixels back outside the (blurred) mask, so the kept region
        does not even change by the VAE's round trip. ``mask_blur`` (pixels, Gaussian) softens
        the mask edge; without it the mask is binarised at 0.5.
        """
        picture = to_pil(image)
        request = GenerationRequest(
            task="inpaint",
            prompts=as_texts(prompt, "prompt"),
            negative_prompts=as_texts(negative_prompt, "negative_prompt"),
            steps=steps,
            sampler=sampler,
            scheduler=scheduler,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            zero_terminal_snr=zero_terminal_snr,
            seed=seed,
            width=width,
            height=height,
            batch_size=batch_size,
            n_iter=n_iter,
            subseed=subseed,
            subseed_strength=subseed_strength,
            seed_resize_from=seed_resize_from,
            rng=rng,
            controls=tuple(controlnets or ()),
            refiner=refiner,
            refiner_switch=refiner_switch,
            original_size=original_size,
            crop_top_left=crop_top_left,
            target_size=target_size,
            aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score,
            strength=strength,
            mask_blur=mask_blur,
            keep_unmasked=keep_unmasked,
            clip_skip=clip_skip,
            output_type=output_type,
            sampler_options=tuple(sampler_options.items()),
            image=picture,
            mask=to_mask(mask, size=picture.size),
            limits=limits,
        )
        return self.run(request, latents=latents, callback=callback, progress=progress)

"""The JSON bodies of AUTOMATIC1111's API, as far as this server uses them.

The fields we act on are typed (pydantic checks and coerces them as AUTOMATIC1111's own models
do); every other field is accepted and kept in ``model_extra``. AUTOMATIC1111 fields we do not
implement are listed in :data:`TXT2IMG_NOOP` / :data:`IMG2IMG_NOOP` with the values that have no
effect there, so that a client sending its defaults (``webuiapi`` sends about fifty fields) gets
no warning, while one asking for a feature we lack (``restore_faces: true``) is told it was
ignored.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = [
    "IMG2IMG_NOOP",
    "TXT2IMG_NOOP",
    "Img2ImgRequest",
    "PngInfoRequest",
    "Txt2ImgRequest",
    "ignored_fields",
]


def _not_bool(value: Any) -> Any:
    """pydantic turns ``true`` into 1 for an int field; a count or a seed given as a boolean is
    a client's mistake to report, not to guess."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


def _bool_only(value: Any) -> Any:
    """A switch is true or false, not "yes" or 1 (pydantic would take those)."""
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]


class Txt2ImgRequest(BaseModel):
    """``POST /sdapi/v1/txt2img``. ``None`` means the model's default (steps, CFG, sampler,
    size), unlike AUTOMATIC1111's fixed 50 steps / 512 px, so a small model gets its own."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: Int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # AUTOMATIC1111's deprecated spelling of sampler_name
    scheduler: str | None = None
    steps: Int | None = None
    cfg_scale: Float | None = None
    width: Int | None = None
    height: Int | None = None
    batch_size: Int = 1
    n_iter: Int = 1
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False
    # AUTOMATIC1111 1.6+'s refiner: a checkpoint of /sd-models (title, name or file name) that
    # takes over once refiner_switch_at of the way is done (None: 0.8, its UI's default);
    # None, "" or "None": no refiner
    refiner_checkpoint: str | None = None
    refiner_switch_at: Float | None = None
    # sd-pipeline's own, which AUTOMATIC1111 has no fields for (extensions, under these names):
    # CFG rescale's phi, and sampling on the zero-terminal-SNR schedule
    guidance_rescale: Float = 0.0
    zero_terminal_snr: Annotated[bool, BeforeValidator(_bool_only)] = False


class Img2ImgRequest(Txt2ImgRequest):
    """``POST /sdapi/v1/img2img``: img2img, or inpainting when ``mask`` is given."""

    init_images: list[Any] = Field(default_factory=list)
    mask: str | None = None
    denoising_strength: Float | None = None
    mask_blur: Float | None = None
    inpainting_fill: Int = 1
    inpaint_full_res: bool | int = False
    inpainting_mask_invert: Int = 0
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    """``POST /sdapi/v1/png-info``."""

    model_config = ConfigDict(extra="allow")

    image: str


ANY = object()  # the field has no effect whatever its value (it only acts with another one)

TXT2IMG_NOOP: dict[str, Any] = {
    "enable_hr": (False, None),
    "denoising_strength": ANY,  # txt2img uses it only for the hires fix
    "firstphase_width": ANY,
    "firstphase_height": ANY,
    "hr_scale": ANY,
    "hr_upscaler": ANY,
    "hr_second_pass_steps": ANY,
    "hr_resize_x": ANY,
    "hr_resize_y": ANY,
    "hr_checkpoint_name": ANY,
    "hr_sampler_name": ANY,
    "hr_scheduler": ANY,
    "hr_prompt": ANY,
    "hr_negative_prompt": ANY,
    "hr_cfg": ANY,
    "hr_distilled_cfg": ANY,
    "hr_additional_modules": ANY,
    "styles": ([], None),
    "subseed": ANY,  # only with subseed_strength
    "subseed_strength": (0, None),
    "seed_resize_from_h": (0, -1, None),
    "seed_resize_from_w": (0, -1, None),
    "restore_faces": (False, None),
    "tiling": (False, None),
    "do_not_save_samples": ANY,
    "do_not_save_grid": ANY,
    "eta": (None, 0, 1),
    "s_churn": (0, None),
    "s_tmax": (0, None),
    "s_tmin": (0, None),
    "s_noise": (1, None),
    "s_min_uncond": (0, None),
    "script_name": (None, ""),
    "script_args": ([], None),
    "alwayson_scripts": ({}, None),
    "disable_extra_networks": ANY,
    "comments": ANY,
    "infotext": (None, ""),
    "force_task_id": ANY,
    "firstpass_image": (None, ""),
    "distilled_cfg_scale": ANY,
}
IMG2IMG_NOOP: dict[str, Any] = {
    **{k: v for k, v in TXT2IMG_NOOP.items() if k != "denoising_strength"},
    "resize_mode": (0, None),
    "image_cfg_scale": ANY,  # instruct-pix2pix models only
    "mask_blur_x": ANY,
    "mask_blur_y": ANY,
    "mask_round": ANY,
    "inpaint_full_res_padding": ANY,
    "initial_noise_multiplier": (1, None),
    "latent_mask": (None, ""),
}


def ignored_fields(extra: dict[str, Any], noop: dict[str, Any]) -> list[str]:
    """Warnings for the fields of ``extra`` (what the typed model did not take) that would have
    an effect in AUTOMATIC1111 but have none here, and for fields AUTOMATIC1111 does not know."""
    unsupported, unknown = [], []
    for name, value in extra.items():
        if name not in noop:
            unknown.append(name)
        elif noop[name] is not ANY and value not in noop[name]:
            unsupported.append(f"{name}={value!r}")
    warnings = []
    if unsupported:
        warnings.append(f"not supported, ignored: {', '.join(unsupported)}")
    if unknown:
        warnings.append(f"unknown fields, ignored: {', '.join(sorted(unknown))}")
    return warnings

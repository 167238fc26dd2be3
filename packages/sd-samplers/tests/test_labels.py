"""The registry's facts about each sampler: AUTOMATIC1111 labels and the noise it draws."""

import inspect

import pytest
import torch

from sd_samplers import (
    SAMPLERS,
    NoiseSchedule,
    parse_sampler,
    sample,
    sampler_from_label,
    sampler_label,
    split_sampler,
)

# AUTOMATIC1111's labels, as its sd_samplers_kdiffusion.py / sd_samplers_timesteps.py list them
# (typed here from its sampler table, not generated from ours).
A1111_LABELS = {
    "euler_a": "Euler a", "euler": "Euler", "lms": "LMS", "heun": "Heun", "dpm2": "DPM2",
    "dpm2_a": "DPM2 a", "dpmpp_2s_a": "DPM++ 2S a", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_sde": "DPM++ SDE", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "dpmpp_3m_sde": "DPM++ 3M SDE",
    "ddim": "DDIM", "plms": "PLMS", "unipc": "UniPC", "lms_karras": "LMS Karras",
    "dpm2_karras": "DPM2 Karras", "dpm2_a_karras": "DPM2 a Karras",
    "dpmpp_2s_a_karras": "DPM++ 2S a Karras", "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_sde_karras": "DPM++ SDE Karras", "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "dpmpp_2m_sde_heun_karras": "DPM++ 2M SDE Heun Karras",
    "dpmpp_3m_sde_karras": "DPM++ 3M SDE Karras",
    "dpmpp_2m_sde_exponential": "DPM++ 2M SDE Exponential",
    "dpmpp_2m_sde_heun_exponential": "DPM++ 2M SDE Heun Exponential",
    "dpmpp_3m_sde_exponential": "DPM++ 3M SDE Exponential",
    "dpm_fast": "DPM fast", "dpm_adaptive": "DPM adaptive", "restart": "Restart", "lcm": "LCM",
    "ddim_cfg_pp": "DDIM CFG++",
}  # fmt: skip
# the samplers AUTOMATIC1111 lacks, under the names Forge / ComfyUI show for them
OTHER_LABELS = {
    "euler_cfg_pp": "Euler CFG++",
    "euler_a_cfg_pp": "Euler a CFG++",
    "ipndm": "iPNDM",
    "ddpm": "DDPM",
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_has_a_label_that_reads_back(name):
    label = sampler_label(name)
    assert label and label == SAMPLERS[name].label
    assert sampler_from_label(label) == name
    assert sampler_from_label(label.upper()) == name  # A1111 matches labels case-insensitively
    assert sampler_from_label(name) == name  # our own names are accepted as they are


@pytest.mark.parametrize("name", sorted(A1111_LABELS | OTHER_LABELS))
def test_labels_are_automatic1111s(name):
    assert sampler_label(name) == (A1111_LABELS | OTHER_LABELS)[name]


def test_every_sampler_is_labelled_here():
    assert set(SAMPLERS) == set(A1111_LABELS) | set(OTHER_LABELS)


@pytest.mark.parametrize(
    ("label", "schedule", "pair"),
    [
        ("Euler", "Karras", ("euler", "karras")),
        ("Euler a", "Align Your Steps", ("euler_a", "align_your_steps")),
        ("DPM++ 2M", "Karras", ("dpmpp_2m", "karras")),
        ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),
        ("DPM++ 2M Karras", "Automatic", ("dpmpp_2m", "karras")),
        ("DPM++ 2M Karras", "Exponential", ("dpmpp_2m", "exponential")),  # schedule type wins
        ("DPM++ 3M SDE Exponential", "", ("dpmpp_3m_sde", "exponential")),
        ("Euler a", "Automatic", ("euler_a", None)),
        ("Euler", "Uniform", ("euler", None)),  # the sampler's own ladder
        ("Euler", "Normal", ("euler", "normal")),
        ("UniPC", "SGM Uniform", ("unipc", "sgm_uniform")),
        ("LCM", "SGM Uniform", ("lcm", "sgm_uniform")),
        ("LCM", "Uniform", ("lcm", None)),
        ("Restart", "Karras", ("restart", None)),
        ("Restart", "Exponential", ("restart", "exponential")),
        ("DPM++ SDE", "DDIM", ("dpmpp_sde", "ddim_uniform")),
        ("DPM2 a", "Beta", ("dpm2_a", "beta")),
        ("DDIM", "Karras", ("ddim", None)),  # A1111 ignores it for the CompVis samplers
        ("PLMS", "Automatic", ("plms", None)),
        ("euler", "kl_optimal", ("euler", "kl_optimal")),  # our own names
        ("dpmpp_2m_karras", None, ("dpmpp_2m", "karras")),
    ],
)
def test_parse_sampler_gives_any_combination(label, schedule, pair):
    assert parse_sampler(label, schedule) == pair


def test_split_sampler():
    assert split_sampler("dpmpp_2m_sde_heun_exponential") == ("dpmpp_2m_sde_heun", "exponential")
    assert split_sampler("euler") == ("euler", None)
    for name in SAMPLERS:  # the pair runs the same sigmas as the name
        base, scheduler = split_sampler(name)
        schedule = NoiseSchedule.scaled_linear()
        ours = SAMPLERS[name].sigmas(schedule, 9)
        assert torch.equal(SAMPLERS[base].sigmas(schedule, 9, scheduler), ours)
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        split_sampler("nope")
    with pytest.raises(ValueError, match="unknown schedule type 'Karras2'"):
        parse_sampler("Euler", "Karras2")


@pytest.mark.parametrize(
    ("label", "schedule", "name"),
    [
        ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
        ("DPM++ 2M SDE Heun", "Karras", "dpmpp_2m_sde_heun_karras"),
        ("DPM++ 3M SDE", "Exponential", "dpmpp_3m_sde_exponential"),
        ("Euler a", "Automatic", "euler_a"),
        ("Euler", "Uniform", "euler"),
        ("DPM++ 2M Karras", "Karras", "dpmpp_2m_karras"),  # both ways at once
        ("DPM++ 2M", None, "dpmpp_2m"),
    ],
)
def test_a1111_19_schedule_type_field(label, schedule, name):
    assert sampler_from_label(label, schedule) == name


def test_unknown_labels_and_combinations_are_named():
    with pytest.raises(ValueError, match=r"'Eular'.*Euler a"):
        sampler_from_label("Eular")
    with pytest.raises(ValueError, match=r"'Euler' with schedule type 'Karras'.*parse_sampler"):
        sampler_from_label("Euler", "Karras")
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        sampler_label("nope")


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_noise_trait_matches_the_function(name):
    """A sampler said to take a noise source accepts ``noise_sampler``; options said to make it
    draw noise are parameters of its function."""
    spec = SAMPLERS[name]
    params = inspect.signature(spec.fn).parameters
    assert (spec.noise is not None) == ("noise_sampler" in params)
    assert all(option in params for option in spec.noise_options)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_draws_noise_says_whether_the_seed_matters(name):
    """Run each sampler twice with different generators: the results differ exactly when the
    registry says the sampler draws noise."""
    schedule = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
    noise = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))

    def model(x, t, with_uncond=False):
        return (0.3 * x, 0.2 * x) if with_uncond else 0.3 * x

    def run(seed, steps):
        g = torch.Generator().manual_seed(seed)
        return sample(name, model, noise, schedule, steps, generator=g, progress=False)

    for steps in (4, 20):
        differs = not torch.equal(run(1, steps), run(2, steps))
        assert differs == SAMPLERS[name].draws_noise(steps=steps), steps
    assert SAMPLERS[name].draws_noise() == SAMPLERS[name].draws_noise(steps=20)


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [("ddim", "eta", 0.5), ("euler", "s_churn", 0.5), ("ddim_cfg_pp", "eta", 1.0),
     ("restart", "restart_list", {0.5: [3, 1, 2.0]})],
)  # fmt: skip
def test_options_that_draw_noise(name, option, value):
    off = {"restart_list": {}}.get(option, 0)
    assert not SAMPLERS[name].draws_noise({option: off}, steps=4)
    assert SAMPLERS[name].draws_noise({option: value}, steps=4)


def test_cfg_pp_traits():
    for name in ("euler_cfg_pp", "euler_a_cfg_pp", "ddim_cfg_pp"):
        assert SAMPLERS[name].needs_uncond
    assert not any(s.needs_uncond for n, s in SAMPLERS.items() if "cfg_pp" not in n)
    # A1111 divides the CFG scale by 12.5 for DDIM CFG++ (its "CFG++ maps 12.5 to 1")
    assert SAMPLERS["ddim_cfg_pp"].cfg_scale_multiplier == 1 / 12.5
    assert SAMPLERS["euler_cfg_pp"].cfg_scale_multiplier == 1.0

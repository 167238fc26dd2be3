"""The registry's facts about each sampler: AUTOMATIC1111 labels and the noise it draws."""

import inspect

import pytest
import torch

from sd_samplers import SAMPLERS, NoiseSchedule, sample, sampler_from_label, sampler_label

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
}  # fmt: skip


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_has_a_label_that_reads_back(name):
    label = sampler_label(name)
    assert label and label == SAMPLERS[name].label
    assert sampler_from_label(label) == name
    assert sampler_from_label(label.upper()) == name  # A1111 matches labels case-insensitively
    assert sampler_from_label(name) == name  # our own names are accepted as they are


@pytest.mark.parametrize("name", sorted(A1111_LABELS))
def test_labels_are_automatic1111s(name):
    assert sampler_label(name) == A1111_LABELS[name]


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
    with pytest.raises(ValueError, match="'Euler' with schedule type 'Karras'"):
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

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return sample(name, lambda x, t: 0.3 * x, noise, schedule, 4, generator=g, progress=False)

    differs = not torch.equal(run(1), run(2))
    assert differs == SAMPLERS[name].draws_noise()


@pytest.mark.parametrize(("name", "option"), [("ddim", "eta"), ("euler", "s_churn")])
def test_options_that_draw_noise(name, option):
    assert not SAMPLERS[name].draws_noise({option: 0})
    assert SAMPLERS[name].draws_noise({option: 0.5})

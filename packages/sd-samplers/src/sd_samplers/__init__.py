"""Noise schedules and samplers for diffusion models: DDIM, PLMS, Euler, DPM++, UniPC and more, model-agnostic."""

from sd_samplers._version import __version__

__all__ = ["__version__"]

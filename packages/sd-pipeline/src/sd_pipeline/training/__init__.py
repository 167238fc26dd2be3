"""Training: fine-tune a Stable Diffusion checkpoint, or train a small one from scratch.

``sd-train finetune``: the UNet (optionally the text encoder) of a checkpoint, on a folder of
captioned images (:mod:`~sd_pipeline.training.data`), with the noise-prediction loss
(v-prediction with ``prediction="v"``). ``sd-train lora``: LoRA adapters (sd-lora's
``sd_lora.training``) on a checkpoint's frozen UNet and/or text encoder, written as a kohya
``.safetensors``. ``sd-train scratch``: the latent-diffusion recipe at a
small size (:mod:`~sd_pipeline.training.stages`). Settings: :class:`TrainConfig`, from a JSON
recipe (:func:`load_recipe`) and flags (:mod:`~sd_pipeline.training.cli`).

    from sd_pipeline.training import TrainConfig, train
    model = train(TrainConfig(mode="scratch", data="shapes-64", resolution=64, ...))

The shapes dataset (:mod:`~sd_pipeline.training.shapes`) and its analyser
(:mod:`~sd_pipeline.training.evaluate`) are here too.
"""

from sd_pipeline.training.config import TrainConfig, TrainingError, load_recipe
from sd_pipeline.training.data import DataError, ImageFolder
from sd_pipeline.training.run import export, train

__all__ = [
    "DataError",
    "ImageFolder",
    "TrainConfig",
    "TrainingError",
    "export",
    "load_recipe",
    "train",
]

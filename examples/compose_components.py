"""Stable Diffusion by hand: each part from its own package, joined in a dozen lines.

    python examples/compose_components.py

This is what `StableDiffusion.txt2img` does, without the conveniences: the tokenizer and text
encoder (sd-clip) turn the prompt into a context, the UNet (sd-unet) predicts the noise with
classifier-free guidance, a sampler (sd-samplers) walks from noise to latents, and the VAE
(sd-vae) decodes the latents to pixels. The weights are those of the bundled model.
"""

import dataclasses

import torch

from sd_clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from sd_pipeline import bundled_checkpoint, tensor_to_pil
from sd_samplers import NoiseSchedule, sample
from sd_unet import UNet, UNetConfig
from sd_vae import AutoencoderKL, AutoencoderKLConfig

# The bundled checkpoint (an SD single file; any SD 1.x file works the same way): each package
# reads only its own tensors from it. The bundled file is float16: compute in float32 on a CPU.
path = bundled_checkpoint()
if path is not None:
    vae = AutoencoderKL.from_checkpoint(path, dtype=torch.float32)
    text_encoder = CLIPTextModel.from_checkpoint(path, dtype=torch.float32)
    unet = UNet.from_checkpoint(path, dtype=torch.float32)
else:  # an install without the bundled weights: random tiny parts, so that the code still runs
    vae, text_encoder = (
        AutoencoderKL(AutoencoderKLConfig.tiny()),
        CLIPTextModel(CLIPTextConfig.tiny()),
    )
    unet = UNet(dataclasses.replace(UNetConfig.tiny(), context_dim=text_encoder.config.width))
tokenizer = CLIPTokenizer(max_length=text_encoder.config.max_positions)
schedule = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)  # SD's training schedule

prompt, guidance, size = "a green square on a yellow background", 4.0, 64
with torch.inference_mode():
    # 1. text -> context: the unconditional ("") and the conditional rows in one batch
    context = text_encoder(tokenizer(["", prompt]))

    # 2. the noise predictor the sampler calls: one UNet pass for both rows, then guidance
    def model(x, t):
        uncond, cond = unet(torch.cat([x, x]), torch.cat([t, t]), context).chunk(2)
        return uncond + guidance * (cond - uncond)

    # 3. noise -> latents with a sampler of sd-samplers
    g = torch.Generator().manual_seed(4)
    f = vae.config.downscale
    noise = torch.randn(1, vae.config.latent_channels, size // f, size // f, generator=g)
    latents = sample("dpmpp_2m", model, noise, schedule, steps=20, generator=g) * (
        1 / vae.config.scaling_factor
    )

    # 4. latents -> pixels (the UNet works on latents scaled by 0.18215, the VAE on unscaled)
    image = vae.decode(latents)

tensor_to_pil(image)[0].save("compose_components.png")
print("wrote compose_components.png")

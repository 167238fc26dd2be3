"""The two training losses, each ``loss(trainer, indices, generators) -> scalar tensor``.

``indices`` are this process's dataset indices of one micro-step; ``generators`` one per
sample, so that every random draw is a function of the sample's position in the run.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = ["autocast", "diffusion", "reconstruction"]


def autocast(mixed_precision: str, device: torch.device):
    """The forward pass's precision: float32 weights, bf16/fp16 matmuls when asked."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def images(trainer, indices, generators) -> torch.Tensor:
    """The samples' images (cropped and flipped by their own generators) on the device."""
    out = [trainer.data.batch([i], g)[0] for i, g in zip(indices, generators)]
    return torch.cat(out).to(trainer.device)


def reconstruction(trainer, indices, generators) -> torch.Tensor:
    """The VAE's loss: L1 + MSE of the reconstruction, plus a weighted KL term."""
    vae, c = trainer.models["vae"], trainer.config
    x = images(trainer, indices, generators)
    with autocast(c.mixed_precision, trainer.device):
        post = vae.encode(x)
        noise = torch.cat([torch.randn(post.mean.shape[1:], generator=g)[None] for g in generators])
        z = post.mean + post.std * noise.to(trainer.device)
        recon = vae.decode(z)
    recon = recon.float()
    rec = (recon - x).abs().mean() + F.mse_loss(recon, x)
    # KL(q || N(0, 1)) per image, summed over latent elements, per image pixel (LDM's
    # weighting: both terms are sums over the image in the original, weight 1e-6).
    kl = 0.5 * (post.mean.float() ** 2 + post.var.float() - 1 - post.logvar.float())
    kl = kl.flatten(1).sum(1).mean() / x[0].numel()
    return rec + c.kl_weight * kl


def _draws(trainer, generators, shape, flip: bool):
    """Per sample: flip (unless the image loader drew it already, as the first draw of the
    same generator), posterior noise, diffusion noise, timestep, caption dropout."""
    c = trainer.config
    flips, post_noise, eps, ts, drop = [], [], [], [], []
    for g in generators:
        flips.append(bool(flip and c.random_flip and torch.rand((), generator=g) < 0.5))
        post_noise.append(torch.randn(shape, generator=g))
        eps.append(torch.randn(shape, generator=g))
        ts.append(int(torch.randint(trainer.schedule.num_timesteps, (), generator=g)))
        drop.append(bool(torch.rand((), generator=g) < c.cond_dropout))
    return flips, torch.stack(post_noise), torch.stack(eps), ts, drop


def _latents(trainer, indices, generators):
    """Scaled latents of the samples, drawn from the frozen VAE's posterior."""
    vae = trainer.models["vae"]
    if trainer.latents is not None:
        shape, post = trainer.latents[False][indices[0]].shape[1:], None
    else:
        with torch.no_grad():
            post = vae.encode(images(trainer, indices, generators))
        shape = post.mean.shape[1:]
    # Cached or not, a sample draws the same numbers (without random crops): the same steps.
    flips, post_noise, noise, ts, drop = _draws(trainer, generators, shape, flip=post is None)
    post_noise = post_noise.to(trainer.device)
    if post is None:
        moments = torch.stack([trainer.latents[f][i] for i, f in zip(indices, flips)])
        z = moments[:, 0] + moments[:, 1] * post_noise
    else:
        z = post.mean + post.std * post_noise
    return z * vae.config.scaling_factor, noise.to(trainer.device), ts, drop


def diffusion(trainer, indices, generators) -> torch.Tensor:
    """The UNet's loss: MSE of its noise (or v) prediction at a random timestep."""
    c = trainer.config
    z, noise, ts, drop = _latents(trainer, indices, generators)
    t = torch.tensor(ts, device=trainer.device)
    ab = trainer.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * z + (1 - ab).sqrt() * noise
    target = noise if c.prediction == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * z
    captions = ["" if d else trainer.data.captions[i] for i, d in zip(indices, drop)]
    with autocast(c.mixed_precision, trainer.device):
        if trainer.contexts is not None:  # the frozen text encoder's outputs, cached
            context = torch.cat([trainer.contexts[text] for text in captions])
        else:
            context = trainer.models["text_encoder"](trainer.tokenizer(captions).to(trainer.device))
        pred = trainer.models["unet"](x_t, t.float(), context)
    return F.mse_loss(pred.float(), target)

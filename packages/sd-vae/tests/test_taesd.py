"""TAESD's decoder against diffusers' AutoencoderTiny with the same random weights."""

import pytest
import torch
from safetensors.torch import save_file

from sd_vae import CheckpointError
from sd_vae.taesd import TinyDecoder


def _random_decoder(seed=0):
    torch.manual_seed(seed)
    model = TinyDecoder()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * (2 / p[0].numel()) ** 0.5)
    return model.eval()


def test_matches_diffusers_autoencoder_tiny(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ours = _random_decoder()
    path = tmp_path / "taesd_decoder.safetensors"
    save_file(ours.state_dict(), str(path))  # the published layout: "1.weight", ...
    reference = diffusers.AutoencoderTiny()
    # diffusers' decoder.layers are ours one index down (its clamp is not a layer)
    shifted = {f"{int(k.split('.')[0]) - 1}.{k.split('.', 1)[1]}": v
               for k, v in ours.state_dict().items()}  # fmt: skip
    reference.decoder.layers.load_state_dict(shifted)
    latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    loaded = TinyDecoder.from_checkpoint(path)
    with torch.no_grad():
        expected = reference.eval().decode(latents).sample  # diffusers returns [-1, 1]
        got = loaded(latents)
    assert got.shape == (2, 3, 64, 48)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_diffusers_layout_and_errors(tmp_path):
    ours = _random_decoder()
    folder = tmp_path / "taesd"
    folder.mkdir()
    save_file({f"decoder.layers.{int(k.split('.')[0]) - 1}.{k.split('.', 1)[1]}": v
               for k, v in ours.state_dict().items()},
              str(folder / "diffusion_pytorch_model.safetensors"))  # fmt: skip
    loaded = TinyDecoder.from_checkpoint(folder)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values())
    )
    junk = tmp_path / "junk.safetensors"
    save_file({"weight": torch.zeros(2)}, str(junk))
    with pytest.raises(CheckpointError, match="not a TAESD decoder"):
        TinyDecoder.from_checkpoint(junk)

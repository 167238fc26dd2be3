"""Parity with transformers' CLIPTextModel: the same random weights, through real checkpoint layouts.

transformers is a test-only dependency. Works with transformers 4.x (whose CLIPTextModel keeps a
``text_model.`` level) and 5.x (which drops it from its own state dict).
"""

import pytest
import torch
from safetensors.torch import save_file

from sd_clip import CLIPTextConfig, CLIPTextModel

transformers = pytest.importorskip("transformers")

SD_PREFIX = "cond_stage_model.transformer."


def reference(config: CLIPTextConfig, seed: int = 0):
    """transformers' CLIPTextModel of this shape, every parameter random (eager attention)."""
    ref_config = transformers.CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=config.mlp_width,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        max_position_embeddings=config.max_positions,
        hidden_act=config.activation,
        layer_norm_eps=config.layer_norm_eps,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    ref = transformers.CLIPTextModel(ref_config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "norm.w" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))  # non-trivial LayerNorm scales
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return ref


def sd_layout(ref) -> dict[str, torch.Tensor]:
    """The reference's weights as a Stable Diffusion 1.x single file stores them."""
    state = ref.state_dict()
    if not any(k.startswith("text_model.") for k in state):  # transformers 5
        state = {"text_model." + k: v for k, v in state.items()}
    return {SD_PREFIX + k: v.contiguous() for k, v in state.items()}


def reference_outputs(ref, ids):
    """Last hidden state, and the penultimate layer through the final LayerNorm (clip skip 2)."""
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        final_norm = getattr(ref, "text_model", ref).final_layer_norm
        return out.last_hidden_state, final_norm(out.hidden_states[-2])


def errors(ours, theirs):
    abs_err = (ours - theirs).abs().max().item()
    return abs_err, abs_err / theirs.abs().max().item()


def check_parity(config, tmp_path, ids):
    ref = reference(config)
    path = tmp_path / "sd.safetensors"
    save_file(sd_layout(ref), str(path))
    ours = CLIPTextModel.from_checkpoint(path, config=config)
    last, penultimate = reference_outputs(ref, ids)
    with torch.no_grad():
        got_last, got_penultimate = ours(ids), ours(ids, clip_skip=2)
    for name, got, want in [
        ("last", got_last, last),
        ("penultimate", got_penultimate, penultimate),
    ]:
        abs_err, rel_err = errors(got, want)
        print(f"{config.width}x{config.layers} {name}: max abs {abs_err:.2e}, rel {rel_err:.2e}")
        assert abs_err <= 1e-5, (name, abs_err)
    assert not torch.allclose(last, penultimate, atol=1e-3)  # the two outputs really differ


def prompt_ids(batch, seed=0):
    """Token ids shaped like SD's: start token, words, end token, padded with the end token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, 77), 49407)
    ids[:, 0] = 49406
    for b in range(batch):
        n = int(torch.randint(1, 76, (1,), generator=g))
        ids[b, 1 : n + 1] = torch.randint(0, 49406, (n,), generator=g)
    return ids


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_parity_tiny(tmp_path, activation):
    config = CLIPTextConfig(width=128, layers=3, heads=2, mlp_width=512, activation=activation)
    check_parity(config, tmp_path, prompt_ids(3))


def test_layout_matches_transformers_at_full_size():
    # Every parameter name and shape of SD 1.5's text encoder, without allocating any weight.
    with torch.device("meta"):
        ref = reference(CLIPTextConfig.sd15())
        ours = CLIPTextModel(CLIPTextConfig.sd15())
    want = {k: tuple(v.shape) for k, v in sd_layout(ref).items()}
    got = {SD_PREFIX + k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
    assert ours.num_parameters() == ref.num_parameters()


def test_diffusers_folder_written_by_transformers(tmp_path):
    # save_pretrained writes config.json + model.safetensors, as in a diffusers text_encoder/.
    config = CLIPTextConfig(width=128, layers=2, heads=4, mlp_width=256, activation="gelu")
    ref = reference(config, seed=5)
    ref.save_pretrained(tmp_path / "text_encoder")
    ours = CLIPTextModel.from_checkpoint(tmp_path)  # the model root: finds text_encoder/
    assert ours.config == config  # read from config.json, heads=4 included
    ids = prompt_ids(2, seed=1)
    last, _ = reference_outputs(ref, ids)
    with torch.no_grad():
        assert errors(ours(ids), last)[0] <= 1e-5


@pytest.mark.slow
def test_parity_sd15_full_size(tmp_path):
    check_parity(CLIPTextConfig.sd15(), tmp_path, prompt_ids(2))

"""Each file layout read and merged: the merged weights against LyCORIS' own functions for the
same tensors (lycoris-lora, test-only), and the diffusers / PEFT names onto the same layers."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyTextEncoder, TinyUNet, randomize
from torch import nn

from sd_lora import LoRA, LoRAError, applied

lycoris = pytest.importorskip("lycoris")
from lycoris.functional import general, locon, loha, lokr  # noqa: E402

LINEAR = "text_model.encoder.layers.0.mlp.fc1"  # 12 -> 48
CONV3 = "input_blocks.3.0.in_layers.2"  # 8 -> 16, 3x3
CONV1 = "input_blocks.3.0.skip_connection"  # 8 -> 16, 1x1


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, g):
    return torch.randn(*shape, generator=g)


def _merged(path: str, tensors: dict[str, torch.Tensor], weight: float = 1.0):
    """(original weight, weight after merging ``tensors`` as the one layer at ``path``)."""
    te = path.startswith("text_model")
    model = randomize(TinyTextEncoder() if te else TinyUNet())
    prefix = ("lora_te_" if te else "lora_unet_") + path.replace(".", "_")
    lora = LoRA.from_state_dict({f"{prefix}.{k}": v for k, v in tensors.items()})
    module = dict(model.named_modules())[path]
    original = module.weight.detach().clone()
    lora.merge(model, weight)
    return original, module.weight.detach().clone(), lora


def _close(ours, theirs):
    torch.testing.assert_close(ours, theirs.reshape(ours.shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", [LINEAR, CONV3, CONV1])
@pytest.mark.parametrize("alpha", [None, 1.0, 8.0])
def test_kohya_lora_and_locon(path, alpha):
    g = _g()
    te = path.startswith("text_model")
    w_shape = (48, 12) if te else ((16, 8, 3, 3) if path == CONV3 else (16, 8, 1, 1))
    rank = 4
    down = _rand(rank, *w_shape[1:], g=g)
    up = _rand(w_shape[0], rank, *([1, 1] if len(w_shape) == 4 else []), g=g)
    tensors = {"lora_down.weight": down, "lora_up.weight": up}
    if alpha is not None:
        tensors["alpha"] = torch.tensor(alpha)
    original, merged, lora = _merged(path, tensors, weight=0.7)
    scale = (alpha if alpha is not None else rank) / rank
    reference = locon.diff_weight(down, up, None, gamma=scale)
    _close(merged, original + 0.7 * reference.reshape(original.shape))
    assert lora.rank == rank and lora.alpha == alpha


def test_locon_tucker_lora_mid():
    g, rank = _g(1), 3
    down, mid, up = (
        _rand(rank, 8, 1, 1, g=g),
        _rand(rank, rank, 3, 3, g=g),
        _rand(16, rank, 1, 1, g=g),
    )
    tensors = {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up,
               "alpha": torch.tensor(2.0)}  # fmt: skip
    original, merged, _ = _merged(CONV3, tensors)
    reference = locon.diff_weight(down, up, mid, gamma=2.0 / rank)
    _close(merged, original + reference)


@pytest.mark.parametrize("path, tucker", [(LINEAR, False), (CONV3, False), (CONV3, True)])
def test_loha_against_lycoris(path, tucker):
    g, rank = _g(2), 4
    out, inn = (48, 12) if path == LINEAR else (16, 8)
    k = 3 if path == CONV3 else 1
    if tucker:
        t = {"hada_t1": _rand(rank, rank, k, k, g=g), "hada_t2": _rand(rank, rank, k, k, g=g)}
        t |= {f"hada_w{i}_a": _rand(rank, out, g=g) for i in (1, 2)}
        t |= {f"hada_w{i}_b": _rand(rank, inn, g=g) for i in (1, 2)}
    else:
        t = {f"hada_w{i}_a": _rand(out, rank, g=g) for i in (1, 2)}
        t |= {f"hada_w{i}_b": _rand(rank, inn * k * k, g=g) for i in (1, 2)}
    t["alpha"] = torch.tensor(2.0)
    original, merged, lora = _merged(path, t, weight=1.3)
    reference = loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"],
                                 t.get("hada_t1"), t.get("hada_t2"), gamma=2.0 / rank)  # fmt: skip
    _close(merged, original + 1.3 * reference.reshape(original.shape))
    assert lora.rank == rank


LOKR_CASES = {  # name: (path, tensors' shapes), weights 48x12 = kron((4x3), (12x4)) etc.
    "full_w1_low_rank_w2": (LINEAR, {"lokr_w1": (4, 3), "lokr_w2_a": (12, 2), "lokr_w2_b": (2, 4)}),
    "both_low_rank": (
        LINEAR,
        {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 3), "lokr_w2_a": (12, 2), "lokr_w2_b": (2, 4)},
    ),
    "both_full": (LINEAR, {"lokr_w1": (4, 3), "lokr_w2": (12, 4)}),
    "conv_full_w2": (CONV3, {"lokr_w1": (4, 2), "lokr_w2": (4, 4, 3, 3)}),
    "conv_flat_w2": (CONV3, {"lokr_w1": (4, 2), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 4 * 9)}),
    "conv_tucker": (
        CONV3,
        {"lokr_w1": (4, 2), "lokr_w2_a": (2, 4), "lokr_w2_b": (2, 4), "lokr_t2": (2, 2, 3, 3)},
    ),
}


@pytest.mark.parametrize("case", list(LOKR_CASES))
def test_lokr_against_lycoris(case):
    path, shapes = LOKR_CASES[case]
    g = _g(3)
    t = {k: _rand(*s, g=g) for k, s in shapes.items()}
    t["alpha"] = torch.tensor(3.0)
    original, merged, _ = _merged(path, t, weight=0.5)
    names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    gamma = 3.0  # lycoris.functional divides it by the rank, read from w1_a or w2_a ...
    if "lokr_t2" in t:  # ... whose second axis is not the rank in the Tucker layout (it is
        # out_k there); the rank is lokr_w2_b's first axis, as AUTOMATIC1111 and LyCORIS'
        # module (its lora_dim) have it
        gamma *= t["lokr_w2_a"].shape[1] / t["lokr_w2_b"].shape[0]
    reference = lokr.diff_weight(*(t.get(n) for n in names), gamma=gamma)
    _close(merged, original + 0.5 * reference.reshape(original.shape))


def test_full_diff_and_bias():
    g = _g(4)
    diff, diff_b = _rand(48, 12, g=g), _rand(48, g=g)
    model = randomize(TinyTextEncoder())
    module = dict(model.named_modules())[LINEAR]
    w, b = module.weight.detach().clone(), module.bias.detach().clone()
    key = "lora_te_" + LINEAR.replace(".", "_")
    lora = LoRA.from_state_dict({f"{key}.diff": diff, f"{key}.diff_b": diff_b})
    lora.merge(model, 2.0)
    _close(module.weight.detach(), w + 2 * diff)
    _close(module.bias.detach(), b + 2 * diff_b)
    assert lora.rank is None


@pytest.mark.parametrize("on_out", [True, False])
def test_dora_against_lycoris(on_out):
    g, rank = _g(5), 4
    down, up = _rand(rank, 12, g=g), _rand(48, rank, g=g)
    magnitude = _rand(48, 1, g=g).abs() if on_out else _rand(1, 12, g=g).abs()
    tensors = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(2.0),
               "dora_scale": magnitude}  # fmt: skip
    original, merged, _ = _merged(LINEAR, tensors)
    updated = original + locon.diff_weight(down, up, None, gamma=2.0 / rank)
    reference = general.weight_decompose(updated, magnitude, 1.0, wd_on_out=on_out)
    _close(merged, reference)


def test_ia3_against_lycoris():
    from lycoris.modules.ia3 import IA3Module

    g = _g(6)
    scale = _rand(48, g=g) * 0.1
    key = "lora_te_" + LINEAR.replace(".", "_")
    original, merged, _ = _merged(LINEAR, {"weight": scale, "on_input": torch.tensor(0)})
    module = nn.Linear(12, 48)
    module.weight.data.copy_(original)
    reference = IA3Module.make_module_from_state_dict(key, module, scale).get_merged_weight()[0]
    _close(merged, reference)


def test_diffusers_and_peft_names_reach_the_same_layers():
    """One update written as kohya (diffusers paths), kohya (CompVis paths), PEFT lora_A/B,
    old diffusers lora.down/up and attention processors: the same merged weights."""
    g = _g(7)
    down, up = _rand(2, 8, g=g), _rand(8, 2, g=g)
    q = "transformer_blocks.0.attn1.to_q"
    layouts = {
        "kohya": {
            f"lora_unet_down_blocks_0_attentions_0_{q.replace('.', '_')}": ("lora_down", "lora_up")
        },
        "compvis": {f"lora_unet_input_blocks_1_1_{q.replace('.', '_')}": ("lora_down", "lora_up")},
        "peft": {f"unet.down_blocks.0.attentions.0.{q}": ("lora_A", "lora_B")},
        "diffusers": {f"unet.down_blocks.0.attentions.0.{q}": ("lora.down", "lora.up")},
        "processor": {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora": (
                "down",
                "up",
            )
        },
    }
    results = {}
    for name, layout in layouts.items():
        ((layer, (d, u)),) = layout.items()
        model = randomize(TinyUNet())
        tensors = {f"{layer}.{d}.weight": down, f"{layer}.{u}.weight": up}
        LoRA.from_state_dict(tensors).merge(model)
        results[name] = model.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight.detach()
    original = randomize(TinyUNet()).input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight
    for merged in results.values():
        _close(merged, original.detach() + up @ down)


def test_peft_text_encoder_names():
    g = _g(8)
    down, up = _rand(2, 12, g=g), _rand(12, 2, g=g)
    model = randomize(TinyTextEncoder())
    original = model.text_model.encoder.layers[1].self_attn.k_proj.weight.detach().clone()
    LoRA.from_state_dict({
        "text_encoder.text_model.encoder.layers.1.self_attn.k_proj.lora_A.weight": down,
        "text_encoder.text_model.encoder.layers.1.self_attn.k_proj.lora_B.weight": up,
    }).merge(model)  # fmt: skip
    _close(
        model.text_model.encoder.layers[1].self_attn.k_proj.weight.detach(), original + up @ down
    )


# ---------------------------------------------------------------------------------------------
# What is refused, by name


def test_unknown_keys_are_named():
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(1, 1), "lora_unet_x.lora_up.weight": torch.ones(1, 1),
               "something_else.weight": torch.ones(1), "lora_unet_y.oft_blocks": torch.ones(1)}  # fmt: skip
    with pytest.raises(LoRAError, match="2 keys") as error:
        LoRA.from_state_dict(tensors)
    assert "'something_else.weight'" in str(error.value)
    assert "'lora_unet_y.oft_blocks'" in str(error.value)


def test_incomplete_layer_is_named():
    with pytest.raises(LoRAError, match=r"lora_te_text_model_encoder_layers_0_mlp_fc1.*lora_up"):
        LoRA.from_state_dict(
            {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 12)}
        )


def test_layer_the_model_lacks_is_named():
    lora = LoRA.from_state_dict({
        "lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight": torch.ones(2, 8),
        "lora_unet_down_blocks_3_attentions_0_proj_in.lora_up.weight": torch.ones(8, 2),
    })  # fmt: skip
    with pytest.raises(
        LoRAError, match="not in this UNet: 'lora_unet_down_blocks_3_attentions_0_proj_in'"
    ):
        lora.merge(TinyUNet())


def test_wrong_shape_is_refused_and_nothing_changes():
    model = randomize(TinyTextEncoder())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoRA.from_state_dict({
        "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_down.weight": torch.ones(2, 48),
        "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_up.weight": torch.ones(12, 2),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 16),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(48, 2),
    })  # fmt: skip
    with pytest.raises(LoRAError, match=r"mlp_fc1: .*\(48, 16\).*\(48, 12\)"):
        lora.merge(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sdxl_lora_is_refused():
    lora = LoRA.from_state_dict({
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 12),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(48, 2),
    })  # fmt: skip
    for model in (TinyTextEncoder(), TinyUNet()):
        with pytest.raises(LoRAError, match="SDXL"):
            lora.merge(model)


def test_sdxl_by_metadata_is_refused():
    lora = LoRA.from_state_dict(
        {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.ones(2, 8),
         "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.ones(8, 2)},
        metadata={"ss_base_model_version": "sdxl_base_v1-0"},
    )  # fmt: skip
    with pytest.raises(LoRAError, match="SDXL"):
        lora.merge(TinyUNet())


def test_a_lora_for_the_other_part_is_a_no_op():
    model = randomize(TinyTextEncoder())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoRA.from_state_dict({"lora_unet_conv_in.diff": torch.ones(8, 4, 3, 3)})
    lora.merge(model)
    lora.attach(model)
    assert applied(model) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_not_a_model():
    lora = LoRA.from_state_dict({"lora_unet_a.diff": torch.ones(1)})
    with pytest.raises(LoRAError, match="neither a UNet"):
        lora.merge(nn.Linear(2, 2))


def test_sdxl_lora_applies_to_the_parts_of_an_sdxl_model():
    """te1 layers go to the declared CLIP-L, te2 layers to bigG (a text encoder with a
    text_projection); each takes only its own, merged as lycoris-lora merges them."""
    from sd_lora import names

    g = _g(3)
    clip_l, clip_g = randomize(TinyTextEncoder()), randomize(TinyTextEncoder())
    clip_g.text_projection = nn.Linear(12, 12, bias=False)
    names.declare_sdxl_part(clip_l, "te1")
    tensors = {}
    for part in ("te1", "te2"):
        tensors[f"lora_{part}_{LINEAR.replace('.', '_')}.lora_down.weight"] = _rand(2, 12, g=g)
        tensors[f"lora_{part}_{LINEAR.replace('.', '_')}.lora_up.weight"] = _rand(48, 2, g=g)
    lora = LoRA.from_state_dict(tensors)
    for model, part in ((clip_l, "te1"), (clip_g, "te2")):
        assert names.sdxl_part(model) == part
        weight = model.get_submodule(LINEAR).weight.detach().clone()
        down = tensors[f"lora_{part}_{LINEAR.replace('.', '_')}.lora_down.weight"]
        up = tensors[f"lora_{part}_{LINEAR.replace('.', '_')}.lora_up.weight"]
        lora.merge(model)
        reference = weight + locon.diff_weight(down, up, None, gamma=1.0)  # no alpha: scale 1
        _close(model.get_submodule(LINEAR).weight.detach(), reference)
    # an SD 1.x text encoder (nothing declared, no projection) still refuses it
    with pytest.raises(LoRAError, match="SDXL LoRA"):
        lora.merge(randomize(TinyTextEncoder()))
    with pytest.raises(ValueError, match="part must be"):
        names.declare_sdxl_part(clip_l, "te3")

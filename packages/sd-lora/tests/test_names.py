"""The CompVis -> diffusers rule on the UNet's module tree, against names written out by hand
from diffusers' UNet2DConditionModel (down_blocks / mid_block / up_blocks)."""

from conftest import TinyTextEncoder, TinyUNet

from sd_lora import names

EXPECTED = {
    "time_embed.0": "time_embedding.linear_1",
    "input_blocks.0.0": "conv_in",
    "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
    "input_blocks.1.0.emb_layers.1": "down_blocks.0.resnets.0.time_emb_proj",
    "input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q": (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    ),
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj": (
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"
    ),
    "input_blocks.2.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.3.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks.3.0.out_layers.3": "down_blocks.1.resnets.0.conv2",
    "middle_block.0.in_layers.0": "mid_block.resnets.0.norm1",
    "middle_block.1.transformer_blocks.0.attn2.to_k": (
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    ),
    "middle_block.2.emb_layers.1": "mid_block.resnets.1.time_emb_proj",
    "output_blocks.0.0.skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
    "output_blocks.1.0.in_layers.2": "up_blocks.0.resnets.1.conv1",
    "output_blocks.1.1.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.2.1.proj_out": "up_blocks.1.attentions.0.proj_out",
    "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0": (
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0"
    ),
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def test_unet_diffusers_names_by_rule():
    paths = [
        n
        for n, m in TinyUNet().named_modules()
        if next(m.parameters(recurse=False), None) is not None
    ]
    got = names.unet_diffusers_names(paths)
    assert {k: got[k] for k in EXPECTED} == EXPECTED
    assert len(set(got.values())) == len(got)  # one module per diffusers name


def test_index_takes_both_namings_and_the_text_model_prefix():
    kind, found = names.index(TinyUNet())
    assert kind == "unet"
    assert found["down_blocks_0_attentions_0_proj_in"] == "input_blocks.1.1.proj_in"
    assert found["input_blocks_1_1_proj_in"] == "input_blocks.1.1.proj_in"
    kind, found = names.index(TinyTextEncoder())
    assert kind == "te"
    path = "text_model.encoder.layers.1.mlp.fc1"
    assert found["text_model_encoder_layers_1_mlp_fc1"] == path
    assert found["encoder_layers_1_mlp_fc1"] == path  # transformers 5 drops text_model.

"""sd_lora.training: trainable adapters on the tiny UNet and text encoder of conftest, their
kohya names, and their output against the layer's own arithmetic written out here."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyTextEncoder, TinyUNet, randomize
from safetensors.torch import load_file
from torch import nn

from sd_lora import LoRA, LoRAError
from sd_lora.training import inject


def _unet_input(g):
    return torch.randn(1, 8, 8, 8, generator=g)


def test_targets_and_kohya_names():
    unet, text = randomize(TinyUNet()), randomize(TinyTextEncoder())
    attention = inject(unet, 2, 1.0, "attention")
    names = attention.layer_names()
    # two attentions (q, k, v, out) in each of the four SpatialTransformers
    assert len(names) == 4 * 2 * 4
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0" in names
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_v" in names
    attention.remove()
    transformer = inject(unet, 2, 1.0, "transformer").layer_names()
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in transformer
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2" in transformer
    assert not any("resnets" in n for n in transformer)
    every = inject(TinyUNet(), 2, 1.0, "all").layer_names()
    for name in ("lora_unet_down_blocks_0_resnets_0_conv1",
                 "lora_unet_down_blocks_0_downsamplers_0_conv",
                 "lora_unet_up_blocks_0_upsamplers_0_conv",
                 "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
                 "lora_unet_mid_block_resnets_1_time_emb_proj"):  # fmt: skip
        assert name in every
    assert not any(n.endswith(("conv_in", "conv_out", "time_embedding_linear_1")) for n in every)
    te = inject(text, 2, 1.0, "transformer").layer_names()
    assert len(te) == 2 * 6
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1" in te


def test_starts_as_the_model_and_adds_the_low_rank_update():
    """Output with up zero (the start) is the model's; with random factors, each adapted layer
    gives W x + b + alpha / rank * up(down(x)), computed here with F.linear / F.conv2d."""
    unet = randomize(TinyUNet())
    block = unet.input_blocks[1][0]  # a ResBlock: 3x3 convs and a linear time projection
    g = torch.Generator().manual_seed(0)
    x = _unet_input(g)
    conv = block.in_layers[2]
    before = conv(x)
    network = inject(unet, 3, 1.5, "all", generator=g)
    assert torch.equal(conv(x), before)
    layer = network.lora_unet_down_blocks_0_resnets_0_conv1
    with torch.no_grad():
        layer.lora_up.weight.normal_(generator=g)
    down, up = layer.lora_down.weight, layer.lora_up.weight
    expected = before + 1.5 / 3 * F.conv2d(F.conv2d(x, down, padding=1), up)
    assert torch.allclose(conv(x), expected, atol=1e-5)
    # backward: gradients reach the adapter's factors only (the model is frozen by its owner)
    unet.requires_grad_(False)
    conv(x).square().sum().backward()
    assert down.grad is not None and up.grad is not None and conv.weight.grad is None

    linear = block.emb_layers[1]
    lin = network.lora_unet_down_blocks_0_resnets_0_time_emb_proj
    with torch.no_grad():
        lin.lora_up.weight.normal_(generator=g)
    e = torch.randn(2, 16, generator=g)
    expected = F.linear(e, linear.weight, linear.bias) + 0.5 * F.linear(
        F.linear(e, lin.lora_down.weight), lin.lora_up.weight
    )
    assert torch.allclose(linear(e), expected, atol=1e-5)
    network.remove()
    assert torch.equal(conv(x), before)


def test_saved_file_reads_back_and_merges_to_the_attached_output(tmp_path):
    unet, text = randomize(TinyUNet()), randomize(TinyTextEncoder())
    g = torch.Generator().manual_seed(2)
    network = inject(unet, 2, 4.0, "all", generator=g)
    inject(text, 2, 4.0, "attention", network=network, generator=g)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.3, generator=g)
    layers = dict(unet.named_modules())
    x8, x16 = torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    inputs = {"input_blocks.1.0.in_layers.2": x8, "input_blocks.1.1.proj_in": x8,
              "output_blocks.1.1.conv": x16}  # fmt: skip
    attached = [layers[p](x) for p, x in inputs.items()]
    q = text.text_model.encoder.layers[0].self_attn.q_proj
    h = torch.randn(3, 12, generator=g)
    attached_q = q(h)
    path = network.save(tmp_path / "trained.safetensors", {"ss_output_name": "trained"})
    assert not list(tmp_path.glob("*.tmp"))
    tensors = load_file(str(path))
    assert tensors.keys() == network.state_dict().keys()
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 8, 3, 3)
    network.remove()

    lora = LoRA.from_file(path)
    assert (lora.rank, lora.alpha, lora.metadata["ss_network_dim"]) == (2, 4.0, "2")
    assert lora.metadata["ss_output_name"] == "trained"
    lora.merge(unet)
    lora.merge(text)
    with torch.no_grad():
        for (p, x), a in zip(inputs.items(), attached):
            assert torch.allclose(layers[p](x), a, atol=1e-5, rtol=1e-5), p
        assert torch.allclose(q(h), attached_q, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"targets": "everything"}, "unknown LoRA targets"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"alpha": float("nan")}, "alpha must be a positive number"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(LoRAError, match=message):
        inject(TinyUNet(), **kwargs)


def test_twice_and_not_a_model():
    unet = TinyUNet()
    network = inject(unet)
    with pytest.raises(LoRAError, match="injected twice"):
        inject(unet, network=network)
    with pytest.raises(LoRAError, match="neither a UNet"):
        inject(nn.Sequential(nn.Linear(2, 2)))


def test_a_merge_after_an_unmerge_reuses_its_memory_and_gives_the_same_weights():
    from conftest import adaptable, kohya_lora

    from sd_lora import remove_all
    from sd_lora.lora import _STATES

    text = randomize(TinyTextEncoder())
    lora = LoRA.from_state_dict(kohya_lora(adaptable(text), "lora_te_"), name="x")
    layers = list(adaptable(text).values())
    originals = [m.weight.data for m in layers]
    lora.merge(text, 0.7)
    first = [m.weight.detach().clone() for m in layers]
    merged_memory = {m.weight.data_ptr() for m in layers}
    lora.unmerge(text)
    assert [m.weight.data_ptr() for m in layers] == [o.data_ptr() for o in originals]
    lora.merge(text, 0.7)
    # written into the memory the unmerge freed (a tensor of the same shape, not always its own)
    assert {m.weight.data_ptr() for m in layers} == merged_memory
    assert all(torch.equal(m.weight, f) for m, f in zip(layers, first))
    remove_all(text)
    assert all(torch.equal(m.weight, o) for m, o in zip(layers, originals))
    assert not _STATES[text].spare  # remove_all lets the memory go


def test_memory_kept_under_inference_mode_is_reused_there_only():
    from conftest import adaptable, kohya_lora

    text = randomize(TinyTextEncoder())
    lora = LoRA.from_state_dict(kohya_lora(adaptable(text), "lora_te_"), name="x")
    with torch.inference_mode():
        lora.merge(text, 0.5)
        expected = [m.weight.clone() for m in adaptable(text).values()]
        lora.unmerge(text)
    lora.merge(text, 0.5)  # outside: new tensors, not the inference ones kept
    lora.unmerge(text)
    with torch.inference_mode():
        lora.merge(text, 0.5)
        assert all(torch.equal(m.weight, e) for m, e in zip(adaptable(text).values(), expected))
        lora.unmerge(text)

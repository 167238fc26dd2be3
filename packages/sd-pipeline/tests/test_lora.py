"""LoRAs on the pipeline's models: a kohya file (UNet and text encoder layers, linear, 1x1 and
3x3 conv) applied by us and by diffusers (``load_lora_weights`` + ``fuse_lora``, through peft)
to the same random weights gives the same outputs; prompt tags and hashes as AUTOMATIC1111."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_state, tiny_components
from safetensors.torch import save_file
from torch import nn

from sd_lora import LoRA, LoRAError
from sd_pipeline.lora import (
    PromptLora,
    ResolvedLora,
    apply_loras,
    find_by_hash,
    find_lora,
    loaded_loras,
    lora_hash,
    lora_hashes,
    parse_lora_hashes,
    parse_lora_option,
    parse_prompt,
    remove_loras,
    resolve_prompt,
)

REL_TOL = 1e-5
# the diffusers UNet modules kohya trains (LoCon: the resnets' and samplers' convs too)
UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
               "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
               "downsamplers.0.conv", "upsamplers.0.conv")  # fmt: skip
TE_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _kohya_file(path, unet: nn.Module, text: nn.Module, rank: int = 4):
    """A kohya LoRA for diffusers' UNet and transformers' text encoder: the layer names are
    theirs (diffusers paths for the UNet, text_model.* for the text encoder), as kohya writes.
    The UNet's alphas differ by layer (2; 4 for convolutions), the text encoder's are all 1: with
    transformers 5, diffusers drops per-layer text encoder alphas (its alpha_pattern keys keep
    the ``text_model.`` prefix that transformers 5's module names no longer have)."""
    g = torch.Generator().manual_seed(5)
    state = {}
    parts = (("lora_unet_", unet, UNET_LAYERS), ("lora_te_text_model_", text, TE_LAYERS))
    for prefix, model, wanted in parts:
        for name, m in model.named_modules():
            if not name.endswith(wanted) or not isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            key = prefix + name.removeprefix("text_model.").replace(".", "_")
            w = m.weight
            conv = w.dim() == 4
            down = torch.randn(rank, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
            up = torch.randn(w.shape[0], rank, *((1, 1) if conv else ()), generator=g) * 0.5
            state[f"{key}.lora_down.weight"] = down
            state[f"{key}.lora_up.weight"] = up
            alpha = 4.0 if conv else 1.0 if prefix.startswith("lora_te") else 2.0
            state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path), {"ss_network_dim": str(rank), "ss_output_name": "tiny-style"})
    return state


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from test_parity import _diffusers_parts  # diffusers' side, from the same weights

    pytest.importorskip("peft")  # diffusers' LoRA loading goes through peft
    state = checkpoint_state()
    _, their_text, their_unet = _diffusers_parts(state, 4)
    _, text, unet = tiny_components()
    path = tmp_path_factory.mktemp("lora") / "tiny-style.safetensors"
    tensors = _kohya_file(path, their_unet, their_text)
    return unet.eval(), text.eval(), their_unet, their_text, path, tensors


def _inputs(unet, text):
    g = torch.Generator().manual_seed(0)
    width = text.config.width
    latents = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, width, generator=g)
    ids = torch.randint(0, text.config.vocab_size, (2, 77), generator=g)
    return latents, torch.tensor([10.0, 500.0]), context, ids


def _theirs(their_unet, their_text, latents, t, context, ids):
    with torch.no_grad():
        eps = their_unet(latents, t, encoder_hidden_states=context).sample
        hidden = their_text(ids).last_hidden_state
    return eps, hidden


def _ours(unet, text, latents, t, context, ids):
    with torch.no_grad():
        return unet(latents, t, context), text(ids)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


UNET_WEIGHT, TE_WEIGHT = 0.8, 0.5


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """diffusers' outputs with the kohya LoRA fused (UNet at 0.8, text encoder at 0.5), and the
    same LoRA as diffusers saves it (PEFT lora_A/lora_B names, alphas in the metadata)."""
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    unet, text, their_unet, their_text, path, tensors = models
    inputs = _inputs(unet, text)
    base = _theirs(their_unet, their_text, *inputs)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=their_text, tokenizer=None, unet=their_unet,
                                   scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    pipe.load_lora_weights(dict(tensors), adapter_name="style")
    folder = tmp_path_factory.mktemp("peft")
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(their_unet, adapter_name="style"),
        text_encoder_lora_layers=get_peft_model_state_dict(their_text, adapter_name="style"),
        unet_lora_adapter_metadata=their_unet.peft_config["style"].to_dict(),
        text_encoder_lora_adapter_metadata=their_text.peft_config["style"].to_dict(),
    )
    pipe.fuse_lora(components=["unet"], lora_scale=UNET_WEIGHT, adapter_names=["style"])
    pipe.fuse_lora(components=["text_encoder"], lora_scale=TE_WEIGHT, adapter_names=["style"])
    fused = _theirs(their_unet, their_text, *inputs)
    pipe.unfuse_lora(components=["unet", "text_encoder"])
    pipe.unload_lora_weights()
    for a, b in zip(_theirs(their_unet, their_text, *inputs), base):  # unfused (to rounding)
        assert _rel(a, b) < REL_TOL
    compvis = folder / "compvis-names.safetensors"
    save_file(_compvis_names(tensors, their_unet), str(compvis))
    files = {"kohya": path, "diffusers": folder / "pytorch_lora_weights.safetensors"}
    return base, fused, files | {"compvis": compvis}


def _compvis_names(tensors: dict, their_unet) -> dict:
    """The kohya tensors with the UNet layers in CompVis names, as some AUTOMATIC1111-era files
    have them (``lora_unet_input_blocks_1_1_proj_in``): the names found by running diffusers'
    own single-file converter over the checkpoint and seeing where each tensor lands."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = checkpoint_state()
    prefix = "model.diffusion_model."
    where = {v.data_ptr(): k[len(prefix) :] for k, v in state.items() if k.startswith(prefix)}
    converted = convert_ldm_unet_checkpoint(state, dict(their_unet.config))
    to_compvis = {
        "lora_unet_" + k.removesuffix(".weight").replace(".", "_"): "lora_unet_"
        + where[v.data_ptr()].removesuffix(".weight").replace(".", "_")
        for k, v in converted.items()
        if k.endswith(".weight")
    }
    out = {}
    for key, value in tensors.items():
        layer, _, param = key.partition(".")
        out[f"{to_compvis.get(layer, layer)}.{param}"] = value
    assert sum(k.startswith("lora_unet_input_blocks_") for k in out) > 30
    return out


@pytest.mark.parametrize("layout", ["kohya", "diffusers", "compvis"])
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "attached"])
def test_lora_matches_diffusers(models, reference, layout, merge):
    unet, text, *_ = models
    base_theirs, theirs, files = reference
    inputs = _inputs(unet, text)
    base_ours = _ours(unet, text, *inputs)
    for o, th in zip(base_ours, base_theirs):
        assert _rel(o, th) < REL_TOL

    lora = LoRA.from_file(files[layout])
    n_te = sum(1 for k in lora.keys() if k.startswith(("lora_te_", "text_encoder.")))
    assert n_te == 6 * text.config.layers and len(lora.keys()) - n_te > 50
    # (diffusers' file: its alphas in the metadata, lora_alpha and alpha_pattern for the convs)
    assert {layer.alpha for layer in lora.layers.values()} == {1.0, 2.0, 4.0}
    unet_weight, te_weight = UNET_WEIGHT, TE_WEIGHT
    apply_loras(unet, text, [(lora, unet_weight, te_weight)], merge=merge)
    ours = _ours(unet, text, *inputs)
    assert loaded_loras(unet, text) == [(lora, unet_weight, te_weight)]
    remove_loras(unet, text)
    assert all(torch.equal(a, b) for a, b in zip(_ours(unet, text, *inputs), base_ours))

    for label, o, th, base in zip(("UNet", "text encoder"), ours, theirs, base_theirs):
        assert _rel(th, base) > 1e-2, f"{label}: the LoRA should change the output"
        assert _rel(o, th) < REL_TOL, f"{label}: relative error {_rel(o, th):.2e}"


def test_apply_is_all_or_nothing(models):
    unet, text, *_, path, _ = models
    good = LoRA.from_file(path)
    bad = LoRA.from_state_dict({
        "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.ones(1, 4),
        "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.ones(4, 1),
    }, name="other-model")  # fmt: skip
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (unet, text)]
    with pytest.raises(LoRAError, match=r"other-model.*not in this UNet"):
        apply_loras(unet, text, [(good, 1.0, None), (bad, 1.0, None)])
    assert loaded_loras(unet, text) == []
    for m, b in zip((unet, text), before):
        assert all(torch.equal(v, b[k]) for k, v in m.state_dict().items())


def test_two_loras_and_removing_one(models):
    unet, text, *_, path, _ = models
    a, b = LoRA.from_file(path), LoRA.from_file(path)
    inputs = _inputs(unet, text)
    apply_loras(unet, text, [(a, 0.3, None)])
    only_a = _ours(unet, text, *inputs)
    apply_loras(unet, text, [(b, -0.7, 0.2)])
    assert loaded_loras(unet, text) == [(a, 0.3, 0.3), (b, -0.7, 0.2)]
    remove_loras(unet, text, [b])
    for x, y in zip(_ours(unet, text, *inputs), only_a):
        assert torch.equal(x, y)
    remove_loras(unet, text)
    assert loaded_loras(unet, text) == []


# ---------------------------------------------------------------------------------------------
# Prompts, folders and hashes


def test_parse_prompt_as_automatic1111():
    prompt = "a cat <lora:style:0.8>, <lora:ink:1:0.5> <lyco:hada> <hypernet:x:1> <lora:n:te=0.2:unet=-1>"
    cleaned, found = parse_prompt(prompt)
    assert cleaned == "a cat ,   <hypernet:x:1> "
    assert found == [
        PromptLora("style", 0.8, 0.8),  # one weight: both
        PromptLora("ink", 1.0, 0.5),  # text encoder weight first, then the UNet's
        PromptLora("hada", 1.0, 1.0),
        PromptLora("n", 0.2, -1.0),
    ]
    assert parse_prompt("no tags") == ("no tags", [])


@pytest.mark.parametrize(
    "tag, message",
    [
        ("<lora:x:abc>", "not a number"),
        ("<lora::1>", "no LoRA name"),
        ("<lora:x:1:1:8>", "not supported"),
        ("<lora:x:dyn=8>", "not supported"),
    ],
)
def test_parse_prompt_errors(tag, message):
    with pytest.raises(ValueError, match=message):
        parse_prompt(f"a {tag}")


def test_find_lora_and_hashes(models, tmp_path):
    *_, path, _ = models
    folder = tmp_path / "Lora"
    (folder / "sub").mkdir(parents=True)
    target = folder / "sub" / "style.safetensors"
    target.write_bytes(path.read_bytes())
    torch.save({"x": torch.ones(1)}, folder / "other.pt")
    assert find_lora("style", folder) == target
    assert find_lora("sub/style", folder) == target
    assert find_lora("tiny-style", folder) == target  # its ss_output_name
    with pytest.raises(FileNotFoundError, match=r"<lora:nope>.*other, style"):
        find_lora("nope", folder)

    # AUTOMATIC1111's addnet hash: sha256 of what follows the 8-byte length and the header
    data = target.read_bytes()
    header = int.from_bytes(data[:8], "little")
    expected = hashlib.sha256(data[8 + header :]).hexdigest()[:12]
    assert lora_hash(target) == expected
    assert (
        lora_hash(folder / "other.pt")
        == hashlib.sha256((folder / "other.pt").read_bytes()).hexdigest()[:12]
    )
    assert find_by_hash(expected, folder) == target
    assert find_by_hash("000000000000", folder) is None

    value = lora_hashes([("style", expected), ("a:b,c", "0123456789ab")])
    assert value == f"style: {expected}, abc: 0123456789ab"
    assert parse_lora_hashes(f'"{value}"') == {"style": expected, "abc": "0123456789ab"}
    with pytest.raises(ValueError, match="name: hash"):
        parse_lora_hashes("nohash")


def test_recorded_hash_wins(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"lora_te_a.diff": torch.ones(1)}, str(path), {"sshs_model_hash": "ABCDEF0123456789"})
    assert lora_hash(path) == "abcdef012345"


def test_resolve_prompt_by_name_then_by_recorded_hash(models, tmp_path):
    *_, path, _ = models
    folder = tmp_path / "Lora"
    folder.mkdir()
    (folder / "style.safetensors").write_bytes(path.read_bytes())
    short = lora_hash(folder / "style.safetensors")
    cleaned, found = resolve_prompt("a cat <lora:style:0.8:0.4>", folder)
    assert cleaned == "a cat "
    assert found == [ResolvedLora("style", folder / "style.safetensors", 0.8, 0.4, short)]
    # a PNG made with the file under another name: found again by its recorded hash
    _, found = resolve_prompt("<lora:renamed:1>", folder, parse_lora_hashes(f"renamed: {short}"))
    assert [r.path for r in found] == [folder / "style.safetensors"]
    with pytest.raises(FileNotFoundError, match="<lora:renamed>"):
        resolve_prompt("<lora:renamed:1>", folder, {"renamed": "000000000000"})


def test_parse_lora_option():
    assert parse_lora_option("x.safetensors") == (Path("x.safetensors"), 1.0)
    assert parse_lora_option("dir/x.safetensors:0.6") == (Path("dir/x.safetensors"), 0.6)
    assert parse_lora_option("x.pt:-1") == (Path("x.pt"), -1.0)
    assert parse_lora_option("C:\\loras\\x.safetensors") == (Path("C:\\loras\\x.safetensors"), 1.0)
    with pytest.raises(ValueError, match="finite"):
        parse_lora_option("x.safetensors:nan")

"""SD 2.x and SDXL text encoders: the OpenCLIP layout, SDXL's two encoders, the pooled output.

Parity with transformers' CLIPTextModel / CLIPTextModelWithProjection on random weights, written
in OpenCLIP's original layout by the conversion below (written here, apart from the package's)
and checked against diffusers' own single-file converter. transformers and diffusers are
test-only dependencies.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from sd_clip import (
    CheckpointError,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    encode_prompt_sdxl,
)

transformers = pytest.importorskip("transformers")

END = 49407
# Shapes of a tiny OpenCLIP tower (64-wide heads, as the real ones, so shapes give the config).
TINY_G = CLIPTextConfig(width=128, layers=3, heads=2, mlp_width=512, activation="gelu",
                        projection_dim=128)  # fmt: skip
TINY_L = CLIPTextConfig(width=64, layers=2, heads=1, mlp_width=256)  # quick_gelu, as OpenAI's


def reference(config: CLIPTextConfig, seed: int = 0, layers: int | None = None):
    """transformers' model of this shape (with projection if the config has one), random."""
    ref_config = transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width,
        intermediate_size=config.mlp_width, num_hidden_layers=layers or config.layers,
        num_attention_heads=config.heads, max_position_embeddings=config.max_positions,
        hidden_act=config.activation, layer_norm_eps=config.layer_norm_eps,
        projection_dim=config.projection_dim or config.width,
        bos_token_id=49406, eos_token_id=END, pad_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    cls = transformers.CLIPTextModel
    if config.projection_dim is not None:
        cls = transformers.CLIPTextModelWithProjection
    torch.manual_seed(seed)
    ref = cls(ref_config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return ref


def hf_state(ref) -> dict[str, torch.Tensor]:
    """The reference's weights in transformers 4's names (transformers 5 drops ``text_model.``)."""
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    if not any(k.startswith("text_model.") for k in state):
        state = {(k if k.startswith("text_projection") else "text_model." + k): v
                 for k, v in state.items()}  # fmt: skip
    return state


def openclip_layout(ref, prefix: str, with_projection: bool = True) -> dict[str, torch.Tensor]:
    """The reference's weights as OpenCLIP's TextTransformer names them, under ``prefix``."""
    hf = hf_state(ref)
    out = {
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "logit_scale": torch.tensor(4.6052),
    }
    width = out["token_embedding.weight"].shape[1]
    # SD 2.x files carry a projection though SD 2.x does not use it.
    projection = hf.get("text_projection.weight", torch.randn(width, width))
    if with_projection:
        out["text_projection"] = projection.T.contiguous()  # OpenCLIP computes x @ P
    n = len({k.split(".")[3] for k in hf if ".encoder.layers." in k})
    for i in range(n):
        h, o = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[o + f"attn.in_proj_{kind}"] = torch.cat(
                [hf[h + f"self_attn.{p}_proj.{kind}"] for p in "qkv"]
            )
            for theirs, ours in [("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                                 ("mlp.c_proj", "mlp.fc2")]:  # fmt: skip
                out[o + f"{theirs}.{kind}"] = hf[h + f"{ours}.{kind}"]
    return {prefix + k: v.contiguous() for k, v in out.items()}


def prompt_ids(batch, pad=END, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, 77), pad)
    ids[:, 0] = 49406
    for b in range(batch):
        n = int(torch.randint(1, 70, (1,), generator=g))
        ids[b, 1 : n + 1] = torch.randint(1, 49406, (n,), generator=g)
        ids[b, n + 1] = END
    return ids


def max_err(ours, theirs):
    err = (ours - theirs).abs().max().item()
    print(f"max abs {err:.2e} (scale {theirs.abs().max().item():.2e})")
    return err


def final_norm(ref):
    return getattr(ref, "text_model", ref).final_layer_norm


def run_ref(ref, ids):
    with torch.no_grad():
        return ref(input_ids=ids, output_hidden_states=True)


def test_layout_written_here_is_diffusers_openclip_layout():
    # Our test's OpenCLIP layout, through diffusers' own single-file converter, gives the
    # transformers names and tensors back: the layout above is the real one.
    convert = pytest.importorskip(
        "diffusers.loaders.single_file_utils"
    ).convert_open_clip_checkpoint
    ref = reference(TINY_G)
    prefix = "conditioner.embedders.1.model."
    converted = convert(ref, openclip_layout(ref, prefix), prefix=prefix)
    want = hf_state(ref)
    assert set(converted) == set(want)
    assert all(torch.equal(converted[k], want[k]) for k in want)


def test_sd2_single_file(tmp_path):
    # SD 2.x: the tower's penultimate layer, then ln_final (FrozenOpenCLIPEmbedder, layer
    # "penultimate"); its last layer and projection are left out, as diffusers does.
    tower = CLIPTextConfig(width=128, layers=4, heads=2, mlp_width=512, activation="gelu")
    ref = reference(tower)
    path = tmp_path / "sd2.safetensors"
    state = openclip_layout(ref, "cond_stage_model.model.")
    save_file(state | {"model.diffusion_model.x.weight": torch.zeros(1)}, str(path))
    ours = CLIPTextModel.from_checkpoint(path)
    assert ours.config == CLIPTextConfig(width=128, layers=3, heads=2, mlp_width=512,
                                         activation="gelu")  # fmt: skip
    ids = prompt_ids(3, pad=0)
    out = run_ref(ref, ids)
    want = final_norm(ref)(out.hidden_states[-2])
    with torch.no_grad():
        assert max_err(ours(ids), want) <= 1e-5
        assert max_err(ours(ids, clip_skip=2), final_norm(ref)(
            out.hidden_states[-3])) <= 1e-5  # fmt: skip
    # The whole tower, when a config asks for it.
    full = CLIPTextModel.from_checkpoint(path, config=tower)
    with torch.no_grad():
        assert max_err(full(ids), out.last_hidden_state) <= 1e-5


@pytest.fixture(scope="module")
def sdxl():
    clip_l, clip_g = reference(TINY_L, seed=1), reference(TINY_G, seed=2)
    state = {"conditioner.embedders.0.transformer." + k: v for k, v in hf_state(clip_l).items()}
    state |= openclip_layout(clip_g, "conditioner.embedders.1.model.")
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2)
    return clip_l, clip_g, state


def check_l(ours, clip_l, ids):
    assert ours.config == TINY_L
    out = run_ref(clip_l, ids)
    with torch.no_grad():
        assert max_err(ours(ids), out.last_hidden_state) <= 1e-5
        assert max_err(ours(ids, 2, final_norm=False), out.hidden_states[-2]) <= 1e-5


def check_g(ours, clip_g, ids):
    assert ours.config == TINY_G
    out = run_ref(clip_g, ids)
    with torch.no_grad():
        hidden, pooled = ours(ids, clip_skip=2, final_norm=False, pooled=True)
        assert max_err(hidden, out.hidden_states[-2]) <= 1e-5
        assert max_err(pooled, out.text_embeds) <= 1e-5
        last, pooled_last = ours(ids, pooled=True)
        assert max_err(last, out.last_hidden_state) <= 1e-5
        assert torch.equal(pooled, pooled_last)


@pytest.mark.parametrize("pickle", [False, True])
def test_sdxl_single_file_which(sdxl, tmp_path, pickle):
    clip_l, clip_g, state = sdxl
    path = tmp_path / ("sdxl.ckpt" if pickle else "sdxl.safetensors")
    torch.save(state, path) if pickle else save_file(state, str(path))
    ids = prompt_ids(2, pad=0)
    check_l(CLIPTextModel.from_checkpoint(path, which=0), clip_l, ids)
    check_l(CLIPTextModel.from_checkpoint(path), clip_l, ids)  # the first by default
    check_g(CLIPTextModel.from_checkpoint(path, which=1), clip_g, ids)


def test_sdxl_refiner_single_file(sdxl, tmp_path):
    _, clip_g, _ = sdxl
    path = tmp_path / "refiner.safetensors"
    save_file(openclip_layout(clip_g, "conditioner.embedders.0.model."), str(path))
    ids = prompt_ids(2, pad=0)
    check_g(CLIPTextModel.from_checkpoint(path), clip_g, ids)
    check_g(CLIPTextModel.from_checkpoint(path, which=1), clip_g, ids)
    with pytest.raises(CheckpointError, match="no text encoder for which=0"):
        CLIPTextModel.from_checkpoint(path, which=0)


def test_which_is_checked(sdxl, tmp_path):
    with pytest.raises(ValueError, match=r"which must be None.*got 2"):
        CLIPTextModel.from_checkpoint(sdxl[2], which=2)


def test_sdxl_diffusers_root(sdxl, tmp_path):
    clip_l, clip_g, _ = sdxl
    clip_l.save_pretrained(tmp_path / "text_encoder")
    clip_g.save_pretrained(tmp_path / "text_encoder_2")
    ids = prompt_ids(2, pad=0, seed=3)
    check_l(CLIPTextModel.from_checkpoint(tmp_path, which=0), clip_l, ids)
    check_g(CLIPTextModel.from_checkpoint(tmp_path, which=1), clip_g, ids)
    check_g(CLIPTextModel.from_checkpoint(tmp_path / "text_encoder_2"), clip_g, ids)


def test_pooled_at_the_first_end_token_whatever_the_padding(sdxl):
    _, clip_g, state = sdxl
    ours = CLIPTextModel.from_checkpoint(state, which=1)
    for pad in (END, 0):  # CLIP-L's tokenizer pads with the end token, bigG's with "!"
        ids = prompt_ids(3, pad=pad, seed=4)
        with torch.no_grad():
            assert max_err(ours(ids, pooled=True)[1], run_ref(clip_g, ids).text_embeds) <= 1e-5


def test_pooled_without_projection_is_pooler_output(sdxl):
    clip_l, _, state = sdxl
    ours = CLIPTextModel.from_checkpoint(state, which=0)
    ids = prompt_ids(2)
    with torch.no_grad():
        assert max_err(ours(ids, pooled=True)[1], run_ref(clip_l, ids).pooler_output) <= 1e-5
    with pytest.raises(ValueError, match="pooled=True needs ids"):
        ours(None, inputs_embeds=torch.zeros(1, 77, 64), pooled=True)


def test_gelu_and_quick_gelu_are_told_apart(sdxl):
    # Same shapes, other activation: the OpenCLIP layout loads with exact GELU, and a
    # quick-GELU model of its weights would give other outputs.
    state = sdxl[2]
    ours = CLIPTextModel.from_checkpoint(state, which=1)
    assert ours.config.activation == "gelu"
    wrong = CLIPTextModel.from_checkpoint(
        state, which=1, config=CLIPTextConfig(**{**vars(TINY_G), "activation": "quick_gelu"})
    )
    ids = prompt_ids(1)
    with torch.no_grad():
        assert (ours(ids) - wrong(ids)).abs().max() > 1e-3


def test_encode_prompt_sdxl_is_diffusers_conditioning(sdxl):
    # diffusers' StableDiffusionXLPipeline.encode_prompt: each encoder's hidden_states[-2],
    # concatenated; the pooled output of text_encoder_2.
    clip_l, clip_g, state = sdxl
    ours_l = CLIPTextModel.from_checkpoint(state, which=0)
    ours_g = CLIPTextModel.from_checkpoint(state, which=1)
    prompts = ["a photo of a cat", "an astronaut riding a horse on the moon"]
    context, pooled = encode_prompt_sdxl(prompts, (ours_l, ours_g))
    tok_l, tok_g = CLIPTokenizer(), CLIPTokenizer(pad_id=0)
    out_l, out_g = run_ref(clip_l, tok_l(prompts)), run_ref(clip_g, tok_g(prompts))
    want = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    assert context.shape == (2, 77, 64 + 128) and pooled.shape == (2, 128)
    assert max_err(context, want) <= 1e-5
    assert max_err(pooled, out_g.text_embeds) <= 1e-5
    # The refiner: the bigG encoder alone.
    context_g, pooled_g = encode_prompt_sdxl(prompts, [ours_g])
    assert torch.equal(context_g, context[..., 64:]) and torch.equal(pooled_g, pooled)


def test_encode_prompt_sdxl_long_prompt_pools_first_chunk(sdxl):
    _, clip_g, state = sdxl
    ours_l = CLIPTextModel.from_checkpoint(state, which=0)
    ours_g = CLIPTextModel.from_checkpoint(state, which=1)
    prompt = "a cat BREAK a dog on a sofa"
    context, pooled = encode_prompt_sdxl(prompt, (ours_l, ours_g))
    assert context.shape == (1, 154, 192)
    first = CLIPTokenizer(pad_id=0)(["a cat"])
    assert max_err(pooled, run_ref(clip_g, first).text_embeds) <= 1e-5
    with pytest.raises(ValueError, match="last encoder must have a text_projection"):
        encode_prompt_sdxl(prompt, (ours_g, ours_l))


def write_tokenizer(folder, pad_token):
    CLIPTokenizer().save(folder)
    if pad_token is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps({
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "pad_token": pad_token, "unk_token": "<|endoftext|>",
        }))  # fmt: skip


@pytest.mark.parametrize(
    "pad_token, pad_id",
    [("!", 0), ({"content": "!", "lstrip": False}, 0), ("<|endoftext|>", END), (None, END)],
)
def test_pad_token_of_a_diffusers_root(tmp_path, pad_token, pad_id):
    write_tokenizer(tmp_path / "tokenizer", pad_token)
    tok = CLIPTokenizer.from_folder(tmp_path)
    assert tok.pad_id == pad_id
    assert tok(["a cat"])[0, -1].item() == pad_id
    assert tok.chunks("a cat")[0].ids[-1] == pad_id  # encode_prompt's chunks pad the same way
    assert CLIPTokenizer.from_files(
        tmp_path / "tokenizer" / "vocab.json", tmp_path / "tokenizer" / "merges.txt"
    ).pad_id == pad_id  # fmt: skip


def test_pad_token_as_transformers_reads_it(tmp_path):
    # transformers' tokenizer of the same folder pads the same way.
    write_tokenizer(tmp_path / "tokenizer_2", "!")
    (tmp_path / "tokenizer_2" / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "pad_token": "!"})
    )
    ours = CLIPTokenizer.from_folder(tmp_path, subfolder="tokenizer_2")
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer_2")
    prompts = ["a photo of a cat", "a dog"]
    want = theirs(prompts, padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids  # fmt: skip
    assert torch.equal(ours(prompts), want)


def test_pad_token_not_in_vocabulary(tmp_path):
    write_tokenizer(tmp_path, "<pad>")
    with pytest.raises(ValueError, match="pad_token '<pad>' is not a token"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        CLIPTokenizer.from_folder(tmp_path / "nothing")


def full_size_layout(config: CLIPTextConfig, prefix: str, layers: int) -> dict:
    with torch.device("meta"):
        ref = reference(config, layers=layers)
    return openclip_layout(ref, prefix)


def test_full_size_configs_from_shapes():
    # Every name and shape of SD 2.x's ViT-H and SDXL's bigG, on the meta device.
    sd2 = full_size_layout(CLIPTextConfig.sd2(), "cond_stage_model.model.", layers=24)
    assert CLIPTextModel.from_checkpoint(sd2).config == CLIPTextConfig.sd2()
    g = full_size_layout(CLIPTextConfig.sdxl_g(), "conditioner.embedders.1.model.", layers=32)
    assert CLIPTextModel.from_checkpoint(g, which=1).config == CLIPTextConfig.sdxl_g()


@pytest.mark.slow
def test_parity_vit_h_full_size(tmp_path):
    tower = CLIPTextConfig(**{**vars(CLIPTextConfig.sd2()), "layers": 24})
    ref = reference(tower, seed=7)
    path = tmp_path / "sd2.safetensors"
    save_file(openclip_layout(ref, "cond_stage_model.model."), str(path))
    ours = CLIPTextModel.from_checkpoint(path)
    assert ours.config == CLIPTextConfig.sd2()
    ids = prompt_ids(2, pad=0)
    out = run_ref(ref, ids)
    with torch.no_grad():
        want = final_norm(ref)(out.hidden_states[-2])
        assert max_err(ours(ids), want) <= 1e-4


def test_bad_openclip_files_are_named(sdxl):
    state = {k: v for k, v in sdxl[2].items() if k.startswith("conditioner.embedders.1.model.")}
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    with pytest.raises(CheckpointError, match="in_proj_weight has 383 rows; expected q, k and v"):
        CLIPTextModel.from_checkpoint(state | {key: torch.zeros(383, 128)}, which=1)
    odd = "conditioner.embedders.1.model.transformer.resblocks.x.ln_1.weight"
    with pytest.raises(CheckpointError, match=r"layer numbers must be integers, found \['x'\]"):
        CLIPTextModel.from_checkpoint(state | {odd: torch.zeros(128)}, which=1)
    with pytest.raises(CheckpointError, match="unexpected"):
        CLIPTextModel.from_checkpoint(state, which=1, config=CLIPTextConfig.tiny())


def test_find_text_encoder_tells_the_layouts_apart(sdxl):
    from sd_clip.weights import find_text_encoder

    keys = list(sdxl[2])
    assert find_text_encoder(keys, 0) == ("conditioner.embedders.0.transformer.", "transformers")
    assert find_text_encoder(keys, 1) == ("conditioner.embedders.1.model.", "openclip")
    refiner = [k.replace("embedders.1.", "embedders.0.") for k in keys if ".1.model." in k]
    assert find_text_encoder(refiner) == ("conditioner.embedders.0.model.", "openclip")
    assert find_text_encoder(refiner, 0) is None
    sd2 = ["cond_stage_model.model.token_embedding.weight",
           "cond_stage_model.model.transformer.resblocks.0.ln_1.weight"]  # fmt: skip
    assert find_text_encoder(sd2) == ("cond_stage_model.model.", "openclip")
    assert find_text_encoder(sd2, 1) is None


@pytest.mark.slow
def test_parity_vit_bigg_full_size():
    # SDXL's second encoder at full size (695M parameters): the reference's outputs first, then
    # its weights in OpenCLIP's layout loaded from memory, so that one copy is held at a time.
    ref = reference(CLIPTextConfig.sdxl_g(), seed=8)
    ids = prompt_ids(1, pad=0)
    out = run_ref(ref, ids)
    want_hidden, want_pooled = out.hidden_states[-2], out.text_embeds
    state = openclip_layout(ref, "conditioner.embedders.1.model.")
    del ref, out
    ours = CLIPTextModel.from_checkpoint(state, which=1)
    del state
    assert ours.config == CLIPTextConfig.sdxl_g()
    with torch.no_grad():
        hidden, pooled = ours(ids, clip_skip=2, final_norm=False, pooled=True)
    assert max_err(hidden, want_hidden) <= 1e-4 * want_hidden.abs().max()
    assert max_err(pooled, want_pooled) <= 1e-4 * want_pooled.abs().max()


def test_encode_prompt_sdxl_emphasis_as_automatic1111(sdxl):
    # AUTOMATIC1111's sd_hijack_clip, per encoder: z = the chunk's penultimate states, times the
    # token weights, scaled back to the unweighted mean; then the encoders side by side.
    clip_l, clip_g, state = sdxl
    ours = [CLIPTextModel.from_checkpoint(state, which=w) for w in (0, 1)]
    prompt = "a (red:1.4) circle on a [blue] square"
    context, _ = encode_prompt_sdxl(prompt, ours)
    parts = []
    for ref, tok in ((clip_l, CLIPTokenizer()), (clip_g, CLIPTokenizer(pad_id=0))):
        (chunk,) = tok.chunks(prompt)
        z = run_ref(ref, torch.tensor([chunk.ids])).hidden_states[-2]
        weighted = z * torch.tensor(chunk.weights)[None, :, None]
        parts.append(weighted * (z.mean() / weighted.mean()))
    assert max_err(context, torch.cat(parts, dim=-1)) <= 1e-5
    assert max(chunk.weights) > 1.3  # the emphasis is there


def test_to_openclip_is_the_layout_sdxl_files_use(sdxl):
    """Our model written back in OpenCLIP's names equals the layout written here (the one
    diffusers' converter reads), tensor for tensor, and loads back to the same weights."""
    from sd_clip.weights import from_openclip, to_openclip

    _, clip_g, _ = sdxl
    ours = CLIPTextModel(TINY_G)
    ours.load_state_dict(hf_state(clip_g))
    written = to_openclip(ours.state_dict())
    want = {k: v for k, v in openclip_layout(clip_g, "").items() if k != "logit_scale"}
    assert set(written) == set(want)
    assert all(torch.equal(written[k], want[k]) for k in want)
    back = from_openclip(written)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    with pytest.raises(ValueError, match=r"unknown\.weight has no place"):
        to_openclip({"unknown.weight": torch.zeros(1)})

"""SDXL base and refiner: parity with diffusers' StableDiffusionXLPipeline (and its
denoising_end / denoising_start two-stage recipe with StableDiffusionXLImg2ImgPipeline) on the
same random weights, and what loading infers from an SDXL file.

The diffusers side is built from our SGM single file with diffusers' own converters
(convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_open_clip_checkpoint) and
transformers' CLIP models, so nothing of ours converts the weights it is compared against. Both
sides get the same token ids (our tokenizer; sd-clip's tests check it against transformers')
and the same starting latents; Euler runs on 10 steps, whose timesteps are whole numbers.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from sdxl_checkpoints import CLIP_G, CLIP_L, UNETS, VAE_PREFIX, sdxl_components, sgm_state

from sd_clip import CLIPTokenizer
from sd_pipeline import CheckpointError, StableDiffusion

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)

SIZE = 64  # 8 x 8 latents: the refiner's three downsamplings need a side of 8
GUIDANCE = 2.0  # (random weights turn chaotic under strong guidance; see test_parity)
REL_TOL = 1e-4
DIFFUSERS_UNETS = {  # written out by hand, so that they check our layout
    "sdxl": dict(
        block_out_channels=(64, 128, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 2, 2),
        use_linear_projection=True, cross_attention_dim=192, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=128 + 6 * 256,
        sample_size=SIZE // 8,
    ),
    "sdxl-refiner": dict(
        block_out_channels=(64, 128, 128, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                          "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2, attention_head_dim=(1, 2, 2, 2),
        use_linear_projection=True, cross_attention_dim=128, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=128 + 5 * 256,
        sample_size=SIZE // 8,
    ),
}  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    latent_channels=4, norm_num_groups=32, sample_size=SIZE, scaling_factor=0.13025,
)  # fmt: skip


def hf_text(config, state: dict | None, with_projection: bool):
    cls = (
        transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    )
    model = cls(transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=config.mlp_width,
        num_hidden_layers=config.layers, num_attention_heads=config.heads,
        max_position_embeddings=config.max_positions, hidden_act=config.activation,
        projection_dim=config.projection_dim or config.width,
    )).eval()  # fmt: skip
    if state is None:
        return model
    names = set(model.state_dict())
    state = {(k if k in names else k.removeprefix("text_model.")): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model


def diffusers_parts(kind: str, state: dict) -> dict:
    """diffusers' UNet and VAE and transformers' encoders, from the SGM file's tensors."""
    config = DIFFUSERS_UNETS[kind]
    unet = diffusers.UNet2DConditionModel(**config).eval()
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, config), strict=True)
    vae = diffusers.AutoencoderKL(**VAE).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, VAE), strict=True)
    prefix = (
        "conditioner.embedders.1.model." if kind == "sdxl" else "conditioner.embedders.0.model."
    )
    clip_g = hf_text(CLIP_G, None, True)
    clip_g = hf_text(CLIP_G, convert_open_clip_checkpoint(clip_g, state, prefix=prefix), True)
    parts = dict(unet=unet, vae=vae, text_encoder_2=clip_g, text_encoder=None)
    if kind == "sdxl":
        lp = "conditioner.embedders.0.transformer."
        parts["text_encoder"] = hf_text(CLIP_L, {k[len(lp) :]: v for k, v in state.items()
                                                 if k.startswith(lp)}, False)  # fmt: skip
    return parts


def embeds(parts: dict, prompt: str, negative: str):
    """diffusers' encode_prompt, given our token ids: each encoder's hidden_states[-2] side by
    side, the pooled output (text_embeds) of the second."""
    out = {}
    for name, text in (("", prompt), ("negative_", negative)):
        hidden = []
        for encoder, tok in ((parts["text_encoder"], CLIPTokenizer()),
                             (parts["text_encoder_2"], CLIPTokenizer(pad_id=0))):  # fmt: skip
            if encoder is None:
                continue
            with torch.no_grad():
                result = encoder(tok([text]), output_hidden_states=True)
            hidden.append(result.hidden_states[-2])
        out[f"{name}prompt_embeds"] = torch.cat(hidden, dim=-1)
        out[f"{name}pooled_prompt_embeds"] = result.text_embeds
    return out


def euler():
    return diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="linspace",
    )  # fmt: skip


def reference(parts: dict, scheduler=None, cls=None, **config):
    """A diffusers SDXL pipeline on the parts, given prompt embeddings (no tokenizers)."""
    cls = cls or diffusers.StableDiffusionXLPipeline
    ref = cls(**parts, tokenizer=None, tokenizer_2=None, scheduler=scheduler or euler(), **config)
    ref.set_progress_bar_config(disable=True)
    return ref


def run_reference(ref, parts: dict, prompt: str, negative: str, steps: int, **kwargs):
    with torch.no_grad():
        return ref(**embeds(parts, prompt, negative), num_inference_steps=steps,
                   guidance_scale=GUIDANCE, output_type="latent", **kwargs).images  # fmt: skip


OURS = dict(guidance_scale=GUIDANCE, progress=False, output_type="latent")
AT_SIZE = dict(width=SIZE, height=SIZE)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    out = {}
    for seed, kind in enumerate(("sdxl", "sdxl-refiner")):
        state = sgm_state(sdxl_components(kind, seed=seed))
        save_file(state, str(folder / f"{kind}.safetensors"))
        out[kind] = (folder / f"{kind}.safetensors", state)
    return out


@pytest.fixture(scope="module")
def pipes(files):
    return {kind: StableDiffusion.from_checkpoint(path, device="cpu")
            for kind, (path, _) in files.items()}  # fmt: skip


def noise():
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(7))


def relative(ours: torch.Tensor, theirs: torch.Tensor, label: str) -> float:
    assert theirs.std() > 0.05, "the reference is flat: the test would prove nothing"
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    print(f"{label}: relative {rel:.2e}")
    return rel


def test_sdxl_kinds_are_inferred_from_the_weights(pipes):
    base, refiner = pipes["sdxl"], pipes["sdxl-refiner"]
    assert base.unet.config == UNETS["sdxl"] and refiner.unet.config == UNETS["sdxl-refiner"]
    assert base.text_encoder.config == CLIP_L and base.text_encoder_2.config == CLIP_G
    assert refiner.text_encoder.config == CLIP_G and refiner.text_encoder_2 is None
    for pipe in (base, refiner):
        assert pipe.native_size == 1024 and pipe.vae.config.scaling_factor == 0.13025
        assert pipe.conditioner.pooled
    assert base.tokenizer.pad_id == CLIPTokenizer().end_id
    assert base.conditioner.tokenizers[1].pad_id == 0 and refiner.tokenizer.pad_id == 0
    assert refiner.conditioner.refiner and not base.conditioner.refiner


def test_sd1_and_sd2_are_unaffected(tiny_checkpoint):
    pipe = StableDiffusion.from_checkpoint(tiny_checkpoint, device="cpu")
    assert pipe.unet.config.family == "sd1" and pipe.text_encoder_2 is None
    assert not pipe.conditioner.pooled and pipe.native_size == 512
    assert pipe.vae.config.scaling_factor == 0.18215
    assert pipe.conditioner.added(None) is None


def test_mismatched_sdxl_files_are_refused_naming_what_they_hold(files, tmp_path):
    _, state = files["sdxl"]
    no_g = {k: v for k, v in state.items() if not k.startswith("conditioner.embedders.1.")}
    save_file(no_g, str(tmp_path / "no-g.safetensors"))
    with pytest.raises(CheckpointError, match=r"SDXL base UNet .* needs CLIP-L .* bigG"):
        StableDiffusion.from_checkpoint(tmp_path / "no-g.safetensors", device="cpu")
    # the refiner's encoder beside the base UNet: the widths do not add up
    _, refiner_state = files["sdxl-refiner"]
    mixed = {k: v for k, v in state.items() if k.startswith(("model.", VAE_PREFIX))}
    mixed |= {k: v for k, v in refiner_state.items() if k.startswith("conditioner.")}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(CheckpointError, match="needs CLIP-L"):
        StableDiffusion.from_checkpoint(tmp_path / "mixed.safetensors", device="cpu")


SIZES = dict(original_size=(512, 768), crop_top_left=(16, 32), target_size=(1024, 896))


@pytest.mark.parametrize("sampler,steps,sizes", [("euler", 10, False), ("ddim", 5, False),
                                                 ("euler", 4, True)])  # fmt: skip
def test_txt2img_matches_diffusers_sdxl_pipeline(files, pipes, sampler, steps, sizes):
    from test_parity import _scheduler

    parts = diffusers_parts("sdxl", files["sdxl"][1])
    ref = reference(parts, _scheduler(sampler))
    start = noise()
    theirs_sizes = {}
    if sizes:  # the added conditioning's sizes, in diffusers' names
        theirs_sizes = dict(original_size=SIZES["original_size"], target_size=SIZES["target_size"],
                            crops_coords_top_left=SIZES["crop_top_left"])  # fmt: skip
    theirs = run_reference(ref, parts, "a red circle", "blurry", steps, latents=start.clone(),
                           **AT_SIZE, **theirs_sizes)  # fmt: skip
    ours = pipes["sdxl"].txt2img("a red circle", "blurry", steps=steps, sampler=sampler,
                                 latents=start, **AT_SIZE, **OURS,
                                 **(SIZES if sizes else {}))  # fmt: skip
    assert relative(ours, theirs, f"SDXL txt2img {sampler} latents") < REL_TOL
    with torch.no_grad():
        theirs_image = ref.vae.decode(theirs / 0.13025).sample
    ours_image = pipes["sdxl"].decode(ours)
    assert relative(ours_image, theirs_image, f"SDXL txt2img {sampler} image") < REL_TOL


def test_base_and_refiner_match_diffusers_two_stages(files, pipes):
    base_parts = diffusers_parts("sdxl", files["sdxl"][1])
    refiner_parts = diffusers_parts("sdxl-refiner", files["sdxl-refiner"][1])
    base = reference(base_parts)
    refiner = reference(refiner_parts, cls=diffusers.StableDiffusionXLImg2ImgPipeline,
                        requires_aesthetics_score=True)  # fmt: skip
    start = noise()
    middle = run_reference(base, base_parts, "a cat", "blurry", 10, denoising_end=0.8,
                           latents=start.clone(), **AT_SIZE)  # fmt: skip
    theirs = run_reference(refiner, refiner_parts, "a cat", "blurry", 10, image=middle,
                           denoising_start=0.8)  # fmt: skip
    args = dict(steps=10, sampler="euler", latents=start, **AT_SIZE, **OURS)
    ours = pipes["sdxl"].txt2img("a cat", "blurry", refiner=pipes["sdxl-refiner"],
                                 refiner_switch=0.8, **args)  # fmt: skip
    assert relative(ours, theirs, "SDXL base + refiner latents") < REL_TOL
    # and the refiner did something: the base alone ends elsewhere
    alone = pipes["sdxl"].txt2img("a cat", "blurry", **args)
    assert relative(alone, theirs, "SDXL base alone") > 1e-2


def test_cli_refiner_writes_automatic1111_fields_and_from_png_reads_them(files, tmp_path, capsys):
    from sd_pipeline.cli import main
    from sd_pipeline.metadata import read_parameters

    base, refiner = files["sdxl"][0], files["sdxl-refiner"][0]
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    common = ["--checkpoint", str(base), "--steps", "4", "--no-progress", "--sampler", "euler"]
    code = main(["a cat", "-o", str(first), "--seed", "3", "--width", "64", "--height", "64",
                 "--refiner", str(refiner), "--refiner-switch", "0.5", *common])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    extra = read_parameters(first).extra
    pipe = StableDiffusion.from_checkpoint(refiner, device="cpu")
    assert extra["Refiner"] == f"sdxl-refiner [{pipe.model_hash}]"
    assert extra["Refiner switch at"] == "0.5"
    # the refiner named in the PNG is found beside the checkpoint
    assert main(["--from-png", str(first), "-o", str(again), *common]) == 0
    assert read_parameters(again).extra["Refiner"] == extra["Refiner"]
    from PIL import Image

    assert Image.open(first).tobytes() == Image.open(again).tobytes()
    # without a refiner run, the same seed gives another picture
    plain = tmp_path / "plain.png"
    assert main(["a cat", "-o", str(plain), "--seed", "3", "--width", "64", "--height", "64",
                 *common]) == 0  # fmt: skip
    assert Image.open(first).tobytes() != Image.open(plain).tobytes()
    assert "Refiner" not in read_parameters(plain).extra


def test_a_missing_refiner_is_named(files, tmp_path, capsys):
    from sd_pipeline.cli import main

    first = tmp_path / "first.png"
    base, refiner = files["sdxl"][0], files["sdxl-refiner"][0]
    common = ["--steps", "2", "--no-progress", "--width", "64", "--height", "64"]
    assert main(["x", "-o", str(first), "--checkpoint", str(base), "--refiner", str(refiner),
                 *common]) == 0  # fmt: skip
    capsys.readouterr()
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "base.safetensors").symlink_to(base)
    code = main(["--from-png", str(first), "-o", str(tmp_path / "b.png"), "--checkpoint",
                 str(other / "base.safetensors"), *common])  # fmt: skip
    assert code == 2
    assert "made with the refiner 'sdxl-refiner'" in capsys.readouterr().err


def kohya_sdxl_lora(path, parts: dict, rank: int = 2, seed: int = 0):
    """A kohya-style SDXL LoRA (lora_unet_ on diffusers' UNet names, lora_te1_ CLIP-L, lora_te2_
    bigG) on the attention projections, named from the diffusers / transformers modules (with
    the out projections: diffusers tells the format from them)."""
    g = torch.Generator().manual_seed(seed)
    wanted = ("to_q", "to_v", "to_out.0", "q_proj", "out_proj")
    state = {}
    for prefix, model in (("lora_unet_", parts["unet"]), ("lora_te1_", parts["text_encoder"]),
                          ("lora_te2_", parts["text_encoder_2"])):  # fmt: skip
        for name, m in model.named_modules():
            if not isinstance(m, torch.nn.Linear) or not name.endswith(wanted):
                continue
            if prefix != "lora_unet_" and not name.startswith("text_model."):
                name = "text_model." + name  # (transformers 5 drops it; the files keep it)
            key = prefix + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.3
            state[f"{key}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.3
            state[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(state, str(path))
    return path


def test_sdxl_lora_equals_diffusers_load_lora_weights_and_fuse(files, pipes, tmp_path):
    pytest.importorskip("peft")
    parts = diffusers_parts("sdxl", files["sdxl"][1])
    lora = kohya_sdxl_lora(tmp_path / "xl-style.safetensors", parts)
    ref = reference(parts)
    ref.load_lora_weights(str(lora))
    ref.fuse_lora(lora_scale=1.0)
    start = noise()
    theirs = run_reference(ref, parts, "a red circle", "blurry", 4, latents=start.clone(),
                           **AT_SIZE)  # fmt: skip
    pipe = pipes["sdxl"]
    args = dict(steps=4, sampler="euler", latents=start, **AT_SIZE, **OURS)
    before = pipe.txt2img("a red circle", "blurry", **args)
    pipe.load_lora(lora)
    try:
        ours = pipe.txt2img("a red circle", "blurry", **args)
    finally:
        pipe.unload_loras()
    assert relative(before, theirs, "without the LoRA") > 1e-2  # the LoRA changes the result
    assert relative(ours, theirs, "SDXL LoRA latents") < REL_TOL


def test_sdxl_lora_is_still_refused_on_sd1(files, pipes, tiny_checkpoint, tmp_path):
    from sd_lora import LoRAError

    parts = diffusers_parts("sdxl", files["sdxl"][1])
    lora = kohya_sdxl_lora(tmp_path / "xl.safetensors", parts)
    sd1 = StableDiffusion.from_checkpoint(tiny_checkpoint, device="cpu")
    with pytest.raises(LoRAError, match=r"an SDXL LoRA .* this model is SD 1\.x/2\.x"):
        sd1.load_lora(lora)


def hf_tokenizer(folder, pad_token: str | None):
    """transformers' CLIP tokenizer on our vocabulary (bigG's pads with "!")."""
    CLIPTokenizer().save(folder)
    extra = {} if pad_token is None else {"pad_token": pad_token}
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                      **extra)  # fmt: skip


@pytest.fixture(scope="module")
def diffusers_root(files, tmp_path_factory):
    """SDXL base as a diffusers model root (what save_pretrained writes), from the SGM file."""
    folder = tmp_path_factory.mktemp("sdxl-root")
    parts = diffusers_parts("sdxl", files["sdxl"][1])
    tokenizers = tmp_path_factory.mktemp("tokenizers")
    ref = diffusers.StableDiffusionXLPipeline(
        **parts, scheduler=euler(), tokenizer=hf_tokenizer(tokenizers / "l", None),
        tokenizer_2=hf_tokenizer(tokenizers / "g", "!"),
    )  # fmt: skip
    ref.save_pretrained(folder / "model")
    return folder / "model"


def test_diffusers_root_loads_as_the_single_file(diffusers_root, pipes):
    ours = StableDiffusion.from_checkpoint(diffusers_root, device="cpu")
    assert ours.unet.config == UNETS["sdxl"] and ours.text_encoder_2.config == CLIP_G
    assert ours.native_size == SIZE and ours.vae.config.scaling_factor == 0.13025
    assert ours.conditioner.tokenizers[1].pad_id == 0  # from tokenizer_2/'s special tokens
    assert ours.tokenizer.pad_id == CLIPTokenizer().end_id
    args = dict(steps=3, sampler="euler", latents=noise(), progress=False, output_type="latent")
    a = ours.txt2img("a (cat:1.2)", "dog", **args)
    b = pipes["sdxl"].txt2img("a (cat:1.2)", "dog", width=SIZE, height=SIZE, **args)
    assert relative(a, b, "diffusers root vs single file") < 1e-5


def test_single_file_layout_round_trips_through_diffusers_from_single_file(
    files, diffusers_root, pipes
):
    """diffusers' own single-file loader reads the SGM file (its config from the local root,
    nothing downloaded) into the pipeline that our loader's result matches."""
    path, state = files["sdxl"]
    theirs = diffusers.StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(diffusers_root), local_files_only=True
    )
    theirs.set_progress_bar_config(disable=True)
    expected = diffusers_parts("sdxl", state)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, read = expected[name].state_dict(), getattr(theirs, name).state_dict()
        assert set(mine) <= set(read), name
        assert all(torch.equal(mine[k], read[k]) for k in mine), name
    start = noise()
    out = run_reference(theirs, expected, "a cat", "", 4, latents=start.clone(), **AT_SIZE)
    ours = pipes["sdxl"].txt2img("a cat", "", steps=4, sampler="euler", latents=start, **AT_SIZE,
                                 **OURS)  # fmt: skip
    assert relative(ours, out, "from_single_file vs ours") < REL_TOL


def test_refiner_diffusers_root(files, pipes, tmp_path):
    parts = diffusers_parts("sdxl-refiner", files["sdxl-refiner"][1])
    ref = diffusers.StableDiffusionXLImg2ImgPipeline(
        **parts, scheduler=euler(), tokenizer=None,
        tokenizer_2=hf_tokenizer(tmp_path / "g", "!"), requires_aesthetics_score=True,
    )  # fmt: skip
    ref.save_pretrained(tmp_path / "refiner")
    ours = StableDiffusion.from_checkpoint(tmp_path / "refiner", device="cpu")
    assert ours.unet.config == UNETS["sdxl-refiner"] and ours.text_encoder.config == CLIP_G
    assert ours.text_encoder_2 is None and ours.tokenizer.pad_id == 0 and ours.conditioner.refiner
    args = dict(steps=3, sampler="euler", latents=noise(), progress=False, output_type="latent",
                width=SIZE, height=SIZE)  # fmt: skip
    a, b = ours.txt2img("a cat", **args), pipes["sdxl-refiner"].txt2img("a cat", **args)
    assert relative(a, b, "refiner root vs single file") < 1e-5


def test_img2img_matches_diffusers_sdxl_img2img(files, pipes):
    from test_parity import _init_image

    parts = diffusers_parts("sdxl", files["sdxl"][1])
    ref = reference(parts, cls=diffusers.StableDiffusionXLImg2ImgPipeline,
                    requires_aesthetics_score=False)  # fmt: skip
    image = _init_image().resize((SIZE, SIZE))
    theirs = run_reference(ref, parts, "a cat", "blurry", 10, image=image, strength=0.5,
                           generator=torch.Generator().manual_seed(3))  # fmt: skip
    g = torch.Generator().manual_seed(3)  # diffusers drew the posterior sample, then the noise
    shape = (1, 4, SIZE // 8, SIZE // 8)
    torch.randn(shape, generator=g)
    ours = pipes["sdxl"].img2img("a cat", image, "blurry", strength=0.5, steps=10,
                                 sampler="euler", latents=torch.randn(shape, generator=g),
                                 **OURS)  # fmt: skip
    assert relative(ours, theirs, "SDXL img2img latents") < REL_TOL


def test_prompt_language_on_sdxl_long_prompts_schedules_and_pooled(files, pipes):
    """A1111's syntax reaches both encoders; a prompt of two chunks (BREAK) against a one-chunk
    negative runs in groups of one length, each with its rows' added conditioning; the pooled
    output is the first chunk's (transformers' bigG on those ids)."""
    from sd_pipeline import GenerationRequest

    pipe = pipes["sdxl"]
    request = GenerationRequest(prompts=("a (cat:1.3) BREAK on a [sofa:bed:2]",), steps=4,
                                width=SIZE, height=SIZE).resolve(pipe.defaults, 1024)  # fmt: skip
    conditioning = pipe.encode_prompt(request)
    ((_, schedule),) = conditioning.cond[0]
    assert [last for last, _, _ in schedule] == [2, 4]  # "sofa", then "bed" (A1111 numbering)
    assert schedule[0][1].shape == (1, 154, 192) and conditioning.uncond[0][0][1].shape[1] == 77
    parts = diffusers_parts("sdxl", files["sdxl"][1])
    with torch.no_grad():
        want = parts["text_encoder_2"](CLIPTokenizer(pad_id=0)(["a cat"])).text_embeds
    assert relative(schedule[1][2], want, "pooled of the first chunk") < 1e-5
    args = dict(steps=4, sampler="euler", seed=1, width=SIZE, height=SIZE, progress=False,
                output_type="latent")  # fmt: skip
    long = pipe.txt2img(request.prompts[0], **args)
    assert torch.isfinite(long).all()
    assert not torch.allclose(long, pipe.txt2img("a (cat:1.3)", **args))


def test_inpaint_on_sdxl_keeps_the_unmasked_latents(pipes):
    from test_parity import _init_image, _mask

    from sd_pipeline import pil_to_tensor
    from sd_pipeline.images import mask_to_tensor

    image, mask = _init_image().resize((SIZE, SIZE)), _mask().resize((SIZE, SIZE))
    pipe = pipes["sdxl"]
    out = pipe.inpaint("a dog", image, mask, steps=3, sampler="euler", seed=2, progress=False,
                       output_type="latent")  # fmt: skip
    init = pipe._encode_image(pil_to_tensor(image), 1)
    kept = torch.nn.functional.interpolate(mask_to_tensor(mask), size=out.shape[-2:]) == 0
    kept = kept.expand_as(out)
    torch.testing.assert_close(out[kept], init[kept], atol=1e-4, rtol=1e-4)
    assert (out - init).abs().max() > 0.1  # the masked part was repainted


def test_hires_fix_with_the_refiner(pipes):
    from sd_pipeline import GenerationParameters
    from sd_pipeline.request import HiresFix

    pipe, refiner = pipes["sdxl"], pipes["sdxl-refiner"]
    picture = pipe.txt2img(
        "a cat", steps=3, sampler="euler", seed=4, width=SIZE, height=SIZE, progress=False,
        hires=HiresFix(scale=1.5, steps=2, denoise=0.5), refiner=refiner, refiner_switch=0.5,
    )[0]  # fmt: skip
    assert picture.size == (96, 96)
    extra = GenerationParameters.from_text(picture.info["parameters"]).extra
    assert extra["Refiner"].startswith("sdxl-refiner [") and extra["Hires upscale"] == "1.5"
    with pytest.raises(ValueError, match="refiner_switch"):
        pipe.txt2img("x", steps=2, refiner=refiner, refiner_switch=1.5, progress=False)
    with pytest.raises(ValueError, match="original_size"):
        pipe.txt2img("x", steps=2, original_size=(0, 8), progress=False)


def test_sizes_and_scores_are_written_and_read_back(files, pipes, tmp_path, capsys):
    from sd_pipeline import save_image
    from sd_pipeline.cli import main
    from sd_pipeline.metadata import read_parameters

    args = dict(steps=3, sampler="euler", seed=6, **AT_SIZE, progress=False)
    picture = pipes["sdxl"].txt2img("a cat", **args, **SIZES, refiner=pipes["sdxl-refiner"],
                                    aesthetic_score=7.5)[0]  # fmt: skip
    save_image(picture, tmp_path / "a.png")
    extra = read_parameters(tmp_path / "a.png").extra
    assert extra["SDXL original size"] == "768x512" and extra["SDXL crop"] == "32x16"
    assert extra["SDXL target size"] == "896x1024" and extra["Aesthetic score"] == "7.5"
    assert "Negative aesthetic score" not in extra  # left at its default
    plain = pipes["sdxl"].txt2img("a cat", **args, refiner=pipes["sdxl-refiner"])[0]
    assert plain.tobytes() != picture.tobytes()  # the sizes and the score reach the models
    code = main(["--from-png", str(tmp_path / "a.png"), "-o", str(tmp_path / "b.png"),
                 "--checkpoint", str(files["sdxl"][0]), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    from PIL import Image

    assert Image.open(tmp_path / "b.png").tobytes() == picture.tobytes()


def test_an_sdxl_pickle_is_read_once(files, pipes, tmp_path, monkeypatch):
    path = tmp_path / "sdxl.ckpt"
    torch.save({"state_dict": files["sdxl"][1]}, path)
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    pipe = StableDiffusion.from_checkpoint(path, device="cpu")
    assert len(calls) == 1  # the UNet, both encoders and the VAE from one read
    args = dict(steps=2, sampler="euler", latents=noise(), **AT_SIZE, **OURS)
    assert torch.equal(pipe.txt2img("x", **args), pipes["sdxl"].txt2img("x", **args))


def test_a_tokenizer_2_folder_without_special_tokens_pads_as_bigg(tmp_path):
    import json

    from sd_pipeline.sdxl_loading import sdxl_tokenizer_options

    CLIPTokenizer().save(tmp_path / "tokenizer_2")
    (tmp_path / "text_encoder").mkdir()
    assert sdxl_tokenizer_options(tmp_path)["tokenizer_2"].pad_id == 0  # no map: bigG's "!"
    special = {"pad_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_2" / "special_tokens_map.json").write_text(json.dumps(special))
    tok = sdxl_tokenizer_options(tmp_path)["tokenizer_2"]
    assert tok.pad_id == tok.end_id  # what the folder says wins
    (tmp_path / "text_encoder").rmdir()  # a refiner's root: its one tokenizer is the first
    assert set(sdxl_tokenizer_options(tmp_path)) == {"tokenizer"}


@pytest.mark.parametrize("kind", ["sdxl", "sdxl-refiner"])
def test_save_writes_the_sgm_layout_and_loads_back(files, pipes, kind, tmp_path):
    """save() writes what the SGM file written by this test's own layout holds, tensor for
    tensor (less OpenCLIP's unused logit_scale), and the file generates the same picture."""
    from safetensors.torch import load_file

    path = pipes[kind].save(tmp_path / f"{kind}.safetensors")
    written, (_, state) = load_file(str(path)), files[kind]
    assert set(written) == {k for k in state if not k.endswith("logit_scale")}
    assert all(torch.equal(written[k], state[k]) for k in written)
    again = StableDiffusion.from_checkpoint(path, device="cpu")
    assert again.unet.config.family == kind and again.native_size == 1024
    args = dict(steps=2, sampler="euler", seed=3, width=SIZE, height=SIZE, progress=False,
                output_type="latent")  # fmt: skip
    assert torch.equal(again.txt2img("a cat", **args), pipes[kind].txt2img("a cat", **args))

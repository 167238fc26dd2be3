"""The SDXL UNet (base and refiner): parity with diffusers' UNet2DConditionModel configured as
SDXL on the same random weights, through the SGM single-file layout and diffusers' folders; the
added conditioning built by ``sdxl_conditioning`` against diffusers' ``added_cond_kwargs``."""

import dataclasses

import pytest
import torch
from conftest import random_unet
from safetensors.torch import save_file

from sd_unet import CheckpointError, UNet, UNetConfig, sdxl_conditioning
from sd_unet.weights import SD_PREFIX, diffusers_config, diffusers_key_map, infer_config

diffusers = pytest.importorskip("diffusers")

# Written out by hand (not from our diffusers_config) so that they check the conversion.
TINY_SDXL = dict(
    block_out_channels=(64, 128, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),  # level 0's is unused, as in SDXL's [1, 2, 10]
    attention_head_dim=(1, 2, 2),  # diffusers' name for the head *count*: 64-wide heads
    use_linear_projection=True,
    cross_attention_dim=48,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=32 + 6 * 256,
)
TINY_REFINER = dict(
    block_out_channels=(64, 128, 128, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=2,
    attention_head_dim=(1, 2, 2, 2),
    use_linear_projection=True,
    cross_attention_dim=32,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=32 + 5 * 256,
)
CASES = {"base": TINY_SDXL, "refiner": TINY_REFINER}
OURS = {"base": UNetConfig.tiny_sdxl(), "refiner": UNetConfig.tiny_sdxl_refiner()}
POOLED = 32


def random_diffusers(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def sizes(case: str, batch: int):
    """Per-row numbers as a pipeline would pass them (each row different, to catch mix-ups)."""
    original = torch.tensor([[1024.0, 768.0], [512.0, 896.0], [640.0, 640.0]][:batch])
    crop = torch.tensor([[0.0, 0.0], [64.0, 32.0], [8.0, 120.0]][:batch])
    last = torch.tensor([[1024.0, 1024.0], [768.0, 512.0], [896.0, 640.0]][:batch])
    if case == "refiner":
        last = torch.tensor([6.0, 2.5, 4.0][:batch])
    return original, crop, last


def case_inputs(case: str, batch: int = 2, size: int = 16, tokens: int = 7):
    c = OURS[case]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c.in_channels, size, size, generator=g)
    t = torch.tensor([3.5, 900.0, 500.0][:batch])
    context = torch.randn(batch, tokens, c.context_dim, generator=g)
    pooled = torch.randn(batch, POOLED, generator=g)
    return x, t, context, pooled, sizes(case, batch)


def our_y(case, pooled, numbers):
    original, crop, last = numbers
    if case == "refiner":
        return sdxl_conditioning(pooled, original, crop, aesthetic_score=last)
    return sdxl_conditioning(pooled, original, crop, last)


def diffusers_time_ids(case, numbers):
    """diffusers' ``_get_add_time_ids`` order: original size, crop, target size (or score)."""
    original, crop, last = numbers
    return torch.cat([original, crop, last.reshape(original.shape[0], -1)], dim=1)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def compare(case: str, ours: UNet, theirs) -> float:
    x, t, c, pooled, numbers = case_inputs(case)
    added = {"text_embeds": pooled, "time_ids": diffusers_time_ids(case, numbers)}
    with torch.no_grad():
        ref = theirs(x, t, c, added_cond_kwargs=added).sample
        out = ours(x, t, c, y=our_y(case, pooled, numbers))
    return relative_error(out, ref)


def single_file(theirs, config: UNetConfig) -> dict:
    """diffusers weights in the SGM single-file layout, by our key map reversed."""
    to_ours = {v: k for k, v in diffusers_key_map(config).items()}
    return {SD_PREFIX + to_ours[k]: v.contiguous() for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("case", CASES)
def test_sgm_single_file_matches_diffusers_and_its_config_is_inferred(case, tmp_path):
    theirs = random_diffusers(CASES[case], seed=3)
    save_file(single_file(theirs, OURS[case]), tmp_path / "sdxl.safetensors")
    ours = UNet.from_checkpoint(tmp_path / "sdxl.safetensors")  # no config: from the shapes
    assert ours.config == OURS[case]
    assert compare(case, ours, theirs) < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_our_single_file_layout_is_the_one_diffusers_converts(case):
    """diffusers' own converter (convert_ldm_unet_checkpoint) reads our SGM names back into the
    diffusers model's names and tensors: our key map agrees with it key by key."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    theirs = random_diffusers(CASES[case], seed=4)
    converted = convert_ldm_unet_checkpoint(single_file(theirs, OURS[case]), theirs.config)
    expected = theirs.state_dict()
    assert sorted(converted) == sorted(expected)
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


@pytest.mark.parametrize("case", CASES)
def test_diffusers_folder_loads_and_matches(case, tmp_path):
    theirs = random_diffusers(CASES[case])
    theirs.save_pretrained(tmp_path / "model" / "unet")
    ours = UNet.from_checkpoint(tmp_path / "model")
    assert ours.config == OURS[case]
    assert compare(case, ours, theirs) < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_our_weights_load_in_diffusers(case, tmp_path):
    ours = random_unet(OURS[case])
    ours.save_diffusers(tmp_path / "unet")
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert compare(case, ours, theirs) < 1e-4
    assert UNet.from_checkpoint(tmp_path / "unet").config == OURS[case]


@pytest.mark.parametrize("case", CASES)
def test_bare_file_round_trip_keeps_the_per_level_depths(case, tmp_path):
    ours = random_unet(OURS[case])
    ours.save(tmp_path / "unet.safetensors")
    back = UNet.from_checkpoint(tmp_path / "unet.safetensors")
    assert back.config == OURS[case]
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                  back.state_dict().values()))  # fmt: skip


def test_conditioning_is_diffusers_time_ids_embedding():
    """Each number through diffusers' own Timesteps(256, flip_sin_to_cos=True, 0), flattened
    after the pooled embedding, as UNet2DConditionModel does with added_cond_kwargs."""
    from diffusers.models.embeddings import Timesteps

    for case in CASES:
        _, _, _, pooled, numbers = case_inputs(case, batch=3)
        time_ids = diffusers_time_ids(case, numbers)
        embedded = Timesteps(256, True, 0)(time_ids.flatten()).reshape(3, -1)
        ref = torch.cat([pooled, embedded], dim=-1)
        torch.testing.assert_close(our_y(case, pooled, numbers), ref)


def test_conditioning_takes_numbers_for_every_row():
    pooled = torch.randn(2, POOLED)
    y = sdxl_conditioning(pooled, (1024, 768), (0, 0), (1024, 1024))
    rows = torch.tensor([[1024.0, 768.0]] * 2), torch.zeros(2, 2), torch.full((2, 2), 1024.0)
    assert torch.equal(y, sdxl_conditioning(pooled, *rows))
    assert sdxl_conditioning(pooled, (8, 8), aesthetic_score=6.0).shape == (2, POOLED + 5 * 256)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "neither"),
        (dict(target_size=(1, 1), aesthetic_score=6.0), "both"),
        (dict(target_size=(1, 1, 1)), "target_size must be 2"),
        (dict(target_size=torch.zeros(3, 2)), r"\(B=2, 2\)"),
    ],
)
def test_bad_conditioning_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sdxl_conditioning(torch.zeros(2, POOLED), (1024, 1024), (0, 0), **kwargs)


@pytest.mark.parametrize("channels_last", [False, True])
def test_shared_latents_with_a_y_per_context_row(channels_last):
    """Classifier-free guidance: one latent row, two context rows and two y rows (the negative
    and the positive pooled embeddings) equal the latents repeated."""
    unet = random_unet(OURS["base"])
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    x, t, c, pooled, numbers = case_inputs("base", batch=2)
    y = our_y("base", pooled, numbers)
    with torch.no_grad():
        shared = unet(x[:1], t[:1], c, y=y)
        repeated = unet(torch.cat([x[:1]] * 2), t[:1], c, y=y)
        one_y = unet(x[:1], t[:1], c, y=y[:1])  # one y for both rows: still every row
        one_y_repeated = unet(torch.cat([x[:1]] * 2), t[:1], c, y=torch.cat([y[:1]] * 2))
    torch.testing.assert_close(shared, repeated, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_y, one_y_repeated, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config, y, message",
    [
        (UNetConfig.tiny_sdxl(), None, "needs y"),
        (UNetConfig.tiny_sdxl(), torch.zeros(2, 10), r"\(2 or 2, 1568\)"),
        (UNetConfig.tiny_sdxl(), torch.zeros(3, 1568), "got shape"),
        (UNetConfig.tiny(), torch.zeros(2, 1568), "has none"),
    ],
)
def test_a_missing_or_wrong_y_is_refused(config, y, message):
    unet = random_unet(config)
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match=message):
        unet(x, 1.0, torch.zeros(2, 3, config.context_dim), y=y)


def test_full_size_configs_have_the_known_parameter_counts():
    counts = {}
    for name in ("sdxl", "sdxl_refiner"):
        with torch.device("meta"):
            unet = UNet(getattr(UNetConfig, name)())
        counts[name] = sum(p.numel() for p in unet.parameters())
    # diffusers' stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 UNets
    assert counts == {"sdxl": 2_567_463_684, "sdxl_refiner": 2_259_526_660}


@pytest.mark.parametrize("name", ["sdxl", "sdxl_refiner", "sd15", "sd2"])
def test_config_inference_and_diffusers_config_for_every_full_size_variant(name):
    """Shapes -> our config, and our config -> diffusers' config -> our config, at full size
    (built on the meta device: nothing is allocated)."""
    config = getattr(UNetConfig, name)()
    with torch.device("meta"):
        state = UNet(config).state_dict()
    inferred = infer_config(state)
    assert inferred == config  # (sd2: its 1024-wide context and linear layers: 64-wide heads)
    from sd_unet.weights import config_from_diffusers

    assert config_from_diffusers(diffusers_config(config)) == config
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**{
            k: v for k, v in diffusers_config(config).items() if not k.startswith("_")})  # fmt: skip
    assert set(theirs.state_dict()) == set(diffusers_key_map(config).values())


def test_sdxl_diffusers_config_is_stabilitys():
    """The fields of stabilityai/stable-diffusion-xl-base-1.0's unet/config.json that shape it."""
    d = diffusers_config(UNetConfig.sdxl())
    assert d["transformer_layers_per_block"] == [1, 2, 10]
    assert d["attention_head_dim"] == [5, 10, 20]
    assert d["projection_class_embeddings_input_dim"] == 2816
    assert d["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    r = diffusers_config(UNetConfig.sdxl_refiner())
    assert r["transformer_layers_per_block"] == 4 and r["attention_head_dim"] == [6, 12, 24, 24]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(transformer_depth=(1, 2)), "one per level"),
        (dict(transformer_depth=(1, 0, 2)), "0 at a level with attention"),
        (dict(transformer_depth=True), "a number"),
        (dict(transformer_depth_middle=0), "transformer_depth_middle"),
        (dict(adm_in_channels=-1), "adm_in_channels"),
    ],
)
def test_bad_depths_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(UNetConfig.tiny_sdxl(), **kwargs)


def test_depths_compare_equal_in_any_spelling():
    a = dataclasses.replace(UNetConfig.tiny_sdxl(), transformer_depth=(5, 1, 2))  # level 0 unused
    assert a == UNetConfig.tiny_sdxl()
    b = dataclasses.replace(UNetConfig.tiny_sdxl_refiner(), transformer_depth=[0, 2, 2, 0])
    assert b == UNetConfig.tiny_sdxl_refiner() and b.transformer_depth == 2
    assert [UNetConfig.sdxl().depth(level) for level in range(3)] == [0, 2, 10]
    assert UNetConfig.sdxl().transformer_depth_middle == 10


def test_family_of_each_preset():
    families = {n: getattr(UNetConfig, n)().family for n in
                ("sd15", "sd2", "sdxl", "sdxl_refiner", "tiny_sdxl", "tiny_sdxl_refiner")}  # fmt: skip
    assert families == {"sd15": "sd1", "sd2": "sd2", "sdxl": "sdxl", "sdxl_refiner":
                        "sdxl-refiner", "tiny_sdxl": "sdxl", "tiny_sdxl_refiner": "sdxl-refiner"}  # fmt: skip


def test_a_label_emb_of_the_wrong_width_names_the_key():
    with torch.device("meta"):
        state = UNet(UNetConfig.tiny_sdxl()).state_dict()
    state["label_emb.0.0.weight"] = torch.empty(100, 1568, device="meta")
    with pytest.raises(CheckpointError, match=r"'label_emb.0.0.weight' has shape \(100, 1568\)"):
        infer_config(state)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("addition_time_embed_dim", 128, "SDXL's is 256"),
        ("addition_embed_type", "text_image", "not a Stable Diffusion"),
        ("transformer_layers_per_block", [1, 2], "one per level"),
        ("flip_sin_to_cos", False, "flip_sin_to_cos"),
    ],
)
def test_unsupported_diffusers_sdxl_configs_are_refused(field, value, message):
    from sd_unet.weights import config_from_diffusers

    d = dict(diffusers_config(UNetConfig.tiny_sdxl()), **{field: value})
    with pytest.raises(CheckpointError, match=message):
        config_from_diffusers(d)


@pytest.mark.slow
def test_full_size_sdxl_base_matches_diffusers():
    """SDXL base at full size (2.6 B parameters, 10.3 GB in float32): diffusers' model with
    random weights and its output first, then ours loaded from the same tensors in the SGM
    layout (diffusers' model dropped: the two share the weights, only our channels_last copies of
    the convolutions are new), so that the peak is about 12 GB (11.3 GiB RSS measured), not
    both sides' 21."""
    import gc

    available = _available_memory_gb()
    if available < 16:
        pytest.skip(f"{available:.1f} GB of memory available; the full-size SDXL test needs 16")
    config = UNetConfig.sdxl()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=g)
    c = torch.randn(2, 77, 2048, generator=g)
    pooled = torch.randn(2, 1280, generator=g)
    t = torch.tensor([700.0])
    numbers = (torch.tensor([[1024.0, 1024.0]] * 2), torch.zeros(2, 2),
               torch.tensor([[1024.0, 1024.0]] * 2))  # fmt: skip
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**{
        k: v for k, v in diffusers_config(config).items() if not k.startswith("_")}).eval()  # fmt: skip
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.02)
        added = {"text_embeds": pooled, "time_ids": diffusers_time_ids("base", numbers)}
        ref = theirs(torch.cat([x] * 2), t, c, added_cond_kwargs=added).sample
    state = single_file(theirs, config)
    del theirs
    gc.collect()
    ours = UNet.from_checkpoint(state)  # config inferred, channels_last on the CPU
    del state
    assert ours.config == config
    with torch.no_grad():
        out = ours(x, t, c, y=our_y("base", pooled, numbers))
    err = relative_error(out, ref)
    print(f"full-size SDXL base: max abs {(out - ref).abs().max():.3g}, relative {err:.3g}")
    assert err < 1e-4


def _available_memory_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return 0.0

"""Token merging: exact at ratio 0, undone by remove, and tomesd's merge, unmerge and patched
UNet (tomesd on diffusers' UNet2DConditionModel, same weights) reproduced."""

import pytest
import torch
import torch.nn.functional as F
from conftest import inputs
from test_parity import TINY_SD1

from sd_unet import UNet, UNetConfig, tome

tomesd = pytest.importorskip("tomesd")  # test-only: pip install tomesd


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def test_ratio_zero_is_the_exact_unet(tiny):
    x, t, c = inputs(tiny.config)
    with torch.no_grad():
        exact = tiny(x, t, c)
        tome.apply(tiny, ratio=0.0, seed=0)
        assert tiny(x, t, c).equal(exact)
        tome.apply(tiny, ratio=0.5, seed=0)
        merged = tiny(x, t, c)
        tome.remove(tiny)
        assert tiny(x, t, c).equal(exact)
    assert relative_error(merged, exact) > 1e-6  # it does something (small: random weights)
    tome.remove(tiny)  # a second remove is a no-op


def test_only_the_first_level_by_default(tiny):
    levels = tome.transformer_levels(tiny)
    assert sorted(set(levels.values())) == [1, 2, 4]  # tiny(): the first two levels, the middle
    state = tome.apply(tiny, ratio=0.5)
    patched = [b for t, ds in levels.items() for b in t.transformer_blocks if b.tome is state]
    assert len(patched) == sum(ds == 1 for ds in levels.values()) == 3  # 1 down, 2 up
    tome.apply(tiny, ratio=0.5, max_downsample=2)
    for transformer, ds in levels.items():
        assert all((b.tome is tiny.tome) == (ds <= 2) for b in transformer.transformer_blocks)


@pytest.mark.parametrize("bad", [-0.1, 0.8, float("nan"), "half"])
def test_bad_ratio(tiny, bad):
    with pytest.raises(ValueError, match=r"ToMe ratio must be a number from 0 to 0\.75"):
        tome.apply(tiny, ratio=bad)


def attention(x):
    """A permutation-equivariant map over tokens (what merged tokens go through)."""
    return F.scaled_dot_product_attention(x, x, x) * 2 + x.mean(1, keepdim=True)


@pytest.mark.parametrize("h, w, r", [(8, 8, 32), (8, 8, 10), (7, 9, 30), (5, 6, 1), (4, 4, 99)])
@pytest.mark.parametrize("random", [True, False])
def test_merge_and_unmerge_are_tomesds(h, w, r, random):
    from tomesd.merge import bipartite_soft_matching_random2d

    g = torch.Generator().manual_seed(h * w + r)
    x = torch.randn(3, h * w, 16, generator=g)
    seed = 7
    theirs = bipartite_soft_matching_random2d(
        x, w, h, 2, 2, r, no_rand=not random, generator=torch.Generator().manual_seed(seed)
    )
    generator = torch.Generator().manual_seed(seed) if random else None
    ours = tome.bipartite_merge(x, tome.destinations(h, w, (2, 2), generator), r)
    m, u = ours
    tm, tu = theirs
    merged = m(x)
    assert merged.shape == tm(x).shape == (3, h * w - min(r, h * w - (h // 2) * (w // 2)), 16)
    # the merged tokens' order is each one's own; what comes back per position is not
    torch.testing.assert_close(u(m(x)), tu(tm(x)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(u(attention(m(x))), tu(attention(tm(x))), rtol=1e-5, atol=1e-5)
    # the means: a token-wise sum is kept by merging, per destination
    assert torch.allclose(merged.sum(1), tm(x).sum(1), atol=1e-4)


def test_destinations_one_per_whole_cell():
    mask = tome.destinations(5, 7, (2, 2), torch.Generator().manual_seed(0)).view(5, 7)
    assert mask.sum() == 2 * 3
    assert not mask[4].any() and not mask[:, 6].any()  # the partial cells: sources only
    cells = mask[:4, :6].reshape(2, 2, 3, 2).sum((1, 3))
    assert cells.eq(1).all()
    top_left = tome.destinations(4, 4).view(4, 4)
    assert top_left[::2, ::2].all() and top_left.sum() == 4


# --- the whole UNet against tomesd on diffusers' UNet (test_parity's tiny SD 1.x config)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**TINY_SD1).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("unet") / "unet"
    theirs.save_pretrained(folder)
    ours = UNet.from_checkpoint(folder)
    assert ours.config == UNetConfig.tiny()
    return ours, theirs


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_the_unet_with_tome_is_tomesds(pair, ratio):
    ours, theirs = pair
    x, t, c = inputs(ours.config, size=16)
    tomesd.apply_patch(theirs, ratio=ratio)
    theirs._tome_info["args"]["generator"] = torch.Generator().manual_seed(5)
    tome.apply(ours, ratio=ratio, seed=5)
    try:
        with torch.no_grad():
            for _ in range(2):  # the second call draws the next grids from both generators
                got, want = ours(x, t, c), theirs(x, t, c).sample
                assert relative_error(got, want) < 1e-4
            # shared latents (classifier-free guidance: one latent row, two context rows)
            got = ours(x[:1], t[:1], c)
            want = theirs(torch.cat([x[:1]] * 2), t[:1].expand(2), c).sample
            assert relative_error(got, want) < 1e-4
    finally:
        tome.remove(ours)
        tomesd.remove_patch(theirs)
    with torch.no_grad():
        assert relative_error(ours(x, t, c), theirs(x, t, c).sample) < 1e-4  # both exact again

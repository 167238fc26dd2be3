"""Merging, unmerging and attaching: round trips bit for bit, several LoRAs at once, any weight,
half precision; the expected weights from LyCORIS' functions (test-only)."""

from __future__ import annotations

import pickle
from copy import deepcopy

import pytest
import torch
from conftest import TinyTextEncoder, TinyUNet, adaptable, kohya_lora, randomize
from safetensors.torch import save_file
from torch import nn

from sd_lora import LoRA, LoRAError, applied, attached, remove_all

lycoris = pytest.importorskip("lycoris")
from lycoris.functional import locon  # noqa: E402


def _model(kind: str, seed: int = 0):
    return randomize(TinyUNet() if kind == "unet" else TinyTextEncoder(), seed)


def _lora(model, kind: str, seed: int = 1, rank: int = 4, alpha: float = 2.0):
    prefix = "lora_unet_" if kind == "unet" else "lora_te_"
    return LoRA.from_state_dict(kohya_lora(adaptable(model), prefix, rank, alpha, seed))


def _expected(lora: LoRA, model, weights: dict[LoRA, float] | None = None):
    """Each adapted weight as LyCORIS computes the update: W + sum of weight * delta."""
    modules = adaptable(model)
    out = {path: m.weight.detach().float().clone() for path, m in modules.items()}
    for lo, w in (weights or {lora: 1.0}).items():
        for layer in lo.layers.values():
            path = next(p for p in modules if p.replace(".", "_") == layer.path)
            t = layer.tensors
            delta = locon.diff_weight(t["lora_down.weight"].float(), t["lora_up.weight"].float(),
                                      None, gamma=layer.alpha / layer.rank)  # fmt: skip
            out[path] += w * delta.reshape(out[path].shape)
    return out


def _weights(model):
    return {path: m.weight.detach().clone() for path, m in adaptable(model).items()}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert a[k].stride() == b[k].stride(), k


@pytest.mark.parametrize("kind", ["unet", "te"])
@pytest.mark.parametrize("weight", [1.0, 0.0, -0.6, 2.5])
def test_merge_at_any_weight(kind, weight):
    model = _model(kind)
    lora = _lora(model, kind)
    expected = _expected(lora, model, {lora: weight})
    before = _state(model)
    lora.merge(model, weight)
    for path, w in _weights(model).items():
        torch.testing.assert_close(w, expected[path], rtol=1e-5, atol=1e-5)
    if weight == 0:
        _equal(_state(model), before)
    lora.unmerge(model)
    _equal(_state(model), before)


def test_two_loras_at_once_and_unmerged_in_any_order():
    model = _model("unet")
    a, b = _lora(model, "unet", seed=1), _lora(model, "unet", seed=2, rank=2, alpha=1.0)
    before = _state(model)
    a.merge(model, 0.8)
    b.merge(model, -0.3)
    expected_from_original = _expected(a, randomize(TinyUNet()), {a: 0.8, b: -0.3})
    for path, w in _weights(model).items():
        torch.testing.assert_close(w, expected_from_original[path], rtol=1e-5, atol=1e-5)
    a.unmerge(model)  # the first merged goes first: b stays, as if merged alone
    only_b = _expected(b, randomize(TinyUNet()), {b: -0.3})
    for path, w in _weights(model).items():
        torch.testing.assert_close(w, only_b[path], rtol=1e-5, atol=1e-5)
    assert [(lo, w) for lo, w, _ in applied(model)] == [(b, -0.3)]
    b.unmerge(model)
    _equal(_state(model), before)
    assert applied(model) == []


def test_merge_again_changes_the_weight():
    model = _model("te")
    lora = _lora(model, "te")
    before = _state(model)
    lora.merge(model, 1.0)
    lora.merge(model, 0.25)
    expected = _expected(lora, _model("te"), {lora: 0.25})
    for path, w in _weights(model).items():
        torch.testing.assert_close(w, expected[path], rtol=1e-5, atol=1e-5)
    lora.unmerge(model)
    _equal(_state(model), before)


def test_round_trip_bit_exact_in_half_precision_and_channels_last():
    model = _model("unet").half().to(memory_format=torch.channels_last)
    before = _state(model)
    a, b = _lora(model, "unet", seed=1), _lora(model, "unet", seed=2)
    a.merge(model, 0.7)
    b.merge(model, 1.5)
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for k, v in model.state_dict().items():  # merged weights keep the layout (channels_last)
        assert v.stride() == before[k].stride() and v.dtype == torch.float16, k
    remove_all(model)
    _equal(_state(model), before)


def _close_to_rounding(after: dict, before: dict, lora: LoRA, weight: float, ops: int = 2):
    """``after`` equals ``before`` to float32 rounding, ``ops`` in-place merges and unmerges of
    ``lora`` at |weight| at most later: each adds an update of rank r, ``W + a * up @ down``, a
    matrix product whose rounding is bounded by (r + 2) ulps of ``|W| + |a| |up| @ |down|``
    (the product's terms, which can be larger than the update they sum to)."""
    eps = torch.finfo(torch.float32).eps
    adapted = set()
    for layer in lora.layers.values():
        key = next(k for k in before if k.replace(".", "_") == f"{layer.path}_weight")
        up, down = (layer.tensors[f"lora_{n}.weight"].float().flatten(1) for n in ("up", "down"))
        terms = before[key].abs() + (abs(weight) * layer.scale * (up.abs() @ down.abs())).reshape(
            before[key].shape
        )
        assert ((after[key] - before[key]).abs() <= ops * (layer.rank + 2) * eps * terms).all()
        adapted.add(key)
    for k in before.keys() - adapted:
        assert torch.equal(after[k], before[k]), k  # what it does not adapt: untouched


@pytest.mark.parametrize("kind", ["unet", "te"])
@pytest.mark.parametrize("weight", [1.0, -0.6, 2.5])
def test_in_place_merge_and_unmerge(kind, weight):
    """in_place=True: the update added into the weights' own memory (equal to LyCORIS' delta),
    and unmerge gives the originals back to float32 rounding, still in the same memory."""
    model = _model(kind)
    if kind == "unet":  # a 3x3 LoCon conv in channels_last takes the general path
        model = model.to(memory_format=torch.channels_last)
    lora = _lora(model, kind)
    expected = _expected(lora, model, {lora: weight})
    before = _state(model)
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    lora.merge(model, weight, in_place=True)
    merged = _state(model)
    for path, w in _weights(model).items():
        torch.testing.assert_close(w, expected[path], rtol=1e-5, atol=1e-5)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == pointers
    assert [(lo, w, how) for lo, w, how in applied(model)] == [(lora, weight, "merged")]
    lora.unmerge(model)
    _close_to_rounding(_state(model), before, lora, weight)
    assert not any(
        torch.equal(merged[f"{k}.weight"], before[f"{k}.weight"]) for k in _weights(model)
    )
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == pointers
    assert applied(model) == []


def test_in_place_under_and_over_kept_copy_merges():
    """An in-place LoRA is the base a kept-copy one starts from: unmerging either leaves the
    other as if merged alone; the kept-copy one's unmerge is still bit for bit."""
    model = _model("unet")
    a, b = _lora(model, "unet", seed=1), _lora(model, "unet", seed=2, rank=2, alpha=1.0)
    before = _state(model)
    a.merge(model, 0.8, in_place=True)
    after_a = _state(model)
    b.merge(model, -0.3)
    both = _expected(a, randomize(TinyUNet()), {a: 0.8, b: -0.3})
    for path, w in _weights(model).items():
        torch.testing.assert_close(w, both[path], rtol=1e-5, atol=1e-5)
    b.unmerge(model)
    _equal(_state(model), after_a)
    b.merge(model, -0.3)
    a.unmerge(model)  # subtracted from the kept original, then b merged again on it
    only_b = _expected(b, randomize(TinyUNet()), {b: -0.3})
    for path, w in _weights(model).items():
        torch.testing.assert_close(w, only_b[path], rtol=1e-5, atol=1e-5)
    a.merge(model, 0.5, in_place=True)
    a.merge(model, 0.25, in_place=True)  # again: the weight changes
    remove_all(model)
    _close_to_rounding(_state(model), before, a, 0.8, ops=6)


def test_remove_all_makes_no_kept_copy_merge_again(monkeypatch):
    """Two in-place LoRAs under a kept-copy one: remove_all restores the kept originals once
    and subtracts the in-place ones from them, merging nothing again on the way."""
    from sd_lora import lora as lora_module

    model = _model("unet")
    a, b, c = (_lora(model, "unet", seed=s) for s in (1, 2, 3))
    before = _state(model)
    a.merge(model, 0.8, in_place=True)
    b.merge(model, -0.4, in_place=True)
    c.merge(model, 1.3)
    merges = []
    real = lora_module._merge
    monkeypatch.setattr(lora_module, "_merge", lambda *args: merges.append(1) or real(*args))
    remove_all(model)
    assert merges == [] and applied(model) == []
    # two in-place merges and their two unmerges: each within a GEMM's rounding of its update
    for k, v in _state(model).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-5 * before[k].abs().max().item())


def test_in_place_refuses_what_subtracting_cannot_undo():
    half = _model("te").half()
    before = _state(half)
    with pytest.raises(LoRAError, match="in-place merge needs float32 weights"):
        _lora(half, "te").merge(half, in_place=True)
    _equal(_state(half), before)
    model = _model("te")
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    dora = kohya_lora({"text_model.encoder.layers.0.self_attn.q_proj": adaptable(model)[
        "text_model.encoder.layers.0.self_attn.q_proj"]}, "lora_te_")  # fmt: skip
    dora[f"{key}.dora_scale"] = torch.rand(1, 12) + 0.5
    with pytest.raises(LoRAError, match="DoRA layer scales the weight"):
        LoRA.from_state_dict(dora).merge(model, in_place=True)


def test_in_place_merge_that_does_not_fit_is_taken_out_again():
    """A layer of another model's shape, after others were added: those are subtracted again
    and the error names the layer."""
    model = _model("te")
    state = kohya_lora(adaptable(model), "lora_te_")
    last = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    state[f"{last}.lora_down.weight"] = torch.randn(4, 40)  # fc2 takes 48 features
    state = {k: state[k] for k in sorted(state, key=lambda k: k.startswith(last))}  # it last
    before = _state(model)
    lora = LoRA.from_state_dict(state)
    with pytest.raises(LoRAError, match=last):
        lora.merge(model, 2.0, in_place=True)
    del lora.layers[last]  # (its update was never added)
    _close_to_rounding(_state(model), before, lora, 2.0)
    assert applied(model) == []


def test_half_precision_merge_computes_in_float32():
    """An update whose factors' product overflows float16 (but not once scaled by alpha /
    rank) merges to finite weights, equal to the float32 computation rounded once."""
    model = _model("te").half()
    rank = 16
    path = "text_model.encoder.layers.0.self_attn.q_proj"
    key = "lora_te_" + path.replace(".", "_")
    down = torch.full((rank, 12), 100.0, dtype=torch.float16)
    up = torch.full((12, rank), 100.0, dtype=torch.float16)
    assert not torch.isfinite(up @ down).all()  # in float16 the product is inf
    lora = LoRA.from_state_dict({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                                 f"{key}.alpha": torch.tensor(1.0, dtype=torch.float16)})  # fmt: skip
    module = model.text_model.encoder.layers[0].self_attn.q_proj
    original = module.weight.detach().clone()
    lora.merge(model, 0.5)
    expected = (original.float() + 0.5 / rank * (up.float() @ down.float())).half()
    assert torch.isfinite(module.weight).all()
    assert torch.equal(module.weight.detach(), expected)


def test_half_precision_overflow_is_refused():
    model = _model("te").half()
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    lora = LoRA.from_state_dict({f"{key}.lora_down.weight": torch.full((1, 12), 1e3),
                                 f"{key}.lora_up.weight": torch.full((12, 1), 1e3)})  # fmt: skip
    before = _state(model)
    with pytest.raises(LoRAError, match=r"beyond torch\.float16's range"):
        lora.merge(model)
    _equal(_state(model), before)


@pytest.mark.parametrize("tokens", [1, 64], ids=["few_tokens", "many_tokens"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("kind", ["unet", "te"])
def test_attached_equals_merged(kind, grad, tokens, monkeypatch):
    """On the fly (weights untouched) each adapted layer gives the merged layer's output: with
    autograd (hooks, out of place), and without, beside the layer for a few tokens (added in
    place into its fresh output) or folded into the weight for many."""
    folds = []
    fold = attached._fold
    monkeypatch.setattr(attached, "_fold", lambda *a: folds.append(1) or fold(*a))
    torch.set_grad_enabled(grad)
    try:
        _attached_equals_merged(kind, tokens)
    finally:
        torch.set_grad_enabled(True)
    assert bool(folds) == (tokens > 1 and not grad)


def _attached_equals_merged(kind, tokens):
    model = _model(kind)
    a, b = _lora(model, kind, seed=1), _lora(model, kind, seed=2)
    before = _state(model)
    inputs = _inputs(model, tokens)
    plain = {p: m(inputs[p]) for p, m in adaptable(model).items()}
    a.attach(model, 0.7)
    b.attach(model, -1.2)
    _equal(_state(model), before)
    hooked = {p: m(inputs[p]) for p, m in adaptable(model).items()}
    a.detach(model)
    b.detach(model)
    for p, m in adaptable(model).items():
        assert "forward" not in m.__dict__  # the folded forwards gone with the last LoRA
        assert torch.equal(m(inputs[p]), plain[p])
    a.merge(model, 0.7)
    b.merge(model, -1.2)
    for p, m in adaptable(model).items():
        torch.testing.assert_close(hooked[p], m(inputs[p]), rtol=1e-4, atol=1e-4)


def _inputs(model, tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """An input per adapted layer: ``tokens`` rows for a linear one, an image for a conv (6x6
    for many tokens, 1x1 for one)."""
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for path, m in adaptable(model).items():
        if hasattr(m, "in_features"):
            shape = (2, tokens, m.in_features) if tokens > 1 else (2, m.in_features)
        else:
            side = 6 if tokens > 1 else 1
            shape = (1, m.in_channels, side, side)
        inputs[path] = torch.randn(shape, generator=g)
    return inputs


@torch.no_grad()
def test_folded_layers_choose_by_size_and_copy_with_the_model():
    """A folded layer takes the product beside it where that is cheaper (few tokens), the
    folded weight where that is (many); a deep copy of the model computes with its own
    weights; float16 weights fold in float32, rounded once as a merge rounds them."""
    model = _model("te")
    lora = _lora(model, "te", rank=4)
    q = model.text_model.encoder.layers[0].self_attn.q_proj
    lora.attach(model, 0.9)
    update = q.forward.__self__.updates[(id(lora), lora.keys()[0])]
    assert not update.folds(2) and update.folds(64)
    copy = deepcopy(model)
    x = torch.randn(1, 64, 12)
    assert torch.equal(copy.text_model.encoder.layers[0].self_attn.q_proj(x), q(x))
    copy.text_model.encoder.layers[0].self_attn.q_proj.weight.zero_()
    assert not torch.equal(copy.text_model.encoder.layers[0].self_attn.q_proj(x), q(x))
    attached_out = q(x)
    lora.detach(model)
    assert "forward" in copy.text_model.encoder.layers[0].self_attn.q_proj.__dict__
    lora.merge(model, 0.9)
    torch.testing.assert_close(attached_out, q(x), rtol=1e-5, atol=1e-5)
    lora.unmerge(model)

    half = _model("te").half()
    lora.attach(half, 0.9)
    hq = half.text_model.encoder.layers[0].self_attn.q_proj
    attached_out = hq(x.half())
    lora.detach(half)
    lora.merge(half, 0.9)
    torch.testing.assert_close(attached_out, hq(x.half()), rtol=2e-3, atol=2e-3)


class _WithForward(nn.Conv2d):
    """A conv layer whose class offers ``forward_with`` (as sd-unet's Conv3x3): folding calls
    it with the folded weight, in the weight's own layout."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def forward(self, x):
        return self.forward_with(x, self.weight, self.bias)

    def forward_with(self, x, weight, bias):
        self.seen.append(weight.stride())
        return self._conv_forward(x, weight, bias)


@torch.no_grad()
def test_folded_convs_keep_the_weights_layout_and_use_forward_with():
    model = _model("unet").to(memory_format=torch.channels_last)
    path = "input_blocks.0.0"  # conv_in, a 3x3 conv
    conv = dict(model.named_modules())[path]
    special = _WithForward(conv.in_channels, conv.out_channels, 3, padding=1)
    special = special.to(memory_format=torch.channels_last)
    special.weight.copy_(conv.weight)
    special.bias.copy_(conv.bias)
    model.input_blocks[0][0] = special
    lora = _lora(model, "unet")
    x = torch.randn(1, conv.in_channels, 8, 8).contiguous(memory_format=torch.channels_last)
    inputs = _inputs(model, 64)
    inputs[path] = x
    lora.attach(model, 0.6)
    special.seen.clear()
    attached_out = {p: m(inputs[p]) for p, m in adaptable(model).items()}
    assert special.seen == [special.weight.stride()]  # folded, channels_last like the weight
    model.to(memory_format=torch.contiguous_format)  # the layout changes after attach
    torch.testing.assert_close(special(x), attached_out[path], rtol=1e-5, atol=1e-5)
    assert special.seen[-1] == special.weight.stride() != special.seen[0]
    lora.detach(model)
    lora.merge(model, 0.6)
    for p, m in adaptable(model).items():
        torch.testing.assert_close(attached_out[p], m(inputs[p]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@torch.no_grad()
def test_full_size_updates_attached_equal_merged(layout):
    """LoHa on a 3x3 conv and DoRA on a linear layer (full-size updates, folded for any size):
    attached, the same outputs as merged, in either layout of the conv's weight."""
    model = _model("unet").to(memory_format=layout)
    g = torch.Generator().manual_seed(5)
    conv, rank = "lora_unet_input_blocks_0_0", 3
    q = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    lora = LoRA.from_state_dict({
        f"{conv}.hada_w1_a": torch.randn(8, rank, generator=g),
        f"{conv}.hada_w1_b": torch.randn(rank, 36, generator=g),
        f"{conv}.hada_w2_a": torch.randn(8, rank, generator=g),
        f"{conv}.hada_w2_b": torch.randn(rank, 36, generator=g),
        f"{conv}.alpha": torch.tensor(2.0),
        f"{q}.lora_down.weight": torch.randn(2, 8, generator=g),
        f"{q}.lora_up.weight": torch.randn(8, 2, generator=g),
        f"{q}.dora_scale": torch.rand(8, 1, generator=g) + 0.5,
    })  # fmt: skip
    modules = dict(model.named_modules())
    inputs = {
        "input_blocks.0.0": torch.randn(1, 4, 6, 6, generator=g).contiguous(memory_format=layout),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q": torch.randn(2, 16, 8, generator=g),
    }
    lora.attach(model, 0.7)
    attached_out = {p: modules[p](x) for p, x in inputs.items()}
    assert all("forward" in modules[p].__dict__ for p in inputs)  # folded
    lora.detach(model)
    lora.merge(model, 0.7)
    for p, x in inputs.items():
        torch.testing.assert_close(attached_out[p], modules[p](x), rtol=1e-5, atol=1e-5)


def test_attach_full_kind_and_weight_zero():
    model = _model("te")
    path = "text_model.encoder.layers.1.mlp.fc2"
    key = "lora_te_" + path.replace(".", "_")
    g = torch.Generator().manual_seed(3)
    lora = LoRA.from_state_dict({f"{key}.diff": torch.randn(12, 48, generator=g),
                                 f"{key}.diff_b": torch.randn(12, generator=g)})  # fmt: skip
    module = model.text_model.encoder.layers[1].mlp.fc2
    x = torch.randn(3, 48, generator=g)
    plain = module(x)
    lora.attach(model, 0.0)
    assert torch.equal(module(x), plain)
    lora.attach(model, 1.5)
    hooked = module(x)
    lora.detach(model)
    lora.merge(model, 1.5)
    torch.testing.assert_close(hooked, module(x), rtol=1e-5, atol=1e-5)


def test_nan_in_the_file_is_refused():
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    with pytest.raises(LoRAError, match=f"{key}.lora_up.weight: NaN"):
        LoRA.from_state_dict(
            {
                f"{key}.lora_down.weight": torch.ones(1, 12),
                f"{key}.lora_up.weight": torch.full((12, 1), float("nan")),
            }
        )


def test_bad_weight():
    model = _model("te")
    with pytest.raises(ValueError, match="finite number"):
        _lora(model, "te").merge(model, float("nan"))


def test_unmerge_of_a_lora_not_merged():
    model = _model("te")
    with pytest.raises(LoRAError, match="not merged"):
        _lora(model, "te").unmerge(model)


# ---------------------------------------------------------------------------------------------
# Files


def test_from_file_safetensors_and_pickle(tmp_path):
    te, unet = _model("te"), _model("unet")
    state = kohya_lora(adaptable(te), "lora_te_", rank=8, alpha=4.0)
    state |= kohya_lora(adaptable(unet), "lora_unet_", rank=8, alpha=4.0, seed=2)
    metadata = {"ss_network_dim": "8", "ss_network_alpha": "4.0", "ss_output_name": "style"}
    save_file(state, tmp_path / "style.safetensors", metadata)
    torch.save(state, tmp_path / "style.pt")
    for path, meta in ((tmp_path / "style.safetensors", metadata), (tmp_path / "style.pt", {})):
        lora = LoRA.from_file(path)
        assert lora.name == "style"
        assert lora.rank == 8 and lora.alpha == 4.0
        assert lora.metadata == meta
        assert sorted(lora.keys()) == sorted({k.split(".")[0] for k in state})
        assert lora.components() == {"unet", "te"}
        lora.merge(te)
        lora.merge(unet)


class _Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"lora_te_x.lora_down.weight": _Payload()}, protocol=2))
    with pytest.raises(LoRAError, match="cannot be opened safely"):
        LoRA.from_file(path)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        LoRA.from_file(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoRAError, match="not a readable"):
        LoRA.from_file(tmp_path / "junk.safetensors")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(LoRAError, match=r"expected \.safetensors"):
        LoRA.from_file(tmp_path / "x.txt")

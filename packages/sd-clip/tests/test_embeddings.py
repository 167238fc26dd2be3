"""Textual-inversion files in the layouts AUTOMATIC1111 reads, written here as each tool writes them."""

import hashlib
import logging

import pytest
import torch
from safetensors.torch import save_file

from sd_clip import CheckpointError, Embedding, load_embedding, load_embeddings, ti_hashes

VECTORS = torch.randn(3, 768, generator=torch.Generator().manual_seed(0))


def write_a1111_pt(path, vec=VECTORS):
    # What AUTOMATIC1111's Embedding.save writes.
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vec},
            "name": path.stem,
            "step": 1000,
            "sd_checkpoint": "abcdef12",
            "sd_checkpoint_name": "v1-5",
        },
        path,
    )
    return path


def test_a1111_pt(tmp_path):
    e = load_embedding(write_a1111_pt(tmp_path / "MyStyle.pt"))
    assert e.name == "MyStyle" and e.num_vectors == 3 and e.widths == (768,)
    assert torch.equal(e.vectors_for(768), VECTORS)


def test_original_textual_inversion_parameter_dict(tmp_path):
    # The original textual-inversion code pickled string_to_param as an nn.ParameterDict.
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(VECTORS.clone())})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params}, tmp_path / "old.pt")
    e = load_embedding(tmp_path / "old.pt")
    assert torch.equal(e.vectors_for(768), VECTORS) and not e.vectors_for(768).requires_grad


def test_kohya_safetensors(tmp_path):
    save_file({"emb_params": VECTORS}, str(tmp_path / "easynegative.safetensors"))
    e = load_embedding(tmp_path / "easynegative.safetensors")
    assert e.name == "easynegative" and torch.equal(e.vectors_for(768), VECTORS)


def test_diffusers_bin_single_vector(tmp_path):
    torch.save({"<cat-toy>": VECTORS[0]}, tmp_path / "learned_embeds.bin")  # 1-d: one vector
    e = load_embedding(tmp_path / "learned_embeds.bin")
    assert e.name == "learned_embeds" and e.num_vectors == 1
    assert torch.equal(e.vectors_for(768), VECTORS[:1])


def test_sdxl_embedding(tmp_path):
    g = torch.randn(3, 1280)
    save_file({"clip_l": VECTORS, "clip_g": g}, str(tmp_path / "xl.safetensors"))
    e = load_embedding(tmp_path / "xl.safetensors")
    assert e.widths == (768, 1280) and torch.equal(e.vectors_for(1280), g)
    with pytest.raises(ValueError, match=r"xl\.safetensors.*768 or 1280 wide.*1024 wide"):
        e.vectors_for(1024)


def test_hash_is_the_files_sha256(tmp_path):
    path = write_a1111_pt(tmp_path / "h.pt")
    e = load_embedding(path)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert e.sha256 == want and e.shorthash == want[:12]
    assert Embedding("mem", VECTORS).shorthash is None


class Payload:
    """Stands for a pickle that calls a function when loaded (here a harmless one)."""

    def __reduce__(self):
        return (Payload, ())


def test_code_running_pickle_is_refused(tmp_path):
    torch.save({"string_to_param": {"*": VECTORS}, "evil": Payload()}, tmp_path / "e.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_embedding(tmp_path / "e.pt")


@pytest.mark.parametrize(
    "data, match",
    [
        ({"a": VECTORS, "b": VECTORS}, "not an embedding"),
        ({"string_to_param": {"*": VECTORS, "x": VECTORS}}, "exactly one tensor"),
        ({"string_to_param": {"*": torch.zeros(2, 3, 4)}}, "vectors x width"),
        ({"x": torch.zeros(0, 768)}, "one or more vectors"),
        ({"x": torch.ones(2, 3, dtype=torch.long)}, "float tensor"),
    ],
)
def test_not_an_embedding(tmp_path, data, match):
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=match):
        load_embedding(tmp_path / "bad.pt")


def test_load_folder(tmp_path, caplog):
    write_a1111_pt(tmp_path / "Zeta.pt")
    (tmp_path / "sub").mkdir()
    save_file({"emb_params": VECTORS}, str(tmp_path / "sub" / "alpha.safetensors"))
    (tmp_path / "empty.pt").write_bytes(b"")  # skipped, as AUTOMATIC1111 does
    (tmp_path / "alpha.preview.png").write_bytes(b"png")  # not an embedding suffix
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING):
        found = load_embeddings(tmp_path)
    assert list(found) == ["alpha", "Zeta"]  # sorted by lower-case name
    assert found["alpha"].path == tmp_path / "sub" / "alpha.safetensors"
    assert "broken.safetensors" in caplog.text and "left out" in caplog.text


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such embeddings folder"):
        load_embeddings(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no such embedding file"):
        load_embedding(tmp_path / "nope.pt")


def test_ti_hashes_as_a1111_writes_them(tmp_path):
    a = load_embedding(write_a1111_pt(tmp_path / "bad,hands.pt"))
    b = load_embedding(write_a1111_pt(tmp_path / "style:v2.pt", VECTORS[:1]))
    memory = Embedding("mem", VECTORS)
    want = f"badhands: {a.sha256[:12]}, stylev2: {b.sha256[:12]}"
    assert ti_hashes([a, memory, b, a]) == want
    assert ti_hashes([]) == ""

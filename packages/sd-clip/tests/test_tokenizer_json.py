"""A tokenizer folder as transformers 5 saves it (tokenizer.json and tokenizer_config.json, no
vocab.json / merges.txt): read by CLIPTokenizer.from_folder, ids and padding as transformers'."""

from __future__ import annotations

import json

import pytest

from sd_clip import CLIPTokenizer

transformers = pytest.importorskip("transformers")

PROMPTS = ["a red circle", "A photo of an astronaut riding a horse, 4k, (masterpiece:1.2)",
           "ünïcödé café naïve", "", "don't stop"]  # fmt: skip


@pytest.mark.parametrize("pad", ["!", None])
def test_tokenizer_json_folder_reads_as_transformers(tmp_path, pad):
    CLIPTokenizer().save(tmp_path / "classic")
    extra = {} if pad is None else {"pad_token": pad}
    reference = transformers.CLIPTokenizer.from_pretrained(
        str(tmp_path / "classic"), model_max_length=77, **extra
    )
    reference.save_pretrained(tmp_path / "saved")
    if (tmp_path / "saved" / "vocab.json").exists():
        pytest.skip("this transformers writes vocab.json: the classic path is tested elsewhere")
    ours = CLIPTokenizer.from_folder(tmp_path / "saved")
    assert ours.pad_id == reference.pad_token_id
    assert ours.pad_id == (0 if pad == "!" else ours.end_id)
    expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True)
    assert ours(PROMPTS).tolist() == expected.input_ids


def test_bad_tokenizer_json_is_one_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}}))
    with pytest.raises(ValueError, match="expected a BPE tokenizer model"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b c"]}})
    )
    with pytest.raises(ValueError, match="merge 0 is not two symbols"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"or tokenizer\.json"):
        CLIPTokenizer.from_folder(tmp_path)

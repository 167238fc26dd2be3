"""The lint check catches what it is for: a planted sibling import, a drifted copy."""

import shutil
from pathlib import Path

import check_packages as cp

ROOT = Path(__file__).resolve().parents[1]


def make_tree(tmp_path: Path) -> Path:
    for name in ("sd-vae", "sd-clip", "sd-unet", "sd-samplers", "sd-pipeline"):
        shutil.copytree(ROOT / "packages" / name / "src", tmp_path / "packages" / name / "src")
    return tmp_path


def test_the_real_tree_is_clean():
    assert cp.check_independence() == []
    assert cp.check_copies() == []


def test_planted_sibling_import_is_caught(tmp_path):
    root = make_tree(tmp_path)
    planted = root / "packages/sd-vae/src/sd_vae/planted.py"
    planted.write_text("import sd_unet\nfrom sd_clip.tokenizer import CLIPTokenizer\n")
    errors = cp.check_independence(root)
    assert any("sd_vae imports sd_unet" in e for e in errors)
    assert any("sd_vae imports sd_clip" in e for e in errors)


def test_pipeline_may_import_components(tmp_path):
    root = make_tree(tmp_path)
    (root / "packages/sd-pipeline/src/sd_pipeline/extra.py").write_text("import sd_unet\n")
    assert cp.check_independence(root) == []


def test_drifted_copy_is_caught_and_fixed(tmp_path):
    root = make_tree(tmp_path)
    copy = root / "packages/sd-unet/src/sd_unet/_checkpoint.py"
    copy.write_text(copy.read_text() + "\nDRIFT = 1\n")
    errors = cp.check_copies(root)
    assert len(errors) == 1 and "sd_unet/_checkpoint.py has drifted" in errors[0]
    assert cp.check_copies(root, fix=True) == []
    assert cp.check_copies(root) == []

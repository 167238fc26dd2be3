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
    assert cp.check_private_imports() == []
    assert cp.check_copies() == []


def test_private_import_of_another_distribution_is_caught(tmp_path):
    root = make_tree(tmp_path)
    planted = root / "packages/sd-pipeline/src/sd_pipeline/planted.py"
    planted.write_text("from sd_vae._checkpoint import file_mode\nfrom sd_unet import _x\n")
    (root / "benchmarks").mkdir()
    (root / "benchmarks" / "b.py").write_text("import sd_clip._checkpoint\n")
    own = root / "packages/sd-vae/src/sd_vae/own.py"
    own.write_text("from sd_vae._checkpoint import load_tensors\n")  # its own: allowed
    errors = cp.check_private_imports(root)
    assert not any("own.py" in e for e in errors), errors
    assert any("planted.py: imports sd_vae._checkpoint" in e for e in errors)
    assert any("planted.py: imports sd_unet._x" in e for e in errors)
    assert any("b.py: imports sd_clip._checkpoint" in e for e in errors)


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


def test_requirements_install_every_package():
    """The root requirements.txt (the README's way to install everything) names each package."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    listed = {line.strip() for line in lines if line.startswith("./packages/")}
    present = {
        f"./packages/{p.name}"
        for p in (ROOT / "packages").iterdir()
        if (p / "pyproject.toml").is_file()
    }
    assert listed == present

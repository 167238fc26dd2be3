"""examples/*.py run as written, and the code cells of examples/demo.ipynb run in order."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
SCRIPTS = ["txt2img.py", "img2img.py", "inpaint.py", "compose_components.py", "shapes_grid.py"]


def _require_examples():
    if not EXAMPLES.is_dir():
        pytest.skip("examples/ is not beside this package (installed on its own)")


def test_demo_notebook_cells_run(tmp_path, monkeypatch):
    _require_examples()
    notebook = json.loads((EXAMPLES / "demo.ipynb").read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 6
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__demo__"}
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        exec(compile(source, f"demo.ipynb cell {i}", "exec"), namespace)
    assert (
        len(namespace["images"]) == 4 and namespace["inpainted"].size == namespace["picture"].size
    )


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script, tmp_path, monkeypatch):
    _require_examples()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script])  # as run with no arguments, not with pytest's
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert list(tmp_path.glob("*.png")), f"{script} wrote no picture"

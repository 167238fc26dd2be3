"""The README's first Python snippet runs as written, so it cannot drift from the API."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_snippet_runs(tmp_path, monkeypatch):
    snippet = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)  # whatever the snippet writes lands in a temporary folder
    exec(compile(snippet, str(README), "exec"), {"__name__": "__readme__"})

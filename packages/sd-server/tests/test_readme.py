"""The README's Python snippets run as written, so they cannot drift from the API."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_in_process_snippet_runs(tmp_path, monkeypatch):
    (snippet,) = [s for s in SNIPPETS if "TestClient" in s]
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, str(README), "exec"), {"__name__": "__readme__"})


def test_webuiapi_snippet_runs_against_a_server(server, tmp_path, monkeypatch):
    (snippet,) = [s for s in SNIPPETS if "webuiapi.WebUIApi" in s]
    assert "port=7860" in snippet
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet.replace("port=7860", f"port={server.port}"), str(README), "exec"), {})
    assert (tmp_path / "circle.png").is_file()

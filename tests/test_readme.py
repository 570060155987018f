"""The README's Python API block runs as written."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_python_api_block_runs_verbatim(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it saves to out/sentiment
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "out" / "sentiment" / "adapter_model.safetensors").is_file()
    assert "trainable" in capsys.readouterr().out
    assert type(namespace["merged"]).__name__ == "BertForSequenceClassification"


def test_every_combine_type_is_described():
    from peftkit.combinations import COMBINATIONS
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Combining adapters"):]
    assert [name for name in COMBINATIONS if f"* `{name}`: " not in section] == []

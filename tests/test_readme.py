"""The README's usage example runs as written (on a tiny local model and adapters)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from .conftest import BaseModel

pytestmark = pytest.mark.slow  # compiles on CPU: seconds per graph

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs(tmp_path, monkeypatch) -> None:
    code = re.search(r"## Usage\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    base = BaseModel("llama", seed=2)
    base.model.save_pretrained(tmp_path / "base")
    base.make_adapter(tmp_path / "sql", seed=1, r=4)
    base.make_adapter(tmp_path / "chat", seed=2, r=8)
    code = (code.replace("path/to/base", str(tmp_path / "base"))
                .replace("path/to/peft_adapter_dir", str(tmp_path / "sql"))
                .replace("path/to/other_adapter", str(tmp_path / "chat")))
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    rt = namespace["rt"]
    assert rt.guard.recompiles == 0 and "recompiles=0" in rt.guard.report()
    assert isinstance(namespace["out"].logits, torch.Tensor)


def test_readme_enable_hotswap_example_runs(tmp_path) -> None:
    block = re.search(r"```python\n(rt = hotswap_rt\.enable_hotswap.*?)```", README.read_text(), re.S)
    code = block.group(1)
    base = BaseModel("llama", seed=3)
    for i, name in enumerate(("sql", "chat", "sql-v2")):
        base.make_adapter(tmp_path / name, seed=10 + i, r=4 * (i + 1))
        code = code.replace(f'"path/to/{name}"', repr(str(tmp_path / name)))
    torch._dynamo.reset()
    import hotswap_rt

    namespace: dict = {"model": base.clone(), "torch": torch, "hotswap_rt": hotswap_rt}
    exec(compile(code, str(README), "exec"), namespace)
    rt = namespace["rt"]
    assert rt.guard.compiles >= 1 and rt.guard.recompiles == 0
    assert namespace["model"].active_adapters() == ["sql", "chat"]

"""``examples/custom_server.py`` works as written: served over real HTTP on loopback."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest
import torch

from hotswap_rt.serve.background import BackgroundServer
from hotswap_rt.serve.demo_adapters import REPLIES

pytestmark = pytest.mark.slow  # the example compiles its model on import

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_server.py"


def test_custom_server_example() -> None:
    assert len(EXAMPLE.read_text().splitlines()) < 60
    torch._dynamo.reset()
    spec = importlib.util.spec_from_file_location("custom_server", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with BackgroundServer(module.app) as url, httpx.Client(base_url=url, timeout=60) as client:
        for name in ["french", "english", "pirate", "french"]:
            body = client.post("/generate", json={"adapter": name, "prompt": "Hello"}).json()
            assert body["text"] == " " + REPLIES[name] and body["recompiles"] == 0
        assert client.post("/generate", json={"adapter": "ghost", "prompt": "x"}).status_code == 404
        base = client.post("/generate", json={"prompt": "Hello"}).json()["text"]
        assert base not in {" " + reply for reply in REPLIES.values()}
    assert module.rt.guard.recompiles == 0


def test_agents_sdk_example() -> None:
    """``examples/agents_sdk.py``: the OpenAI Agents SDK's tool loop with the ``weather``
    adapter ends with its trained answer through both model kinds (needs ``openai-agents``,
    not a test dependency: skipped without it)."""
    pytest.importorskip("agents")
    import asyncio

    spec = importlib.util.spec_from_file_location("agents_sdk", EXAMPLE.parent / "agents_sdk.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from hotswap_rt.serve import ServeConfig, build_app
    from hotswap_rt.serve.demo_adapters import tool_adapter_path

    module.set_tracing_disabled(True)
    config = ServeConfig(compile=False, max_rank=8, enable_auto_tool_choice=True, tool_call_parser="hermes",
                         adapters={"weather": str(tool_adapter_path())})
    with BackgroundServer(build_app(config)) as url:
        answers = asyncio.run(module.ask(url, "Weather in Paris?"))
    assert answers == {"OpenAIResponsesModel": "Paris: 18C and sunny.",
                       "OpenAIChatCompletionsModel": "Paris: 18C and sunny."}

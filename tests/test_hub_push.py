"""``rt.push_to_hub`` and the model's ``push_to_hub`` (after ``enable_hotswap``) upload through
``huggingface_hub`` to a local HTTP endpoint that answers the Hub's three calls (create repo,
preupload, commit) and records what it receives. The uploaded files must be the adapter PEFT
loads."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import huggingface_hub.constants
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load

from hotswap_rt import HotswapError, HotswapRuntime, RuntimeConfig, enable_hotswap

from .conftest import VOCAB, BaseModel, logits


class FakeHub:
    """Records ``requests`` (method, path, JSON or NDJSON body) and ``files`` (path -> bytes)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.files: dict[str, bytes] = {}
        self.repos: list[dict[str, Any]] = []
        self.tokens: set[str | None] = set()  # the Authorization headers seen
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.tokens.add(self.headers.get("Authorization"))
                if self.path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.repos.append(payload)
                    hub.requests.append(("POST", self.path, payload))
                    repo = f"{payload.get('organization') or 'user'}/{payload['name']}"
                    return self._json({"url": f"{hub.url}/{repo}"})
                if "/preupload/" in self.path:
                    payload = json.loads(body)
                    hub.requests.append(("POST", self.path, payload))
                    files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                             for f in payload["files"]]
                    return self._json({"files": files})
                if "/commit/" in self.path:
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    hub.requests.append(("POST", self.path, lines))
                    for line in lines:
                        if line["key"] == "file":
                            hub.files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                    repo = self.path.split("/api/models/", 1)[1].split("/commit/", 1)[0]
                    return self._json({"commitUrl": f"{hub.url}/{repo}/commit/{'a' * 40}",
                                       "commitOid": "a" * 40})
                self.send_error(404)

            def _json(self, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    base = BaseModel("llama", seed=4)
    path = base.make_adapter(tmp_path_factory.mktemp("push") / "a", seed=1, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"])
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    return {"base": base, "path": path, "ids": ids, "ref": logits(base.peft_reference({"a": path}), ids)}


def _uploaded_adapter_equals_peft(hub: FakeHub, case, tmp_path) -> None:
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(hub.files)
    for name, data in hub.files.items():
        (tmp_path / name).write_bytes(data)
    assert set(load(hub.files["adapter_model.safetensors"])) == set(
        load((case["path"] / "adapter_model.safetensors").read_bytes()))
    reference = PeftModel.from_pretrained(case["base"].clone(), tmp_path).eval()
    torch.testing.assert_close(logits(reference, case["ids"]), case["ref"], atol=1e-5, rtol=1e-5)


def test_runtime_push_to_hub_uploads_the_adapter(hub, case, tmp_path) -> None:
    rt = HotswapRuntime(case["base"].clone(), RuntimeConfig(target_modules=["q_proj", "v_proj"], max_rank=8))
    rt.load("a", case["path"])
    url = rt.push_to_hub("a", "user/my-adapter", commit_message="first", private=True, token="hf_x",
                         endpoint=hub.url)
    assert url.startswith(hub.url) and "/commit/" in url
    assert hub.repos == [
        {"name": "my-adapter", "organization": "user", "visibility": "private", "type": "model"}]
    commit = next(body for method, path, body in hub.requests if "/commit/" in path)
    assert commit[0]["value"]["summary"] == "first" and hub.tokens == {"Bearer hf_x"}
    _uploaded_adapter_equals_peft(hub, case, tmp_path)
    with pytest.raises(HotswapError, match="nope"):
        rt.push_to_hub("nope", "user/x", endpoint=hub.url)


def test_model_push_to_hub_after_enable_hotswap(hub, case, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)  # as HF_ENDPOINT would
    model = case["base"].clone()
    enable_hotswap(model, max_rank=8, device_slots=2)
    with pytest.raises(HotswapError, match="no adapter is loaded"):
        model.push_to_hub("user/empty")
    model.load_adapter(str(case["path"]), adapter_name="a")
    with pytest.raises(HotswapError, match="tags"):
        model.push_to_hub("user/tagged", tags=["x"])
    assert hub.requests == []  # refusals send nothing
    model.push_to_hub("user/model-adapter", token="hf_x")
    assert "generation_config.json" in hub.files
    _uploaded_adapter_equals_peft(hub, case, tmp_path)

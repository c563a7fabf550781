"""Scale-out on Ray Serve, with real Ray on this machine: ``ray.init(num_cpus=2)``, two worker
replicas at half a CPU each, four adapters, loopback HTTP. Texts are compared with PEFT's eager
greedy generation of each prompt alone (as in ``test_serve.py``)."""

from __future__ import annotations

import json

import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from hotswap_rt.serve import ServeConfig  # noqa: E402
from hotswap_rt.serve.default_model import MODEL_NAME  # noqa: E402
from hotswap_rt.serve.demo_adapters import REPLIES, demo_adapter_paths  # noqa: E402
from hotswap_rt.serve.ray.app import build_ray_app  # noqa: E402

from .test_serve import mix_reference_text, reference_text  # noqa: E402

pytestmark = pytest.mark.slow  # starts Ray and compiles on every replica

COMPILE_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # this session's (torch sets it): stays warm
EXPECTED = {**REPLIES, "greeter": REPLIES["english"]}  # "greeter" is a copy of "english"
ADAPTERS = list(EXPECTED)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-adapters")
    shutil.copytree(demo_adapter_paths()["english"], root / "greeter")
    shutil.copytree(demo_adapter_paths()["english"], root / "english-copy")
    config = ServeConfig(adapters={"greeter": str(root / "greeter")}, max_rank=8, device_slots=2,
                         max_num_seqs=4, max_prefill_seqs=1, allow_runtime_adapter_updates=True,
                         adapter_root=str(root), compile_cache=COMPILE_CACHE,
                         enable_auto_tool_choice=True, tool_call_parser="hermes")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_ray_app(config, replicas=2, worker_cpus=0.5), name="hotswap-test",
                  route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=180) as client:
            yield client, root
    finally:
        serve.shutdown()
        ray.shutdown()


def complete(client: httpx.Client, model: str, prompt: str = "Say hello") -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 48})


def replica_stats(client: httpx.Client) -> dict[str, dict]:
    return client.get("/stats").json()["replicas"]


def test_models_and_answers_through_the_ingress(cluster) -> None:
    client, _ = cluster
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert set(cards) == {MODEL_NAME, *ADAPTERS}
    assert all(cards[name]["parent"] == MODEL_NAME for name in ADAPTERS)
    for name in ADAPTERS:
        response = complete(client, name)
        assert response.json()["choices"][0]["text"] == " " + EXPECTED[name]
        assert response.headers["x-hotswap-replica"]
    missing = complete(client, "ghost")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_structured_output_through_the_ingress(cluster) -> None:
    """``response_format`` reaches the replica (the body crosses Ray as a dict)."""
    client, _ = cluster
    schema = {"type": "object", "properties": {"yes": {"type": "boolean"}}, "required": ["yes"],
              "additionalProperties": False}
    body = client.post("/v1/chat/completions", json={
        "model": ADAPTERS[0], "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 40,
        "temperature": 0, "response_format": {"type": "json_schema",
                                              "json_schema": {"name": "answer", "schema": schema}}}).json()
    answer = json.loads(body["choices"][0]["message"]["content"])
    assert set(answer) == {"yes"} and isinstance(answer["yes"], bool)


def test_tool_calls_through_the_ingress(cluster) -> None:
    """``tools`` reach the replica and its answer becomes calls at the ingress: required (a
    call of the schema, streamed and whole) and auto (a greeter writes no call: its text as
    content, as with tool_choice "none")."""
    client, _ = cluster
    tools = [{"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"enum": [1, 2, 3]}}, "required": ["n"],
        "additionalProperties": False}}}]
    body = {"model": ADAPTERS[0], "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 100,
            "temperature": 0, "tools": tools, "parallel_tool_calls": False}
    required = client.post("/v1/chat/completions",
                           json={**body, "tool_choice": "required"}).json()["choices"][0]
    (call,) = required["message"]["tool_calls"]
    assert required["finish_reason"] == "tool_calls" and call["function"]["name"] == "pick"
    assert json.loads(call["function"]["arguments"])["n"] in (1, 2, 3)
    arguments = ""
    with client.stream("POST", "/v1/chat/completions", json={**body, "tool_choice": "required",
                                                             "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    for delta in choice["delta"].get("tool_calls", []):
                        arguments += delta["function"]["arguments"]
    assert arguments == call["function"]["arguments"]
    auto = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    plain = client.post("/v1/chat/completions", json={**body, "tool_choice": "none"}).json()["choices"][0]
    assert "tool_calls" not in auto["message"] and "<tool_call>" not in plain["message"]["content"]
    assert auto["message"]["content"] == plain["message"]["content"] and auto["message"]["content"]


def test_responses_through_the_ingress(cluster) -> None:
    """``/v1/responses`` runs as a chat completion on a replica; the stored response (kept by
    the ingress) is continued with ``previous_response_id``."""
    client, _ = cluster
    first = client.post("/v1/responses", json={"model": ADAPTERS[0], "input": "Say hello",
                                               "max_output_tokens": 48}).json()
    assert first["status"] == "completed"
    assert first["output"][0]["content"][0]["text"] == " " + EXPECTED[ADAPTERS[0]]
    second = client.post("/v1/responses", json={"model": ADAPTERS[0], "input": "Hello", "max_output_tokens": 4,
                                                "previous_response_id": first["id"]}).json()
    assert second["usage"]["input_tokens"] > first["usage"]["input_tokens"] + first["usage"]["output_tokens"]
    assert client.get(f"/v1/responses/{second['id']}").json()["output"] == second["output"]


def test_tokenize_through_the_ingress(cluster) -> None:
    """``/tokenize`` and ``/detokenize`` are answered by a replica's tokenizer; its errors
    come back as the single-process server's."""
    client, _ = cluster
    ids = client.post("/tokenize", json={"model": ADAPTERS[0], "prompt": "hi"}).json()
    assert ids == {"count": 3, "max_model_len": 256, "tokens": [257, *b"hi"]}
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == [257, *b"user: hi\nassistant:"]
    text = client.post("/detokenize", json={"tokens": chat["tokens"]}).json()
    assert text == {"prompt": "user: hi\nassistant:"}
    missing = client.post("/tokenize", json={"model": "ghost", "prompt": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_repeated_requests_go_to_the_replica_that_holds_the_adapter(cluster) -> None:
    client, _ = cluster
    for name in ADAPTERS:
        complete(client, name)
    time.sleep(3)  # replicas report the adapters they hold to Ray's router
    for name in ADAPTERS:
        # Affinity: the repeats stay on one replica, which holds the adapter. (Which replica is
        # Ray's choice: under load the first request's replica may have evicted it meanwhile.)
        responses = [complete(client, name) for _ in range(4)]
        assert len({r.headers["x-hotswap-replica"] for r in responses}) == 1, name
        assert {r.headers["x-hotswap-adapter-resident"] for r in responses} == {"true"}


def test_concurrent_requests_match_the_single_process_reference(cluster) -> None:
    client, _ = cluster
    cases = [(model, prompt) for model in [*ADAPTERS, MODEL_NAME]
             for prompt in ("Say hello", "Once upon a time")]
    expected = {case: reference_text(None if case[0] == MODEL_NAME else
                                     ("english" if case[0] == "greeter" else case[0]), case[1])
                for case in cases}
    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(lambda case: complete(client, *case), cases))
    for case, response in zip(cases, responses):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected[case], case


def test_adapter_mixes_are_served_as_the_single_process_server_serves_them(cluster) -> None:
    """Per-request mixes through the ingress: routed by their heaviest adapter, every adapter
    they weight leased on that replica (all or none, so mixes that overlap on 2-slot replicas,
    sent together, do not wait on each other for good), each text equal to the weighted
    activation's; bad mixes answered as the single-process server answers them."""
    client, _ = cluster
    mixes = [{"english": 0.5, "pirate": 0.5}, {"french": 0.6, "english": 0.4},
             {"pirate": 0.3, "french": 0.7}]
    expected = [mix_reference_text(mix, "Say hello") for mix in mixes]
    solos = {" " + reply for reply in REPLIES.values()}
    assert not solos & set(expected) and len(set(expected)) == len(mixes)  # each mix is its own

    def mixed(case: tuple[dict[str, float], str]) -> httpx.Response:
        adapters, model = case
        return client.post("/v1/completions", json={
            "model": model, "prompt": "Say hello", "max_tokens": 48, "adapters": adapters})

    with ThreadPoolExecutor(2 * len(mixes)) as pool:
        responses = list(pool.map(mixed, [(mix, MODEL_NAME) for mix in mixes * 2]))
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected[i % len(mixes)], mixes[i % len(mixes)]
    for adapters, model, status, param in [
            ({"ghost": 1.0}, MODEL_NAME, 404, "adapters"),
            ({"english": 1.0}, "french", 400, "model"),
            ({"english": 0.4, "french": 0.3, "pirate": 0.3}, MODEL_NAME, 400, "adapters")]:
        response = mixed((adapters, model))
        assert response.status_code == status, (adapters, response.text)
        assert response.json()["error"]["param"] == param


def test_streaming_through_the_ingress(cluster) -> None:
    client, _ = cluster
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "pirate", "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 48, "stream": True}) as response:
        assert response.headers["x-hotswap-replica"]
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    import json

    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in lines)
    assert text == " " + REPLIES["pirate"]


def test_eviction_releases_the_least_recently_used_lease(cluster) -> None:
    """Each replica leases at most device_slots=2 adapters: the last two it served."""
    client, _ = cluster
    served: dict[str, list[str]] = {}
    for name in ADAPTERS * 2 + ADAPTERS[::-1]:
        replica = complete(client, name).headers["x-hotswap-replica"]
        served.setdefault(replica, []).append(name)
    time.sleep(1)  # stats are reported after each request
    stats = replica_stats(client)
    for replica, names in served.items():
        leased = {n for n, a in stats[replica]["adapters"].items() if a["leases"] > 0}
        recent = list(dict.fromkeys(reversed(names)))[:2]
        assert len(leased) <= 2
        if len(recent) == 2:
            assert leased == set(recent), (replica, names, stats[replica]["adapters"])


def test_runtime_load_and_unload_reach_every_replica(cluster) -> None:
    client, root = cluster
    response = client.post("/v1/load_lora_adapter",
                           json={"lora_name": "late", "lora_path": str(root / "english-copy")})
    assert response.status_code == 200, response.text
    assert complete(client, "late").json()["choices"][0]["text"] == " " + REPLIES["english"]
    assert client.post("/v1/load_lora_adapter", json={
        "lora_name": "late", "lora_path": str(root / "english-copy")}).status_code == 400
    assert client.post("/v1/load_lora_adapter", json={
        "lora_name": "x", "lora_path": "/etc"}).status_code == 403
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    assert complete(client, "late").status_code == 404
    with ThreadPoolExecutor(8) as pool:  # base-model requests land on both replicas
        list(pool.map(lambda _: complete(client, MODEL_NAME, "Hi"), range(16)))
    time.sleep(1)
    stats = replica_stats(client)
    assert len(stats) == 2 and all("late" not in s["adapters"] for s in stats.values())


def test_a_killed_replica_is_replaced_and_no_answer_is_wrong(cluster) -> None:
    client, _ = cluster
    names = [n for n in ray.util.list_named_actors(all_namespaces=True)
             if "HotswapWorker" in n["name"]]
    assert len(names) == 2
    victim = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
    before = set(replica_stats(client))
    results = []
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(complete, client, ADAPTERS[i % 4]) for i in range(8)]
        ray.kill(victim, no_restart=True)
        futures += [pool.submit(complete, client, ADAPTERS[i % 4]) for i in range(8)]
        results = [(ADAPTERS[i % 4], f.result()) for i, f in enumerate(futures)]
    for name, response in results:
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == " " + EXPECTED[name]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # Ray starts a replacement replica
        alive = [n for n in ray.util.list_named_actors(all_namespaces=True)
                 if "HotswapWorker" in n["name"]]
        if len(alive) == 2 and len(set(replica_stats(client)) - before) >= 1:
            break
        time.sleep(2)
    else:
        pytest.fail("no replacement replica came up")
    for name in ADAPTERS:
        assert complete(client, name).json()["choices"][0]["text"] == " " + EXPECTED[name]


def test_no_replica_recompiled(cluster) -> None:
    client, _ = cluster
    stats = replica_stats(client)
    assert stats and all(s["recompiles"] == 0 and s["compiles"] >= 1 for s in stats.values())
    # every replica compiled into ServeConfig.compile_cache (hotswap_rt.serve.compile_cache)
    assert COMPILE_CACHE
    assert {s["compile_cache"] for s in stats.values()} == {str(Path(COMPILE_CACHE).resolve())}
    metrics = client.get("/metrics").text
    assert "hotswap_replica_recompiles" in metrics and "hotswap_requests_total" in metrics
    hits = [line for line in metrics.splitlines() if line.startswith("hotswap_replica_prefix_cache_hits{")]
    assert len(hits) == len(stats)  # one per replica, as each reported it
    assert all(s["prefix_cache"]["capacity_blocks"] > 0 for s in stats.values())
    info = [line for line in metrics.splitlines() if line.startswith("hotswap_rt:lora_requests_info{")]
    assert len(info) >= 2 and all('max_lora="2"' in line for line in info)  # one per replica


def test_the_readme_serve_config_builds_an_application(monkeypatch) -> None:
    """The README's ``serve deploy`` config names a real builder whose args it accepts."""
    import importlib
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", readme, re.S).group(1))
    app = config["applications"][0]
    module, _, name = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    built = {}
    monkeypatch.setattr("hotswap_rt.serve.ray.app.build_ray_app",
                        lambda cfg, **kw: built.update(config=cfg, **kw) or "app")
    monkeypatch.setattr("hotswap_rt.serve.config.Path.is_dir", lambda self: True)
    assert builder(app["args"]) == "app"
    assert built["replicas"] == 4 and built["worker_gpus"] == 1
    assert built["config"].device_slots == 8 and built["config"].adapter_root == "/shared/adapters"


def test_the_ingress_holds_the_prompt_event_with_the_replica_until_a_token(monkeypatch) -> None:
    """A reasoning server's ``("prompt", ...)`` event (what the prompt did to the think block)
    reaches the app after the replica's, and, like it, does not count as the replica having
    answered: a replica that dies after it is retried on another (a worker handle stands in
    for the deployment)."""
    import asyncio

    from ray.exceptions import RayActorError

    from hotswap_rt.serve.protocol import ChatCompletionRequest
    from hotswap_rt.serve.ray.app import RayBackend

    attempts = []

    class Response:
        def __init__(self, dies: bool) -> None:
            self.events = [("replica", {"id": len(attempts), "resident": True}),  # replica 1, then 2
                           ("prompt", {"reasoning": "open"})]
            self.dies = dies

        def __aiter__(self):
            return self._events()

        async def _events(self):
            for event in self.events:
                yield event
            if self.dies:
                raise RayActorError()
            yield "token", {"index": 0, "text": "hm</think>hi", "logprobs": None}

        def cancel(self) -> None:
            pass

    class Worker:
        def options(self, **_):
            return self

        @property
        def generate(self):
            return self

        def remote(self, payload, chat):
            attempts.append(chat)
            return Response(dies=len(attempts) == 1)

    backend = RayBackend("m", 64, Worker(), None)
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])

    async def events():
        return [event async for event in backend.generate(body)]

    assert asyncio.run(events()) == [("replica", {"id": 2, "resident": True}),
                                     ("prompt", {"reasoning": "open"}),
                                     ("token", {"index": 0, "text": "hm</think>hi", "logprobs": None})]
    assert attempts == [True, True]

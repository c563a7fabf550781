"""The OpenAI-compatible server, end to end: a real uvicorn on 127.0.0.1, a real HTTP client.

One compiled server is shared by the module (built-in tiny model, the three demo adapters, two
device slots so three adapters cannot all run at once, runtime adapter updates allowed under a
temp root). Expected texts come from PEFT: eager greedy ``generate`` of each prompt alone,
unpadded, with that adapter loaded by PEFT (base: the plain model).
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from peft import PeftModel
from prometheus_client.parser import text_string_to_metric_families

from hotswap_rt import HotswapRuntime, RuntimeConfig
from hotswap_rt.serve import ServeConfig, build_app
from hotswap_rt.serve.background import BackgroundServer
from hotswap_rt.serve.default_model import MODEL_NAME, TARGETS, build_default_model
from hotswap_rt.serve.demo_adapters import PROMPTS, REPLIES, demo_adapter_paths
from hotswap_rt.serve.tokenizers import EOS_ID, ByteTokenizer

pytestmark = pytest.mark.slow  # compiles the engine's buckets once

TOKENIZER = ByteTokenizer()
MAX_NEW = 48


def reference_text(adapter: str | None, prompt: str) -> str:
    """Greedy text for ``prompt`` alone: PEFT with ``adapter`` (or the plain model), eager."""
    model = build_default_model()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(demo_adapter_paths()[adapter])).eval()
    ids = torch.tensor([TOKENIZER.encode(prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=TOKENIZER.pad_token_id, eos_token_id=EOS_ID)
    new = out[0, ids.shape[1]:].tolist()
    return TOKENIZER.decode(new[: new.index(EOS_ID)] if EOS_ID in new else new)


def mix_reference_text(mix: dict[str, float], prompt: str) -> str:
    """Greedy text for ``prompt`` alone with the weighted sum of the demo adapters in ``mix``:
    the runtime's weighted activation (eager, uncompiled; tested against the formula in
    ``test_compiled.py``), transformers' ``generate``."""
    rt = HotswapRuntime(build_default_model(), RuntimeConfig(TARGETS, max_rank=8, device_slots=len(mix)))
    for name in mix:
        rt.load(name, demo_adapter_paths()[name])
    rt.activate(mix)
    ids = torch.tensor([TOKENIZER.encode(prompt)])
    with torch.no_grad():
        out = rt.model.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False,
                                pad_token_id=TOKENIZER.pad_token_id, eos_token_id=EOS_ID)
    new = out[0, ids.shape[1]:].tolist()
    return TOKENIZER.decode(new[: new.index(EOS_ID)] if EOS_ID in new else new)


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-root")
    shutil.copytree(demo_adapter_paths()["english"], root / "english-copy")
    broken = root / "broken"
    shutil.copytree(demo_adapter_paths()["french"], broken)
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 0}))
    return root


@pytest.fixture(scope="module")
def server(adapter_root):
    torch._dynamo.reset()
    config = ServeConfig(max_rank=8, device_slots=2, host_slots=3, max_num_seqs=4,
                         max_prefill_seqs=2, prefill_chunk=16, max_body_bytes=4096,
                         allow_runtime_adapter_updates=True, adapter_root=str(adapter_root))
    app = build_app(config)
    with BackgroundServer(app) as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client, app.state.server


def complete(client: httpx.Client, model: str, prompt: str, **extra) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                "max_tokens": MAX_NEW, **extra})


def chat(client: httpx.Client, model: str, content: str, **extra) -> httpx.Response:
    return client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_NEW,
        **extra})


def metrics(client: httpx.Client) -> dict[str, list]:
    families = text_string_to_metric_families(client.get("/metrics").text)
    return {family.name: family.samples for family in families}


def test_models_lists_the_base_model_and_each_adapter(server) -> None:
    client, _ = server
    data = client.get("/v1/models").json()["data"]
    by_id = {card["id"]: card for card in data}
    assert by_id[MODEL_NAME]["parent"] is None
    for name in REPLIES:
        assert by_id[name]["parent"] == MODEL_NAME
        assert by_id[name]["root"] == str(demo_adapter_paths()[name])
    assert client.get("/health").status_code == 200


def test_demo_adapters_answer_in_their_own_voice(server) -> None:
    client, _ = server
    for name, reply in REPLIES.items():
        body = complete(client, name, PROMPTS[0]).json()
        assert body["choices"][0]["text"] == " " + reply
        assert body["choices"][0]["finish_reason"] == "stop"
        # every byte is a token, plus the end-of-sequence token (counted, as vLLM counts it)
        assert body["usage"]["completion_tokens"] == len((" " + reply).encode()) + 1
        message = chat(client, name, PROMPTS[1]).json()["choices"][0]["message"]
        assert message == {"role": "assistant", "content": " " + reply}


def test_concurrent_requests_for_different_adapters_get_their_own_tokens(server) -> None:
    client, state = server
    cases = [(model, prompt) for model in [*REPLIES, MODEL_NAME, "french"]
             for prompt in ("Say hello", "Once upon a time")]
    expected = {case: reference_text(None if case[0] == MODEL_NAME else case[0], case[1])
                for case in set(cases)}
    mixed_before = _mixed_batches(client)
    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(lambda case: complete(client, *case), cases))
    for case, response in zip(cases, responses):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected[case], case
    assert _mixed_batches(client) > mixed_before  # rows of different adapters shared a forward
    assert state.engine.rt.guard.recompiles == 0


def _steps(client: httpx.Client, kind: str = "decode") -> tuple[float, float]:
    """(forwards of ``kind``, those with at most one distinct adapter), from the histogram."""
    samples = [s for s in metrics(client)["hotswap_step_adapters"] if s.labels.get("kind") == kind]
    total = next(s.value for s in samples if s.name.endswith("_count"))
    one = next(s.value for s in samples if s.name.endswith("_bucket") and s.labels["le"] == "1.0")
    return total, one


def _mixed_batches(client: httpx.Client) -> float:
    """How many decode steps carried 2+ distinct adapters."""
    total, one = _steps(client)
    return total - one


def test_streaming_yields_the_same_text(server) -> None:
    client, _ = server
    for endpoint, payload, read in [
        ("/v1/completions", {"prompt": "Greet me"}, lambda c: c["text"]),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Greet me"}]},
         lambda c: c["delta"].get("content", "")),
    ]:
        lines = []
        with client.stream("POST", endpoint, json={"model": "pirate", "max_tokens": MAX_NEW,
                                                   "stream": True, **payload}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
        assert len(chunks) > 5  # token by token, not one blob
        assert "".join(read(c["choices"][0]) for c in chunks) == " " + REPLIES["pirate"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_options_include_usage(server) -> None:
    client, _ = server
    with client.stream("POST", "/v1/completions", json={
            "model": "english", "prompt": "Hello", "max_tokens": MAX_NEW, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        lines = [line for line in response.iter_lines() if line]
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == len((" " + REPLIES["english"]).encode()) + 1
    assert last["usage"]["prompt_tokens"] == len(TOKENIZER.encode("Hello"))


def test_stop_strings_and_max_tokens(server) -> None:
    client, _ = server
    body = complete(client, "english", "Say hello", stop=["!"]).json()["choices"][0]
    assert body == {"index": 0, "text": " Hello, friend", "logprobs": None, "finish_reason": "stop"}
    body = complete(client, "english", "Say hello", max_tokens=5).json()["choices"][0]
    assert body["text"] == " Hell" and body["finish_reason"] == "length"


def test_sampling_is_seeded_per_request(server) -> None:
    client, _ = server
    first = complete(client, MODEL_NAME, "Hi", temperature=1.0, seed=7, max_tokens=12).json()
    again = complete(client, MODEL_NAME, "Hi", temperature=1.0, seed=7, max_tokens=12).json()
    other = complete(client, MODEL_NAME, "Hi", temperature=1.0, seed=8, max_tokens=12).json()
    assert first["choices"][0]["text"] == again["choices"][0]["text"]
    assert first["choices"][0]["text"] != other["choices"][0]["text"]


@pytest.mark.parametrize("payload, status, param", [
    ({"model": "no-such-adapter", "prompt": "x"}, 404, "model"),
    ({"model": "english"}, 400, "prompt"),
    ({"model": "english", "prompt": "x", "max_tokens": 255}, 400, "max_tokens"),  # context: 256
    ({"model": "english", "prompt": "x" * 300}, 400, "prompt"),
    ({"model": "english", "prompt": "x", "n": 17}, 400, "n"),
    ({"model": "english", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "english", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "english", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"model": "english", "prompt": "x", "logit_bias": {"9999": 1}}, 400, "logit_bias"),
    ({"model": "english", "prompt": "x", "tools": []}, 400, "tools"),
    ({"model": "english", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"model": "english", "prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ({"model": "english", "prompt": []}, 400, "prompt"),
])
def test_bad_requests_get_vllm_errors(server, payload, status, param) -> None:
    client, _ = server
    response = client.post("/v1/completions", json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["param"] == param and error["message"]


def test_malformed_and_oversized_bodies(server) -> None:
    client, _ = server
    response = client.post("/v1/completions", content=b"{not json",
                           headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "BadRequestError"
    response = complete(client, "english", "Say hello", user="x" * 5000)
    assert response.status_code == 413
    assert complete(client, "english", "Say hello").json()["choices"][0]["text"] == " " + REPLIES["english"]


def test_bad_requests_do_not_disturb_a_batch(server) -> None:
    client, _ = server
    cases = [("english", "Say hello"), ("ghost", "Say hello"), ("french", "x" * 300),
             ("french", "Say hello")]
    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(lambda case: complete(client, *case), cases))
    assert [r.status_code for r in responses] == [200, 404, 400, 200]
    assert responses[0].json()["choices"][0]["text"] == " " + REPLIES["english"]
    assert responses[3].json()["choices"][0]["text"] == " " + REPLIES["french"]


def test_a_client_that_leaves_mid_stream_does_not_disturb_others(server) -> None:
    client, _ = server

    def leave_early() -> int:
        with client.stream("POST", "/v1/completions", json={
                "model": MODEL_NAME, "prompt": "Once", "max_tokens": MAX_NEW, "stream": True}) as r:
            for count, _ in enumerate(r.iter_lines()):
                if count == 3:
                    return count
        return -1

    with ThreadPoolExecutor(3) as pool:
        early = pool.submit(leave_early)
        others = [pool.submit(complete, client, name, "Say hello") for name in ("english", "pirate")]
        assert early.result() == 3
        for name, future in zip(("english", "pirate"), others):
            assert future.result().json()["choices"][0]["text"] == " " + REPLIES[name]


def test_load_and_unload_adapters_at_run_time(server, adapter_root, tmp_path) -> None:
    client, _ = server
    load = lambda name, path: client.post(  # noqa: E731
        "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
    response = load("english2", adapter_root / "english-copy")
    assert response.status_code == 200, response.text
    assert "english2" in {card["id"] for card in client.get("/v1/models").json()["data"]}
    assert complete(client, "english2", "Hello").json()["choices"][0]["text"] == " " + REPLIES["english"]
    assert load("english2", adapter_root / "english-copy").status_code == 400  # name taken
    assert load(MODEL_NAME, adapter_root / "english-copy").status_code == 400
    outside = tmp_path / "outside"
    shutil.copytree(demo_adapter_paths()["english"], outside)
    assert load("outsider", outside).status_code == 403
    assert load("sneaky", adapter_root / ".." / outside.name).status_code == 403
    broken = load("broken", adapter_root / "broken")
    assert broken.status_code == 400
    assert "'r' must be a positive integer" in broken.json()["error"]["message"]
    assert load("missing", adapter_root / "nope").status_code == 400
    assert "broken" not in {card["id"] for card in client.get("/v1/models").json()["data"]}
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "ghost"}).status_code == 404
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "english2"}).status_code == 200
    assert complete(client, "english2", "Hello").status_code == 404
    assert complete(client, "english", "Hello").json()["choices"][0]["text"] == " " + REPLIES["english"]


def test_adapter_updates_are_off_unless_enabled() -> None:
    app = build_app(ServeConfig(compile=False, max_rank=8))
    with BackgroundServer(app) as url, httpx.Client(base_url=url) as client:
        response = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
        assert response.status_code == 404
        assert complete(client, "french", "Hello").json()["choices"][0]["text"] == " " + REPLIES["french"]
    with pytest.raises(ValueError, match="adapter_root"):
        ServeConfig(allow_runtime_adapter_updates=True)


def test_a_cold_adapter_is_prefetched_and_others_keep_their_batches() -> None:
    """One device slot and two host rows for three adapters: one of them lives on disk only."""
    app = build_app(ServeConfig(compile=False, max_rank=8, device_slots=1, host_slots=2,
                                mixed_batches=False))
    engine = app.state.server.engine
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        on_disk = [i.name for i in engine.rt.adapters() if i.tier == "disk"]
        assert on_disk
        cases = [(name, "Hello") for name in [on_disk[0], *REPLIES, on_disk[0]]]
        with ThreadPoolExecutor(len(cases)) as pool:
            responses = list(pool.map(lambda case: complete(client, *case), cases))
        for (name, _), response in zip(cases, responses):
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == " " + REPLIES[name]
        assert on_disk[0] in engine.prefetched()  # staged in the background, not on the engine thread
        total, one = _steps(client)
        assert total > 0 and one == total  # baseline mode: one adapter at a time


def test_a_request_past_its_timeout_gets_408_and_the_server_goes_on() -> None:
    app = build_app(ServeConfig(compile=False, max_rank=8, request_timeout_s=0.05))
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        response = complete(client, "english", "Hello")
        assert response.status_code == 408 and response.json()["error"]["code"] == 408
        assert client.get("/health").status_code == 200


def test_metrics_count_what_happened_and_nothing_recompiled(server) -> None:
    client, state = server
    before = metrics(client)
    count = lambda samples, **labels: sum(  # noqa: E731
        s.value for s in samples if s.name.endswith("_total")
        and all(s.labels.get(k) == v for k, v in labels.items()))
    for _ in range(3):
        complete(client, "pirate", "Hello")
    complete(client, "ghost", "Hello")
    after = metrics(client)
    assert count(after["hotswap_requests"], model="pirate", status="200") == \
        count(before["hotswap_requests"], model="pirate", status="200") + 3
    assert count(after["hotswap_requests"], model="<unknown>", status="404") >= 1
    ttft = {s.labels.get("model"): s.value for s in after["hotswap_time_to_first_token_seconds"]
            if s.name.endswith("_count")}
    assert ttft["pirate"] >= 3
    assert [s.value for s in after["hotswap_recompiles"]] == [0.0]
    assert {s.labels["state"]: s.value for s in after["hotswap_compile_state"]} == \
        {"off": 0.0, "compiling": 0.0, "compiled": 1.0, "failed": 0.0}
    tiers = {s.labels["tier"]: s.value for s in after["hotswap_adapters_resident"]}
    assert sum(tiers.values()) == len(state.adapter_names()) and tiers["device"] <= 2
    assert any(s.labels["tier"] == "host" for s in after["hotswap_swap_latency_seconds"])
    info = after["hotswap_rt:lora_requests_info"][0]
    assert info.labels["max_lora"] == "2" and "running_lora_adapters" in info.labels
    assert state.engine.rt.guard.recompiles == 0 and state.engine.rt.guard.compiles >= 1


def test_the_readme_curl_examples(server) -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Serving over HTTP", 1)[1].split("\n## ", 1)[0]
    calls = re.findall(r"curl -s localhost:8000(\S+) .*?-d '(.*?)'", section, re.S)
    assert len(calls) == 4  # the third (tool calling) runs in test_tools.py, the fourth in test_responses.py
    client, _ = server
    (path, payload), (chat_path, chat_payload) = calls[:2]
    assert client.post(path, json=json.loads(payload)).json()["choices"][0]["text"] == \
        " " + REPLIES["french"]
    assert "# {\"choices\": [{\"text\": \" " + REPLIES["french"] in section
    with client.stream("POST", chat_path, json=json.loads(chat_payload)) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == " " + REPLIES["pirate"]


def test_rows_wait_for_a_slot_while_others_run() -> None:
    """Both device slots pinned by others: a request for a third adapter waits (rows of the
    pinned adapters still run) and is served once a slot is unpinned."""
    app = build_app(ServeConfig(compile=False, max_rank=8, device_slots=2, host_slots=4))
    rt = app.state.server.engine.rt
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        rt.pin("english")
        rt.pin("french")
        with ThreadPoolExecutor(2) as pool:
            waiting = pool.submit(complete, client, "pirate", "Hello")
            served = complete(client, "english", "Hello")
            assert served.json()["choices"][0]["text"] == " " + REPLIES["english"]
            assert not waiting.done()
            rt.unpin("french")
            assert waiting.result().json()["choices"][0]["text"] == " " + REPLIES["pirate"]


def byte_level_tokenizer():
    """A real fast tokenizer for a saved model directory: byte-level BPE without merges, plus
    ``<s>``, ``</s>``, ``<pad>``; returns it and its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({"<s>": len(vocab), "</s>": len(vocab) + 1, "<pad>": len(vocab) + 2})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    return tokenizer, vocab


def test_a_local_model_directory_with_its_own_tokenizer(tmp_path) -> None:
    """``--model DIR``: a saved transformers model and fast tokenizer, a PEFT adapter; the
    server's greedy text equals PEFT's for the same prompt."""
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from hotswap_rt.serve.model import sampling_defaults

    tokenizer, vocab = byte_level_tokenizer()
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"])).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tokenizer("Hello there")["input_ids"]])
    with torch.no_grad():
        out = peft_model.eval().generate(input_ids=ids, max_new_tokens=8, do_sample=False,
                                         pad_token_id=vocab["<pad>"])
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    app = build_app(ServeConfig(model=str(tmp_path / "model"), compile=False, max_rank=8,
                                adapters={"mine": str(tmp_path / "adapter")}))
    served = app.state.server.served  # vLLM's defaults: 1.0 unless the generation config says
    assert (served.default_temperature, served.default_top_p, served.default_top_k) == (1.0, 1.0, 0)
    assert sampling_defaults(GenerationConfig(do_sample=True, temperature=0.6, top_k=20)) == {
        "default_temperature": 0.6, "default_top_k": 20}  # the others keep Served's
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
        assert cards["mine"]["parent"] == str(tmp_path / "model")
        body = complete(client, "mine", "Hello there", max_tokens=8, temperature=0).json()
        assert body["choices"][0]["text"] == expected
        assert body["usage"]["prompt_tokens"] == ids.shape[1]
        base = complete(client, str(tmp_path / "model"), "Hello there", max_tokens=8, temperature=0).json()
        assert base["choices"][0]["text"] != expected  # the adapter changes the answer


def test_the_generation_configs_sampling_defaults_are_vllms() -> None:
    """As vLLM's ``--generation-config auto``: temperature, top_p, top_k, min_p, the three
    penalties and ``max_new_tokens`` (the default ``max_tokens``, cut to the context) where the
    model's generation config sets them; a request's own values win."""
    from transformers import GenerationConfig

    from hotswap_rt.serve.backend import sampling_of
    from hotswap_rt.serve.model import sampling_defaults
    from hotswap_rt.serve.protocol import CompletionRequest

    config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, min_p=0.05,
                              repetition_penalty=1.05, max_new_tokens=5)
    assert sampling_defaults(config) == {
        "default_temperature": 0.7, "default_top_p": 0.8, "default_top_k": 20, "default_min_p": 0.05,
        "default_repetition_penalty": 1.05, "default_max_tokens": 5}
    assert sampling_defaults(GenerationConfig()) == {} and sampling_defaults(None) == {}
    app = build_app(ServeConfig(compile=False, max_rank=8, max_model_len=40))
    served = app.state.server.served
    for name, value in sampling_defaults(config).items():
        setattr(served, name, value)
    served.default_presence_penalty, served.default_frequency_penalty = 0.25, 0.5
    params = sampling_of(CompletionRequest(model=MODEL_NAME, prompt="Hi"), served)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty,
            params.presence_penalty, params.frequency_penalty) == (0.7, 0.8, 20, 0.05, 1.05, 0.25, 0.5)
    own = sampling_of(CompletionRequest(model=MODEL_NAME, prompt="Hi", temperature=0.0, top_k=0,
                                        repetition_penalty=1.0, presence_penalty=0.0), served)
    assert (own.temperature, own.top_k, own.repetition_penalty, own.presence_penalty) == (0.0, 0, 1.0, 0.0)
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        def tokens(**extra) -> tuple[int, int, str]:
            body = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hello",
                                                        "ignore_eos": True, **extra}).json()
            usage = body["usage"]
            return usage["prompt_tokens"], usage["completion_tokens"], body["choices"][0]["finish_reason"]

        assert tokens()[1:] == (5, "length")  # the generation config's max_new_tokens
        assert tokens(max_tokens=2)[1:] == (2, "length")
        served.default_max_tokens = 1000  # more than the context holds: cut, not refused
        prompt, generated, _ = tokens()
        assert prompt + generated == 40
        assert client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hello",
                                                     "max_tokens": 1000}).status_code == 400


def test_moe_expert_lora_and_dora_served_side_by_side(tmp_path) -> None:
    """``--target-parameters`` and ``--scale-vectors`` (parsed from the CLI): a tiny Qwen3-MoE
    served with an expert-LoRA adapter and a DoRA adapter; concurrent requests for both and
    the base (so they share steps) each give PEFT's greedy text."""
    import argparse

    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from hotswap_rt.serve.cli import add_arguments, config_from_args

    tokenizer, vocab = byte_level_tokenizer()
    torch.manual_seed(4)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2, eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"])).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    configs = {"experts": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=experts,
                                     init_lora_weights=False),
               "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                                  init_lora_weights=False)}
    ids = torch.tensor([tokenizer("Hello there")["input_ids"]])
    expected = {}
    for name, lora in configs.items():
        torch.manual_seed(5)
        peft_model = get_peft_model(Qwen3MoeForCausalLM.from_pretrained(tmp_path / "model").eval(), lora)
        peft_model.save_pretrained(tmp_path / name)
        with torch.no_grad():
            out = peft_model.eval().generate(input_ids=ids, max_new_tokens=8, do_sample=False,
                                             pad_token_id=vocab["<pad>"])
        expected[name] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args([
        "--model", str(tmp_path / "model"), "--adapter", f"experts={tmp_path / 'experts'}",
        "--adapter", f"dora={tmp_path / 'dora'}", "--target-parameters", *experts, "--scale-vectors",
        "--max-rank", "8", "--no-compile"]))
    assert config.target_parameters == tuple(experts) and config.scale_vectors
    app = build_app(config)
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as client, \
            ThreadPoolExecutor(3) as pool:
        names = ["experts", "dora", str(tmp_path / "model")]
        futures = {name: pool.submit(complete, client, name, "Hello there", max_tokens=8, temperature=0)
                   for name in names}
        texts = {name: future.result().json()["choices"][0]["text"] for name, future in futures.items()}
    assert texts["experts"] == expected["experts"] and texts["dora"] == expected["dora"]
    assert texts[names[2]] not in (expected["experts"], expected["dora"])


def test_stacked_mixes_serve_requests_mixing_more_than_the_per_row_limit() -> None:
    """``--stacked-mixes`` with one adapter per row: a request mixing two adapters is served
    (its steps run the stacked product) with the text a per-row server (two per row) gives it,
    next to single-adapter requests; without the flag it is a 400."""
    mix = {"english": 0.5, "pirate": 0.5}
    texts = {}
    for stacked in (True, False):
        config = ServeConfig(compile=False, max_rank=8, device_slots=3, stacked_mixes=stacked,
                             max_adapters_per_request=1 if stacked else 2)
        with BackgroundServer(build_app(config)) as url, httpx.Client(base_url=url, timeout=60) as client, \
                ThreadPoolExecutor(2) as pool:
            mixed = pool.submit(complete, client, MODEL_NAME, "Hello", adapters=mix, temperature=0)
            single = pool.submit(complete, client, "french", "Hello", temperature=0)
            assert single.result().json()["choices"][0]["text"] == " " + REPLIES["french"]
            texts[stacked] = mixed.result().json()["choices"][0]["text"]
    assert texts[True] == texts[False]
    assert texts[True] not in (" " + REPLIES["english"], " " + REPLIES["pirate"])  # a mix, not one
    refusing = ServeConfig(compile=False, max_rank=8, device_slots=3, max_adapters_per_request=1)
    with BackgroundServer(build_app(refusing)) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert complete(client, MODEL_NAME, "Hello", adapters=mix).status_code == 400
    with pytest.raises(ValueError, match="stacked_mixes"):
        ServeConfig(device_slots=2, max_adapters_per_request=2, stacked_mixes=True)


def test_no_map_adapter_files_reads_adapter_files_into_memory(mapped_reads) -> None:
    """``--no-map-adapter-files`` (parsed from the CLI) reaches the runtime: the start-up
    adapters are read into memory, not mapped (by default they are mapped), and are served the
    same."""
    import argparse

    from hotswap_rt.serve.cli import add_arguments, config_from_args

    mapped = mapped_reads
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    texts = {}
    for flags in ([], ["--no-map-adapter-files"]):
        config = config_from_args(parser.parse_args(["--no-compile", "--max-rank", "8", *flags]))
        assert config.map_adapter_files == (not flags)
        before = len(mapped)
        with BackgroundServer(build_app(config)) as url, httpx.Client(base_url=url, timeout=60) as client:
            texts[bool(flags)] = complete(client, "pirate", "Hello", temperature=0).json()["choices"][0]["text"]
        assert (len(mapped) > before) == (not flags)
    assert texts[False] == texts[True] == " " + REPLIES["pirate"]


def test_prefix_cache_tokens_from_the_command_line_sizes_or_turns_off_the_cache() -> None:
    import argparse

    from hotswap_rt.serve.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    prompt = "Hello there, a prompt long enough for two blocks of the cache"
    for flags, capacity in ((["--prefix-cache-tokens", "64"], 4), (["--prefix-cache-tokens", "0"], None)):
        config = config_from_args(parser.parse_args(["--no-compile", "--max-rank", "8", *flags]))
        app = build_app(config)
        with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            texts, cached = [], []
            for _ in range(2):
                body = complete(client, "pirate", prompt, temperature=0, max_tokens=8).json()
                texts.append(body["choices"][0]["text"])
                cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
            stats = client.get("/stats").json()["prefix_cache"]
        if capacity is None:
            assert stats is None and cached == [0, 0]
        else:
            assert stats["capacity_blocks"] == capacity and cached[0] == 0 and cached[1] > 0
        assert texts[0] == texts[1]
    with pytest.raises(ValueError, match="prefix_cache_tokens"):
        ServeConfig(prefix_cache_tokens=-1)


def test_a_chats_next_turns_reuse_the_earlier_turns_kv() -> None:
    """Each turn resends the conversation: its earlier turns' KV (prompt and reply) comes from
    the prefix cache, and every reply is what a server without the cache gives."""
    replies, cached = {}, {}
    for tokens in (None, 0):
        config = ServeConfig(compile=False, max_rank=8, prefix_cache_tokens=tokens)
        with BackgroundServer(build_app(config)) as url, httpx.Client(base_url=url, timeout=60) as client:
            messages = [{"role": "system", "content": "You answer briefly, in the adapter's language."},
                        {"role": "user", "content": "Say hello to everyone in the room"}]
            replies[tokens], cached[tokens] = [], []
            for turn in range(3):
                body = chat(client, "english", "", messages=messages, max_tokens=12, temperature=0).json()
                text = body["choices"][0]["message"]["content"]
                replies[tokens].append(text)
                cached[tokens].append((body["usage"]["prompt_tokens"],
                                       body["usage"]["prompt_tokens_details"]["cached_tokens"]))
                messages += [{"role": "assistant", "content": text},
                             {"role": "user", "content": f"Again ({turn})"}]
    assert replies[None] == replies[0]
    assert [c for _, c in cached[0]] == [0, 0, 0]
    (prompt1, zero), (prompt2, second), (_, third) = cached[None]
    # at least every whole block of the previous turn's prompt (its reply's blocks are kept too,
    # but the chat template may render the reply's end differently from how it was generated)
    assert zero == 0 and second >= (prompt1 - 1) // 16 * 16 > 0
    assert third >= (prompt2 - 1) // 16 * 16 > second

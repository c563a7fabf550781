"""The server as clients use it: the official ``openai`` client over a real loopback socket.

One compiled server (built-in tiny model, the three demo adapters) with API keys. References
come from outside the server: the demo adapters' trained replies (greedy), the model's own
logits through PEFT for log-probabilities, and the runtime's weighted activation (eager, with
transformers' ``generate``) for adapter mixes.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from peft import PeftModel

from hotswap_rt.serve import ServeConfig, build_app
from hotswap_rt.serve.background import BackgroundServer
from hotswap_rt.serve.default_model import MODEL_NAME, build_default_model
from hotswap_rt.serve.demo_adapters import REPLIES, demo_adapter_paths
from hotswap_rt.serve.tokenizers import ByteTokenizer

from .test_serve import mix_reference_text

pytestmark = pytest.mark.slow  # compiles the engine's buckets once
KEY, ADMIN = "sk-test-key", "sk-admin-key"
TOKENIZER = ByteTokenizer()
PROMPT = "Say hello"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    torch._dynamo.reset()
    root = tmp_path_factory.mktemp("root")
    config = ServeConfig(max_rank=8, device_slots=3, max_num_seqs=4, max_prefill_seqs=2,
                         prefill_chunk=16, api_keys=(KEY,), admin_api_keys=(ADMIN,),
                         allow_runtime_adapter_updates=True, adapter_root=str(root))
    with BackgroundServer(build_app(config)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        yield client, url, root


def solo(name: str) -> str:
    return " " + REPLIES[name]


def complete(client: openai.OpenAI, model: str = "english", prompt=PROMPT, max_tokens: int = 48, **extra):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, **extra)


@pytest.mark.parametrize("bad, status", [
    ({"temperature": 1e-50}, 200),  # handled: greedy
    ({"temperature": 0.7, "seed": 2**64 + 1}, 200),  # handled: folded into 64 bits
    ({"top_p": 0.0}, 400), ({"logit_bias": {"99999": 5}}, 400), ({"min_tokens": 99}, 400),
])
def test_a_hostile_request_never_disturbs_the_three_next_to_it(server, bad, status) -> None:
    client, _, _ = server

    def run(case):
        if case is None:
            return complete(client, "french").choices[0].text
        try:
            return complete(client, "pirate", extra_body=case).choices[0].finish_reason
        except openai.BadRequestError as exc:
            return exc.status_code

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, [None, bad, None, None]))
    assert results[0] == results[2] == results[3] == solo("french")
    assert (results[1] == 400) if status == 400 else results[1] in ("stop", "length")


def test_keys_are_required_on_v1_and_admin_keys_on_updates(server) -> None:
    client, url, root = server
    anonymous = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as error:
        anonymous.models.list()
    assert error.value.status_code == 401 and error.value.body["type"] == "AuthenticationError"
    assert httpx.get(f"{url}/health").status_code == 200  # open
    assert httpx.get(f"{url}/metrics").status_code == 200
    assert httpx.get(f"{url}/stats").status_code == 401
    assert {m.id for m in client.models.list().data} >= {MODEL_NAME, *REPLIES}
    shutil.copytree(demo_adapter_paths()["english"], root / "copy")
    body = {"lora_name": "copy", "lora_path": str(root / "copy")}
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=body,
                      headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    assert complete(client, "copy").choices[0].text == solo("english")


def test_a_symlinked_file_cannot_escape_the_adapter_root(server, tmp_path) -> None:
    _, url, root = server
    outside = tmp_path / "outside"
    shutil.copytree(demo_adapter_paths()["french"], outside)
    inside = root / "sneaky"
    inside.mkdir()
    shutil.copy(outside / "adapter_config.json", inside / "adapter_config.json")
    os.symlink(outside / "adapter_model.safetensors", inside / "adapter_model.safetensors")
    response = httpx.post(f"{url}/v1/load_lora_adapter", json={
        "lora_name": "sneaky", "lora_path": str(inside)}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 403 and "adapter_model.safetensors" in response.json()["error"]["message"]


@pytest.mark.parametrize("field, value", [
    ("functions", [{"name": "f", "parameters": {}}]),  # OpenAI's old form of tools
    ("function_call", "auto"), ("user", "me"), ("best_of", 2),
])
def test_parameters_the_server_does_not_implement_are_named(server, field, value) -> None:
    client, _, _ = server
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="english", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, extra_body={field: value})
    assert error.value.body["param"] == field


def test_n_choices_differ_and_each_is_reproducible(server) -> None:
    client, _, _ = server
    first = complete(client, MODEL_NAME, "Once", n=3, temperature=1.0, seed=11, max_tokens=12)
    again = complete(client, MODEL_NAME, "Once", n=3, temperature=1.0, seed=11, max_tokens=12)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in again.choices] and len(set(texts)) == 3
    assert first.usage.prompt_tokens == len(TOKENIZER.encode("Once"))  # once, not per choice


def test_prompt_lists_give_one_choice_each_in_order(server) -> None:
    client, _, _ = server
    ids = TOKENIZER.encode(PROMPT)
    out = complete(client, "pirate", [PROMPT, "Once upon a time", PROMPT], temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.choices[0].text == out.choices[2].text == solo("pirate")
    assert complete(client, "pirate", ids, temperature=0).choices[0].text == solo("pirate")
    assert complete(client, "pirate", [ids, ids], temperature=0).choices[1].text == solo("pirate")


def test_echo_returns_the_prompt_first(server) -> None:
    client, _, _ = server
    assert complete(client, "english", echo=True, temperature=0).choices[0].text == PROMPT + solo("english")


def _model_logprobs(adapter: str, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    model = PeftModel.from_pretrained(build_default_model(), str(demo_adapter_paths()[adapter])).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0, len(prompt_ids) - 1:-1]
    return torch.log_softmax(logits.float(), dim=-1)


def test_completion_logprobs_are_the_models(server) -> None:
    client, _, _ = server
    out = complete(client, "french", max_tokens=6, temperature=0, logprobs=3).choices[0]
    generated = list(out.text.encode())
    expected = _model_logprobs("french", TOKENIZER.encode(PROMPT), generated)
    assert out.logprobs.tokens == [TOKENIZER.decode([b]) for b in generated]
    for step, token in enumerate(generated):
        assert abs(out.logprobs.token_logprobs[step] - expected[step, token].item()) <= 1e-4
        top = expected[step].topk(3)
        alternatives = out.logprobs.top_logprobs[step]  # a dict: equal token strings merge
        assert set(alternatives) == {TOKENIZER.decode([t]) for t in top.indices.tolist()}
        for token, logprob in zip(top.indices.tolist(), top.values.tolist()):
            if list(TOKENIZER.decode([token]).encode()) == [token]:  # a whole character
                assert abs(alternatives[chr(token)] - logprob) <= 1e-4


def test_chat_logprobs_and_content_parts(server) -> None:
    client, _, _ = server
    messages = [{"role": "developer", "content": "Be nice."},
                {"role": "user", "content": [{"type": "text", "text": "Say "},
                                             {"type": "text", "text": "hello"}]}]
    out = client.chat.completions.create(model="english", messages=messages, max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=2).choices[0]
    plain = client.chat.completions.create(model="english", max_tokens=5, temperature=0, messages=[
        {"role": "system", "content": "Be nice."}, {"role": "user", "content": "Say hello"}]).choices[0]
    assert out.message.content == plain.message.content  # developer = system; parts joined
    prompt = TOKENIZER.encode(TOKENIZER.chat_prompt(
        [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Say hello"}]))
    expected = _model_logprobs("english", prompt, list(out.message.content.encode()))
    for step, item in enumerate(out.logprobs.content):
        assert abs(item.logprob - expected[step, ord(item.token)].item()) <= 1e-4
        assert len(item.top_logprobs) == 2


def test_per_request_adapter_mixes(server) -> None:
    client, _, _ = server
    one = complete(client, MODEL_NAME, temperature=0, extra_body={"adapters": {"french": 1.0}})
    assert one.choices[0].text == solo("french")  # {"a": 1.0} is model "a"
    mix = {"english": 0.5, "pirate": 0.5}
    served = complete(client, MODEL_NAME, temperature=0, extra_body={"adapters": mix}).choices[0].text
    assert served == mix_reference_text(mix, PROMPT)
    with pytest.raises(openai.NotFoundError):
        complete(client, MODEL_NAME, extra_body={"adapters": {"ghost": 1.0}})
    with pytest.raises(openai.BadRequestError):
        complete(client, "english", extra_body={"adapters": {"french": 1.0}})


def test_max_tokens_defaults_to_the_rest_of_the_context(server) -> None:
    client, _, _ = server
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 256 - len(TOKENIZER.encode(PROMPT))
    assert out.choices[0].finish_reason == "length"


def test_request_ids_and_openai_shaped_404(server) -> None:
    _, url, _ = server
    headers = {"Authorization": f"Bearer {KEY}", "x-request-id": "abc-123"}
    response = httpx.post(f"{url}/v1/completions", headers=headers, json={
        "model": "english", "prompt": PROMPT, "max_tokens": 2})
    assert response.headers["x-request-id"] == "abc-123"
    assert httpx.get(f"{url}/health").headers["x-request-id"]
    missing = httpx.get(f"{url}/v1/nothing", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"


def test_streaming_n_and_usage_with_the_client(server) -> None:
    client, _, _ = server
    stream = client.completions.create(model="english", prompt=[PROMPT, PROMPT], max_tokens=48,
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
        usage = chunk.usage or usage
    assert texts == {0: solo("english"), 1: solo("english")}
    assert usage.prompt_tokens == 2 * len(TOKENIZER.encode(PROMPT))
    assert json.loads(json.dumps(usage.model_dump()))["completion_tokens"] == 2 * (len(solo("english")) + 1)


def test_a_repeated_prompt_prefix_comes_from_the_prefix_cache(server) -> None:
    client, url, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    before = httpx.get(f"{url}/stats", headers=auth).json()["prefix_cache"]
    prompt = "A long shared instruction that every request of this test begins with: "
    length = len(TOKENIZER.encode(prompt + "hi"))
    first = complete(client, "pirate", prompt=prompt + "hi", max_tokens=12, temperature=0)
    second = complete(client, "pirate", prompt=prompt + "hi", max_tokens=12, temperature=0)
    other = complete(client, "french", prompt=prompt + "hi", max_tokens=12, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == (length - 1) // 16 * 16 > 0
    assert other.usage.prompt_tokens_details.cached_tokens == 0  # another adapter's KV differs
    assert second.choices[0].text == first.choices[0].text
    after = httpx.get(f"{url}/stats", headers=auth).json()["prefix_cache"]
    assert after["hit"] - before["hit"] == (length - 1) // 16 * 16
    assert after["block_tokens"] == 16 and after["capacity_blocks"] > 0
    metrics = httpx.get(f"{url}/metrics").text
    hits = [line for line in metrics.splitlines() if line.startswith("hotswap_prefix_cache_hits_total ")]
    assert hits and float(hits[0].split()[1]) == after["hit"]


def test_a_cache_salt_keeps_prefix_cache_hits_within_its_tenant(server) -> None:
    client, _, _ = server
    prompt = "Another long shared instruction, salted per tenant, that these requests begin with: "
    length = len(TOKENIZER.encode(prompt + "ok"))

    def cached(salt):
        extra = {} if salt is None else {"extra_body": {"cache_salt": salt}}
        out = complete(client, "english", prompt=prompt + "ok", max_tokens=4, temperature=0, **extra)
        return out.usage.prompt_tokens_details.cached_tokens

    assert [cached(s) for s in ("tenant-a", "tenant-a", "tenant-b", None, None)] == [
        0, (length - 1) // 16 * 16, 0, 0, (length - 1) // 16 * 16]
    with pytest.raises(openai.BadRequestError) as error:
        complete(client, "english", extra_body={"cache_salt": ""})
    assert "cache_salt" in str(error.value)


def test_response_format_json_schema_with_the_client(server) -> None:
    """A compiled server constrains the output to the schema (the sampler masks, the graphs
    are the same: nothing recompiles)."""
    client, url, _ = server
    schema = {"type": "object", "properties": {"lang": {"enum": ["en", "fr", "pirate"]},
                                               "loud": {"type": "boolean"}},
              "required": ["lang", "loud"], "additionalProperties": False}
    for model in ("english", "pirate"):
        out = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello"}], max_tokens=60, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "greeting", "schema": schema}})
        answer = json.loads(out.choices[0].message.content)
        assert set(answer) == {"lang", "loud"} and answer["lang"] in ("en", "fr", "pirate")
        assert isinstance(answer["loud"], bool) and out.choices[0].finish_reason == "stop"
    stats = httpx.get(f"{url}/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert stats["recompiles"] == 0

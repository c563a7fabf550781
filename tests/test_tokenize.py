"""vLLM's ``/tokenize`` and ``/detokenize``, and the chat fields that shape a prompt
(``add_generation_prompt``, ``continue_final_message``), on an eager server of the built-in
model with an API key. References: the byte tokenizer's documented format written out by hand
(``<bos>``, then ``role: content`` lines), the usage a chat completion reports, and the demo
adapters' trained replies (an open assistant message is continued with the rest of it).
"""

from __future__ import annotations

import httpx
import pytest

from hotswap_rt.serve import ServeConfig, build_app
from hotswap_rt.serve.background import BackgroundServer
from hotswap_rt.serve.demo_adapters import REPLIES
from hotswap_rt.serve.tokenizers import BOS_ID

KEY = "sk-tokenize"
HELLO = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def client():
    with BackgroundServer(build_app(ServeConfig(compile=False, max_rank=8, api_keys=(KEY,)))) as url, \
            httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
        yield http


def test_tokenize_gives_the_ids_the_model_is_given(client) -> None:
    prompt = client.post("/tokenize", json={"model": "english", "prompt": "héllo"}).json()
    assert prompt == {"count": 7, "max_model_len": 256, "tokens": [BOS_ID, *"héllo".encode()]}
    bare = client.post("/tokenize", json={"prompt": "héllo", "add_special_tokens": False}).json()
    assert bare["tokens"] == list("héllo".encode())
    chat = client.post("/tokenize", json={"model": "english", "messages": HELLO}).json()
    assert chat["tokens"] == [BOS_ID, *b"user: Say hello\nassistant:"]
    answer = client.post("/v1/chat/completions", json={"model": "english", "messages": HELLO,
                                                       "max_tokens": 4}).json()
    assert answer["usage"]["prompt_tokens"] == chat["count"]
    open_turn = client.post("/tokenize", json={"messages": HELLO, "add_generation_prompt": False}).json()
    assert open_turn["tokens"] == [BOS_ID, *b"user: Say hello"]
    text = client.post("/detokenize", json={"model": "english", "tokens": chat["tokens"]}).json()
    assert text == {"prompt": "user: Say hello\nassistant:"}  # the special <bos> is not text


def test_an_open_assistant_message_is_continued(client) -> None:
    reply = REPLIES["english"]  # "Hello, friend! Nice to meet you."
    cut = reply.index("fri") + 3
    messages = [*HELLO, {"role": "assistant", "content": reply[:cut]}]
    body = {"model": "english", "messages": messages, "add_generation_prompt": False,
            "continue_final_message": True, "max_tokens": 40, "temperature": 0}
    answer = client.post("/v1/chat/completions", json=body).json()
    assert answer["choices"][0]["message"]["content"] == reply[cut:]
    ids = client.post("/tokenize", json={k: body[k] for k in ("messages", "add_generation_prompt",
                                                              "continue_final_message")}).json()["tokens"]
    assert ids == [BOS_ID, *f"user: Say hello\nassistant: {reply[:cut]}".encode()]


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", {"model": "english", "messages": HELLO, "continue_final_message": True}, 400,
     "continue_final_message"),  # add_generation_prompt is true by default
    ("/tokenize", {"messages": HELLO, "continue_final_message": True, "add_generation_prompt": False}, 400,
     "continue_final_message"),  # the last message is the user's
    ("/tokenize", {"model": "ghost", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"prompt": "x", "return_token_strs": True}, 400, "return_token_strs"),
    ("/tokenize", {"messages": HELLO, "chat_template_kwargs": {"x": 1}}, 400, "chat_template_kwargs"),
    ("/detokenize", {"tokens": [65, 99999]}, 400, "tokens"),
    ("/detokenize", {"model": "ghost", "tokens": [65]}, 404, "model"),
])
def test_bad_requests_are_errors_naming_the_field(client, path, body, status, param) -> None:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_version_is_the_packages(client) -> None:
    import hotswap_rt

    assert httpx.get(f"{client.base_url}/version").json() == {"version": hotswap_rt.__version__}


def test_the_tokenizer_routes_need_the_key(client) -> None:
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [65]})):
        assert httpx.post(f"{client.base_url}{path}", json=body).status_code == 401
        assert client.post(path, json=body).status_code == 200

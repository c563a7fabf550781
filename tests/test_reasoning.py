"""Reasoning output (``--reasoning-parser``): a ``<think>`` block goes to ``message.reasoning``.

The split is checked on its own (both parsers; every way of cutting a text into stream pieces
gives what the whole text gives; with tools, calls are read from the content only), then on
eager servers of the built-in model with the ``openai`` client and httpx: the demo adapters
answer without a think block, so their trained reply must come back as content (``qwen3``) or
as reasoning (``deepseek_r1``, whose template opens the block), streamed and whole.
"""

from __future__ import annotations

import json
import random

import httpx
import openai
import pytest

from hotswap_rt.serve import ServeConfig, build_app
from hotswap_rt.serve.answers import AnswerStream, answer_message
from hotswap_rt.serve.background import BackgroundServer
from hotswap_rt.serve.demo_adapters import REPLIES, WEATHER_TOOLS, weather_call
from hotswap_rt.serve.protocol import ChatCompletionRequest
from hotswap_rt.serve.tools import tool_plan

CASES = [  # parser, text -> reasoning, content
    ("deepseek_r1", "<think>plan it</think>\n\nHello", "plan it", "Hello"),
    ("deepseek_r1", "plan it</think>Hello </think>", "plan it", "Hello </think>"),
    ("deepseek_r1", "only thoughts, never closed", "only thoughts, never closed", ""),
    ("deepseek_r1", "<thi", "<thi", ""),
    ("deepseek_r1", "</think>  \n", "", ""),
    ("qwen3", "<think>plan it</think>\n\nHello", "plan it", "Hello"),
    ("qwen3", "Hello </think> there", "", "Hello </think> there"),
    ("qwen3", "<think>never closed", "never closed", ""),
    ("qwen3", "<thi", "", "<thi"),
    ("qwen3", " <think>not at the start</think>", "", " <think>not at the start</think>"),
]


def joined(stream: AnswerStream, text: str, cuts: list[int]) -> tuple[str, str]:
    deltas = []
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        deltas += stream.feed(text[start:end])
    deltas += stream.finish("stop")[0]
    assert all(len(d) == 1 and next(iter(d.values())) for d in deltas)  # one non-empty field each
    return "".join(d.get("reasoning", "") for d in deltas), "".join(d.get("content", "") for d in deltas)


@pytest.mark.parametrize("parser, text, reasoning, content", CASES)
def test_the_split_is_the_same_whole_and_however_the_stream_cuts_it(parser, text, reasoning, content) -> None:
    message, reason = answer_message(text, "stop", reasoning=parser)
    assert (message.get("reasoning", ""), message["content"]) == (reasoning, content) and reason == "stop"
    rng = random.Random(len(text))
    cuttings = [list(range(1, len(text)))] + [sorted(rng.sample(range(1, len(text)), min(len(text) - 1, k)))
                                              for k in (1, 2, 5) for _ in range(4)]
    for cuts in cuttings:
        assert joined(AnswerStream(parser, None), text, cuts) == (reasoning, content), cuts
    hidden, _ = answer_message(text, "stop", reasoning=parser, include_reasoning=False)
    assert "reasoning" not in hidden and hidden["content"] == content


def test_tool_calls_are_read_from_the_content_only() -> None:
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=WEATHER_TOOLS)
    auto = tool_plan(body, "hermes")
    text = "<think>I could call " + weather_call("Oslo") + " but</think>\n" + weather_call("Paris")
    message, reason = answer_message(text, "stop", auto, "qwen3")
    assert message["reasoning"] == "I could call " + weather_call("Oslo") + " but"  # not a call: reasoning
    assert message["content"] is None and reason == "tool_calls"
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [{"city": "Paris"}]
    for cuts in ([5, 40, 90], list(range(1, len(text), 7))):
        stream, calls = AnswerStream("qwen3", auto), []
        for start, end in zip([0, *cuts], [*cuts, len(text)]):
            calls += [d for d in stream.feed(text[start:end]) if "tool_calls" in d]
        calls += [d for d in stream.finish("stop")[0] if "tool_calls" in d]
        assert [json.loads(d["tool_calls"][0]["function"]["arguments"]) for d in calls] == [{"city": "Paris"}]


def test_a_transformers_template_gets_its_variables_and_the_reasoning_back() -> None:
    """``chat_template_kwargs`` reach the template (Qwen3's ``enable_thinking``), an earlier
    answer's ``reasoning`` goes back as ``reasoning_content``, and ``<think>`` tags a
    vocabulary holds as special tokens survive decoding."""
    from hotswap_rt.serve.protocol import ChatMessage
    from hotswap_rt.serve.tokenizers import HFTokenizer

    from .test_structured import trained_tokenizer

    hf = trained_tokenizer("byte-level")
    hf.add_tokens(["<think>", "</think>"], special_tokens=True)
    hf.chat_template = ("{% for m in messages %}{{ m.role }}:"
                        "{% if m.reasoning_content %}[{{ m.reasoning_content }}]{% endif %}"
                        "{{ m.content }};{% endfor %}"
                        "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")
    tokenizer = HFTokenizer(hf)
    messages = [ChatMessage(role="user", content="hi").rendered(),
                ChatMessage(role="assistant", content="yes", reasoning="why").rendered()]
    assert tokenizer.chat_prompt(messages) == "user:hi;assistant:[why]yes;"
    assert tokenizer.chat_prompt(messages, None, {"enable_thinking": False}).endswith("<think></think>")
    ids = tokenizer.encode("<think>a plan</think>done")
    assert tokenizer.decode(ids) == "<think>a plan</think>done"
    assert answer_message(tokenizer.decode(ids), "stop", reasoning="qwen3")[0] == {
        "role": "assistant", "content": "done", "reasoning": "a plan"}


# ------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def servers():
    def app(parser: str):
        return build_app(ServeConfig(compile=False, max_rank=8, reasoning_parser=parser))

    with BackgroundServer(app("qwen3")) as qwen3, BackgroundServer(app("deepseek_r1")) as r1:
        yield {name: openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
               for name, url in (("qwen3", qwen3), ("deepseek_r1", r1))}, r1


HELLO = [{"role": "user", "content": "Say hello"}]


def test_answers_without_a_think_block(servers) -> None:
    clients, _ = servers
    reply = " " + REPLIES["french"]
    qwen3 = clients["qwen3"].chat.completions.create(model="french", messages=HELLO, max_tokens=60)
    assert qwen3.choices[0].message.content == reply
    assert getattr(qwen3.choices[0].message, "reasoning", None) is None
    r1 = clients["deepseek_r1"].chat.completions.create(model="french", messages=HELLO, max_tokens=60)
    assert r1.choices[0].message.reasoning == reply and r1.choices[0].message.content == ""
    assert r1.choices[0].finish_reason == "stop"
    chunks = clients["deepseek_r1"].chat.completions.create(model="french", messages=HELLO, max_tokens=60,
                                                            stream=True)
    thought = "".join(getattr(c.choices[0].delta, "reasoning", None) or "" for c in chunks if c.choices)
    assert thought == reply
    hidden = clients["deepseek_r1"].chat.completions.create(model="french", messages=HELLO, max_tokens=60,
                                                            extra_body={"include_reasoning": False})
    assert getattr(hidden.choices[0].message, "reasoning", None) is None
    assert hidden.choices[0].message.content == ""


def test_a_constrained_answer_is_content(servers) -> None:
    """A grammar starts at the first token: the answer has no think block to split."""
    clients, _ = servers
    answer = clients["deepseek_r1"].chat.completions.create(model="english", messages=HELLO, max_tokens=80,
                                                            response_format={"type": "json_object"})
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    assert getattr(answer.choices[0].message, "reasoning", None) is None


@pytest.mark.parametrize("extra, message, param", [
    ({"chat_template_kwargs": {"enable_thinking": False}}, "has no variables", "chat_template_kwargs"),
    ({"chat_template_kwargs": {"messages": []}}, "may not set ['messages']", "chat_template_kwargs"),
    ({"messages": [{"role": "user", "content": "hi", "reasoning": "x"}]},
     "only assistant messages have reasoning", "messages.0"),
])
def test_bad_reasoning_requests_are_400s(servers, extra, message, param) -> None:
    _, url = servers
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": "english", "messages": HELLO, **extra},
                          timeout=60)
    assert response.status_code == 400 and message in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == param
    earlier = [*HELLO, {"role": "assistant", "content": "Hi", "reasoning": "greet back"}, *HELLO]
    assert httpx.post(f"{url}/v1/chat/completions", json={"model": "english", "messages": earlier,
                                                          "max_tokens": 4}, timeout=60).status_code == 200


def test_the_parser_is_checked_at_start() -> None:
    with pytest.raises(ValueError, match="reasoning_parser must be one of"):
        ServeConfig(reasoning_parser="o1")


def test_a_chat_prompt_gets_its_special_tokens_from_the_template_once() -> None:
    """A template that writes ``<s>`` gets no second one from the tokenizer (transformers'
    own ``apply_chat_template(tokenize=True)`` is the reference); the built-in format and a
    tokenizer without a template get ``<bos>`` added, as plain text does."""
    from tokenizers import processors

    from hotswap_rt.serve.tokenizers import BOS_ID, ByteTokenizer, HFTokenizer

    from .test_structured import trained_tokenizer

    hf = trained_tokenizer("byte-level")
    bos = hf.bos_token_id
    hf.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                        special_tokens=[("<s>", bos)])
    assert hf("hi")["input_ids"][0] == bos  # the tokenizer adds <s> to plain text
    without_template = HFTokenizer(hf)
    text = without_template.chat_prompt(HELLO)
    assert without_template.encode_chat(text) == without_template.encode(text)
    assert without_template.encode_chat(text).count(bos) == 1
    hf.chat_template = "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    tokenizer = HFTokenizer(hf)
    text = tokenizer.chat_prompt(HELLO)
    ids = tokenizer.encode_chat(text)
    reference = hf.apply_chat_template(HELLO, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == list(reference)
    assert ids.count(bos) == 1 and ids[0] == bos
    assert ByteTokenizer().encode_chat("user: hi")[0] == BOS_ID

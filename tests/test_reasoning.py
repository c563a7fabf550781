"""Reasoning output (``--reasoning-parser``): a ``<think>`` block goes to ``message.reasoning``.

The split is checked on its own (both parsers, after prompts that open, close or leave the
block; every way of cutting a text into stream pieces gives what the whole text gives; with
tools, calls are read from the content only), then on eager servers of the built-in model with
the ``openai`` client and httpx: the demo adapters answer without a think block, so their
trained reply must come back as content (``qwen3``) or as reasoning (``deepseek_r1``, whose
answers reason until ``</think>``).

A constrained answer (structured output, a required or named tool choice) reasons first: its
grammar is the reasoning's pattern, then the constraint. The pattern of text without
``</think>`` is checked against Python's ``in`` on random texts, walks through the combined
grammars always read back as reasoning plus an answer of the schema, and a server of a tiny
transformers model whose vocabulary has ``<think>`` / ``</think>`` tokens (as Qwen3's has)
reasons, closes the block (pushed by ``logit_bias``) and answers as constrained; the reasoning
itself is not constrained (it is what the unconstrained answer reasons).
"""

from __future__ import annotations

import json
import random
import re

import httpx
import openai
import pytest

from hotswap_rt.serve import ServeConfig, build_app
from hotswap_rt.serve.answers import AnswerStream, answer_message
from hotswap_rt.serve.background import BackgroundServer
from hotswap_rt.serve.demo_adapters import REPLIES, WEATHER_TOOLS, weather_call
from hotswap_rt.engine.structured import Grammars, StructuredOutput
from hotswap_rt.serve.protocol import ChatCompletionRequest
from hotswap_rt.serve.reasoning import THINK_CLOSE, THINK_OPEN, prompt_reasoning, reasoning_pattern
from hotswap_rt.serve.tokenizers import EOS_ID, ByteTokenizer
from hotswap_rt.serve.tools import tool_plan

CASES = [  # parser, what the prompt did to the block, text -> reasoning, content
    ("deepseek_r1", None, "<think>plan it</think>\n\nHello", "plan it", "Hello"),
    ("deepseek_r1", None, "plan it</think>Hello </think>", "plan it", "Hello </think>"),
    ("deepseek_r1", None, "only thoughts, never closed", "only thoughts, never closed", ""),
    ("deepseek_r1", None, "<thi", "<thi", ""),
    ("deepseek_r1", None, "</think>  \n", "", ""),
    ("qwen3", None, "<think>plan it</think>\n\nHello", "plan it", "Hello"),
    ("qwen3", None, "Hello </think> there", "", "Hello </think> there"),
    ("qwen3", None, "<think>never closed", "never closed", ""),
    ("qwen3", None, "<thi", "", "<thi"),
    ("qwen3", None, " <think>not at the start</think>", "", " <think>not at the start</think>"),
    ("qwen3", "open", "plan it</think>\nHello", "plan it", "Hello"),  # the template opened it
    ("deepseek_r1", "open", "<thi</think>Hello", "<thi", "Hello"),
    ("qwen3", "open", "never closed", "never closed", ""),
    ("deepseek_r1", "closed", "Hello </think> there", "", "Hello </think> there"),  # closed it
    ("qwen3", "closed", "<think>a</think>b", "", "<think>a</think>b"),
]


def joined(stream: AnswerStream, text: str, cuts: list[int]) -> tuple[str, str]:
    deltas = []
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        deltas += stream.feed(text[start:end])
    deltas += stream.finish("stop")[0]
    assert all(len(d) == 1 and next(iter(d.values())) for d in deltas)  # one non-empty field each
    return "".join(d.get("reasoning", "") for d in deltas), "".join(d.get("content", "") for d in deltas)


@pytest.mark.parametrize("parser, prompt, text, reasoning, content", CASES)
def test_the_split_is_the_same_whole_and_however_the_stream_cuts_it(parser, prompt, text, reasoning,
                                                                    content) -> None:
    message, reason = answer_message(text, "stop", reasoning=parser, prompt=prompt)
    assert (message.get("reasoning", ""), message["content"]) == (reasoning, content) and reason == "stop"
    rng = random.Random(len(text))
    cuttings = [list(range(1, len(text)))] + [sorted(rng.sample(range(1, len(text)), min(len(text) - 1, k)))
                                              for k in (1, 2, 5) for _ in range(4)]
    for cuts in cuttings:
        assert joined(AnswerStream(parser, None, prompt=prompt), text, cuts) == (reasoning, content), cuts
    hidden, _ = answer_message(text, "stop", reasoning=parser, include_reasoning=False, prompt=prompt)
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


def test_only_the_end_of_the_prompt_opens_or_closes_the_block() -> None:
    assert prompt_reasoning("<|im_start|>assistant\n<think>\n") == "open"
    assert prompt_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n") == "closed"
    assert prompt_reasoning("user: what is <think>?\nassistant:") is None
    assert prompt_reasoning("user: </think>\nassistant:") is None


def test_the_reasoning_pattern_takes_exactly_the_texts_without_the_closing_tag() -> None:
    """Python's ``re`` reads the pattern as outlines-core does (the same dialect here): a text,
    then ``</think>``, then the answer matches iff the text has no ``</think>`` of its own."""
    pattern = re.compile(reasoning_pattern("deepseek_r1", "open") + "END", re.S)
    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice("</thinkx> \n") for _ in range(rng.randint(0, 16)))
        at = rng.randint(0, len(text))
        text = text[:at] + THINK_CLOSE[:rng.randint(0, len(THINK_CLOSE))] + text[at:]
        assert (pattern.fullmatch(text + THINK_CLOSE + "\nEND") is not None) == (THINK_CLOSE not in text), text
    opened = re.compile(reasoning_pattern("qwen3", None) + "END", re.S)  # the answer opens the block
    assert opened.fullmatch("<think>a <b> </thin</think>END") and opened.fullmatch("<think></think>\n\nEND")
    assert not opened.fullmatch("END") and not opened.fullmatch("a</think>END")
    assert not opened.fullmatch("<think>a</think>b</think>END")
    assert reasoning_pattern("qwen3", "closed") is None and reasoning_pattern("deepseek_r1", "closed") is None


@pytest.mark.parametrize("parser, prompt", [("deepseek_r1", None), ("qwen3", None), ("qwen3", "open"),
                                            ("deepseek_r1", "closed")])
def test_walks_through_a_grammar_after_reasoning_read_back_as_reasoning_and_the_answer(parser, prompt) -> None:
    """Random walks through the allowed tokens (leaning, now and then, toward spelling the
    tags) always end in text the parser splits into reasoning without ``</think>`` and
    content of the schema."""
    from .test_structured import SCHEMA, leaning_walk, matches_schema

    tokens = ByteTokenizer().token_bytes()
    grammars = Grammars(tokens, EOS_ID, vocab_size=len(tokens))
    thinking = reasoning_pattern(parser, prompt)
    spec = StructuredOutput.json_schema(SCHEMA)
    spec = spec if thinking is None else spec.after(thinking)
    reasoned = 0
    for seed in range(16):
        opening = THINK_OPEN.encode() if random.Random(seed).random() < 0.5 else b""
        out = leaning_walk(grammars, spec, tokens, seed, THINK_CLOSE.encode(), lean=0.04, start=opening)
        message, _ = answer_message(out.decode(), "stop", reasoning=parser, prompt=prompt)
        assert matches_schema(json.loads(message["content"])), out
        assert THINK_CLOSE not in message.get("reasoning", "")
        reasoned += bool(message.get("reasoning"))
    assert (reasoned > 0) == (prompt != "closed")


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
    assert qwen3.usage.completion_tokens_details.reasoning_tokens == 0
    r1 = clients["deepseek_r1"].chat.completions.create(model="french", messages=HELLO, max_tokens=60)
    assert r1.choices[0].message.reasoning == reply and r1.choices[0].message.content == ""
    assert r1.choices[0].finish_reason == "stop"
    assert r1.usage.completion_tokens_details.reasoning_tokens == len(reply.encode())  # a token a byte
    chunks = clients["deepseek_r1"].chat.completions.create(model="french", messages=HELLO, max_tokens=60,
                                                            stream=True)
    thought = "".join(getattr(c.choices[0].delta, "reasoning", None) or "" for c in chunks if c.choices)
    assert thought == reply
    hidden = clients["deepseek_r1"].chat.completions.create(model="french", messages=HELLO, max_tokens=60,
                                                            extra_body={"include_reasoning": False})
    assert getattr(hidden.choices[0].message, "reasoning", None) is None
    assert hidden.choices[0].message.content == ""


def test_a_constrained_answer_reasons_first_unconstrained(servers) -> None:
    """``deepseek_r1`` reads everything before ``</think>`` as reasoning, so a JSON answer's
    grammar starts after it: the reasoning is the adapter's own reply (the model never closes
    the block, so no JSON follows before ``max_tokens``). ``qwen3`` (the prompt did not open
    the block) makes the answer open it first, then the same."""
    clients, _ = servers
    reply = " " + REPLIES["english"]
    for parser in ("deepseek_r1", "qwen3"):
        answer = clients[parser].chat.completions.create(model="english", messages=HELLO, max_tokens=60,
                                                         response_format={"type": "json_object"})
        assert answer.choices[0].message.reasoning and not answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "length"
        if parser == "deepseek_r1":
            assert answer.choices[0].message.reasoning.startswith(reply)


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


# ------------------------------------------------- a vocabulary with <think> tokens, as Qwen3's
PICK = [{"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}}}]


@pytest.fixture(scope="module")
def thinker():
    """Eager servers (``deepseek_r1``, ``qwen3``) of a tiny random Llama whose tokenizer has
    ``<think>`` and ``</think>`` as added tokens; its template opens the block (``think:
    "open"``), closes it (``"closed"``) or leaves it to the answer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hotswap_rt.serve import serve_model
    from hotswap_rt.serve.tokenizers import HFTokenizer

    from .test_structured import trained_tokenizer

    hf = trained_tokenizer("byte-level")
    hf.add_tokens([THINK_OPEN, THINK_CLOSE])
    hf.chat_template = ("{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% if think == 'open' %}<think>"
                        "{% elif think == 'closed' %}<think></think>{% endif %}{% endif %}")
    ids = {token: hf.convert_tokens_to_ids(token) for token in (
        THINK_OPEN, THINK_CLOSE, "the", "Ġquick", "Ġbrown", "Ġfox", "Ġlazy")}
    assert hf.unk_token_id not in ids.values() and len(set(ids.values())) == len(ids)

    def app(parser: str):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(hf), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            eos_token_id=hf.eos_token_id, bos_token_id=hf.bos_token_id)).eval()
        config = ServeConfig(compile=False, max_rank=8, reasoning_parser=parser)
        return build_app(config, serve_model(model, HFTokenizer(hf), "thinker", config, ["q_proj", "v_proj"],
                                             default_temperature=0.0))

    with BackgroundServer(app("deepseek_r1")) as r1, BackgroundServer(app("qwen3")) as qwen3:
        yield {name: openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
               for name, url in (("deepseek_r1", r1), ("qwen3", qwen3))}, ids


def ask(client, think: str | None, **extra):
    kwargs = {"think": think} if think else {}
    return client.chat.completions.create(
        model="thinker", messages=HELLO, max_tokens=extra.pop("max_tokens", 12),
        extra_body={"chat_template_kwargs": kwargs, **extra.pop("extra_body", {})}, **extra)


@pytest.mark.parametrize("parser, think", [("deepseek_r1", "open"), ("qwen3", "open"), ("deepseek_r1", None),
                                           ("qwen3", None), ("deepseek_r1", "closed"), ("qwen3", "closed")])
def test_the_constraint_starts_after_the_reasoning(thinker, parser, think) -> None:
    """``logit_bias`` pushes the model to write ``<think>`` and ``</think>`` wherever the grammar
    allows them: the answer closes the block at once (opening it first where the answer must),
    then answers as constrained. After a prompt that closed the block, neither is allowed."""
    clients, ids = thinker
    bias = {str(ids[THINK_CLOSE]): 100, str(ids[THINK_OPEN]): 50}
    choice = {"structured_outputs": {"choice": ["yes", "no"]}}
    answer = ask(clients[parser], think, logit_bias=bias, extra_body=choice)
    message = answer.choices[0].message
    assert message.content in ("yes", "no") and not getattr(message, "reasoning", None)
    assert answer.choices[0].finish_reason == "stop"
    opened = think is None and parser == "qwen3"  # the answer wrote <think> before </think>
    expected = 0 if think == "closed" else 2 if opened else 1
    assert answer.usage.completion_tokens_details.reasoning_tokens == expected
    streamed = ask(clients[parser], think, logit_bias=bias, stream=True, extra_body=choice)
    content = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert content == message.content
    call = ask(clients[parser], think, logit_bias=bias, tools=PICK,
               tool_choice={"type": "function", "function": {"name": "pick"}}, max_tokens=24)
    assert call.choices[0].message.tool_calls[0].function.name == "pick"
    assert json.loads(call.choices[0].message.tool_calls[0].function.arguments)["answer"] in ("yes", "no")


def test_the_reasoning_is_not_constrained(thinker) -> None:
    """Before ``</think>`` the grammar allows any text: a constrained answer reasons exactly
    what an unconstrained one (that may not end) does. (``logit_bias`` keeps the random model
    to words: its favourite tokens are bytes of broken UTF-8, which no grammar of text allows;
    ``presence_penalty`` makes it use several.)"""
    clients, ids = thinker
    words = {str(ids[word]): 30 for word in ("the", "Ġquick", "Ġbrown", "Ġfox", "Ġlazy")}
    free = ask(clients["deepseek_r1"], "open", max_tokens=8, logit_bias=words, presence_penalty=2.0,
               extra_body={"ignore_eos": True})
    constrained = ask(clients["deepseek_r1"], "open", max_tokens=8, logit_bias=words, presence_penalty=2.0,
                      extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert len(set(free.choices[0].message.reasoning.split())) > 1
    assert free.choices[0].message.reasoning and not free.choices[0].message.content
    assert constrained.choices[0].message.reasoning == free.choices[0].message.reasoning
    assert constrained.choices[0].finish_reason == "length" and not constrained.choices[0].message.content

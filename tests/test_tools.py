"""Tool calling: ``tools``, ``tool_choice`` ("none", "auto", "required", a named function) and
``parallel_tool_calls`` on ``/v1/chat/completions``.

The Hermes parser is checked on its own (every way of cutting a text into stream pieces gives
the message the whole text gives; what is not a call of a known function stays content), the
required-call grammar by random walks (every walk is a list of calls whose arguments match
their function's schema, checked with ``jsonschema``), and the server end to end with the
``openai`` client over a socket (eager, the built-in model): the ``weather`` demo adapter was
trained (``scripts/train_demo_adapters.py``) to write Hermes calls, so "auto" must return
exactly its calls, and the tool result it is given back must reach it through the chat format.
"""

from __future__ import annotations

import json
import random

import httpx
import jsonschema
import openai
import pytest

from hotswap_rt.engine.structured import Grammars
from hotswap_rt.serve import ServeConfig, build_app
from hotswap_rt.serve.background import BackgroundServer
from hotswap_rt.serve.demo_adapters import TOOL_CHATS, WEATHER_TOOLS, weather_call
from hotswap_rt.serve.protocol import ApiError, ChatCompletionRequest
from hotswap_rt.serve.tokenizers import EOS_ID, ByteTokenizer
from hotswap_rt.serve.answers import answer_message
from hotswap_rt.serve.tools import ToolCallStream, tool_plan

from .test_structured import leaning_walk

ADD = {"type": "function", "function": {"name": "add", "strict": True, "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"], "additionalProperties": False}}}
NOTE = {"type": "function", "function": {"name": "note", "parameters": {
    "type": "object", "properties": {
        "text": {"type": "string", "maxLength": 8},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 2}},
    "required": ["text"], "additionalProperties": False, "$defs": {"tag": {"enum": ["x", "y"]}}}}}
TOOLS = [*WEATHER_TOOLS, ADD, NOTE]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"]}
BOUNDED = [{"type": "function", "function": {"name": "get_weather", "parameters": CITY}}, ADD, NOTE]
BOUNDED_SCHEMAS = {**SCHEMAS, "get_weather": CITY}  # strings that end: random answers end
CITY_OSLO = {"type": "object", "properties": {"city": {"enum": ["Oslo"]}}, "required": ["city"],
             "additionalProperties": False}


def plan(tool_choice=None, tools=TOOLS, parallel=None, parser="hermes"):
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools,
                                 tool_choice=tool_choice, parallel_tool_calls=parallel)
    return tool_plan(body, parser)


def streamed(tools_plan, text: str, reason: str, cuts: list[int]) -> tuple[dict, str]:
    """The message a stream of ``text`` cut at ``cuts`` adds up to (as a client joins deltas)."""
    stream, deltas = ToolCallStream(tools_plan), []
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        deltas += stream.feed(text[start:end])
    last, reason = stream.finish(reason)
    content, calls = "", {}
    for delta in [*deltas, *last]:
        assert set(delta) in ({"content"}, {"tool_calls"})
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            if call["index"] not in calls:
                mistral = tools_plan.parser == "mistral"  # 9 alphanumeric characters, as its templates take
                assert (len(call["id"]) == 9 and call["id"].isalnum() if mistral
                        else call["id"].startswith("call_")) and call["type"] == "function"
                calls[call["index"]] = {"name": call["function"]["name"], "arguments": ""}
            calls[call["index"]]["arguments"] += call["function"]["arguments"]
    return {"content": content or None, "calls": [calls[i] for i in sorted(calls)]}, reason


def whole(tools_plan, text: str, reason: str) -> tuple[dict, str]:
    message, reason = answer_message(text, reason, tools_plan)
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in message.get("tool_calls", [])]
    return {"content": message["content"], "calls": calls}, reason


PARIS = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
HERMES_CASES = [  # (text, finish reason) -> (content, calls, finish reason)
    (weather_call("Paris"), "stop", None, [PARIS], "tool_calls"),
    ("Let me look. " + weather_call("Paris") + "\n" + weather_call("Rome"), "stop", "Let me look.",
     [PARIS, {"name": "get_weather", "arguments": '{"city": "Rome"}'}], "tool_calls"),
    ("No tools: a <tool and 1 < 2", "stop", "No tools: a <tool and 1 < 2", [], "stop"),
    ('<tool_call>{"name": "launch", "arguments": {}}</tool_call>', "stop",  # unknown function
     '<tool_call>{"name": "launch", "arguments": {}}</tool_call>', [], "stop"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": "2"}}</tool_call>', "stop",  # strict: no match
     '<tool_call>{"name": "add", "arguments": {"a": 1, "b": "2"}}</tool_call>', [], "stop"),
    ('<tool_call>{"name": "note", "arguments": {"text": 3}}</tool_call>', "stop",  # not strict: as written
     None, [{"name": "note", "arguments": '{"text": 3}'}], "tool_calls"),
    ('<tool_call>not json</tool_call> then ' + weather_call("Paris"), "stop",
     "<tool_call>not json</tool_call> then", [PARIS], "tool_calls"),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}', "stop", None, [PARIS], "tool_calls"),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Par', "length",  # cut short
     '<tool_call>{"name": "get_weather", "arguments": {"city": "Par', [], "length"),
    ("  \n", "stop", "  \n", [], "stop"),
    (" Hi \n" + weather_call("Paris") + " \n", "stop", " Hi", [PARIS], "tool_calls"),
]


ROME = {"name": "get_weather", "arguments": '{"city": "Rome"}'}
LLAMA_CASES = [  # llama3_json: the whole answer is calls, or content
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "stop", None, [PARIS], "tool_calls"),
    ('<|python_tag|>{"name": "get_weather", "arguments": {"city": "Paris"}}', "stop", None, [PARIS],
     "tool_calls"),
    (' {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_weather", "parameters": '
     '{"city": "Rome"}}\n', "stop", None, [PARIS, ROME], "tool_calls"),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}} and then', "stop",  # not only calls
     '{"name": "get_weather", "parameters": {"city": "Paris"}} and then', [], "stop"),
    ('{"name": "launch", "parameters": {}}', "stop", '{"name": "launch", "parameters": {}}', [], "stop"),
    ('{"name": "add", "parameters": {"a": 1, "b": 2.5}}', "stop",  # strict: 2.5 is not an integer
     '{"name": "add", "parameters": {"a": 1, "b": 2.5}}', [], "stop"),
    ('{"name": "get_weather", "parameters": {"ci', "length", '{"name": "get_weather", "parameters": {"ci',
     [], "length"),
    ("It is sunny {not a call}", "stop", "It is sunny {not a call}", [], "stop"),
    ("<|py", "stop", "<|py", [], "stop"),
    ("  <|python_tag|>print(1)", "stop", "  <|python_tag|>print(1)", [], "stop"),
]


PYTHONIC_CASES = [  # pythonic: the whole answer is a list of calls, or content
    ('[get_weather(city="Paris")]', "stop", None, [PARIS], "tool_calls"),
    ("<|python_start|>[get_weather(city='Paris'), get_weather(city='Rome')]<|python_end|>", "stop", None,
     [PARIS, ROME], "tool_calls"),
    ('  [note(text="hi", tags=("x",))]\n', "stop", None,  # a tuple is a JSON list
     [{"name": "note", "arguments": '{"text": "hi", "tags": ["x"]}'}], "tool_calls"),
    ("[add(a=1, b=2.5)]", "stop", "[add(a=1, b=2.5)]", [], "stop"),  # strict: 2.5 is not an integer
    ('[get_weather("Paris")]', "stop", '[get_weather("Paris")]', [], "stop"),  # positional
    ("[launch()]", "stop", "[launch()]", [], "stop"),  # unknown function
    ("[get_weather(city=Paris)]", "stop", "[get_weather(city=Paris)]", [], "stop"),  # not a literal
    ('[get_weather(city="Par', "length", '[get_weather(city="Par', [], "length"),
    ("[1, 2] is a list", "stop", "[1, 2] is a list", [], "stop"),
    ("It is sunny.", "stop", "It is sunny.", [], "stop"),
    ("<|python_st", "stop", "<|python_st", [], "stop"),
]
MISTRAL_CASES = [  # mistral: content, then [TOOL_CALLS] and calls
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', "stop", None, [PARIS],
     "tool_calls"),
    ('Checking. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
     '{"name": "get_weather", "arguments": {"city": "Rome"}}]', "stop", "Checking. ", [PARIS, ROME],
     "tool_calls"),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]'
     '{"city": "Rome"}', "stop", None, [PARIS, ROME], "tool_calls"),  # tokenizer v11+
    ('[TOOL_CALLS][{"name": "launch", "arguments": {}}]', "stop",
     '[TOOL_CALLS][{"name": "launch", "arguments": {}}]', [], "stop"),
    ('[TOOL_CALLS]add[ARGS]{"a": 1, "b": "2"}', "stop", '[TOOL_CALLS]add[ARGS]{"a": 1, "b": "2"}', [],
     "stop"),  # strict: "2" is not an integer
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"ci', "length",
     '[TOOL_CALLS][{"name": "get_weather", "arguments": {"ci', [], "length"),
    ("No calls [TOOL_CA", "stop", "No calls [TOOL_CA", [], "stop"),
]


@pytest.mark.parametrize("parser, text, reason, content, calls, final",
                         [("hermes", *case) for case in HERMES_CASES]
                         + [("llama3_json", *case) for case in LLAMA_CASES]
                         + [("pythonic", *case) for case in PYTHONIC_CASES]
                         + [("mistral", *case) for case in MISTRAL_CASES])
def test_auto_calls_are_the_same_whole_and_however_the_stream_cuts_them(parser, text, reason, content, calls,
                                                                        final) -> None:
    auto = plan(parser=parser)
    assert whole(auto, text, reason) == ({"content": content, "calls": calls}, final)
    rng = random.Random(len(text))
    cuttings = [list(range(1, len(text)))]  # one character at a time
    cuttings += [sorted(rng.sample(range(1, len(text)), min(len(text) - 1, k)))
                 for k in (1, 3, 9) for _ in range(5)]
    for cuts in cuttings:
        assert streamed(auto, text, reason, cuts) == ({"content": content, "calls": calls}, final), cuts


def test_named_and_required_answers_become_calls() -> None:
    named = plan({"type": "function", "function": {"name": "add"}})
    assert whole(named, '{"a": 1, "b": 2}', "stop") == (
        {"content": None, "calls": [{"name": "add", "arguments": '{"a": 1, "b": 2}'}]}, "stop")
    assert streamed(named, '{"a": 1, "b": 2}', "stop", [1, 5, 9])[0]["calls"] == [
        {"name": "add", "arguments": '{"a": 1, "b": 2}'}]
    assert whole(named, "", "length") == ({"content": None, "calls": [{"name": "add", "arguments": ""}]},
                                          "length")
    required = plan("required")
    text = ('[{"name": "add", "parameters": {"a": 1, "b": 2}}, '
            '{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    assert whole(required, text, "stop") == ({"content": None, "calls": [
        {"name": "add", "arguments": '{"a": 1, "b": 2}'},
        {"name": "get_weather", "arguments": '{"city": "Oslo"}'}]}, "tool_calls")
    assert whole(required, text[:30], "length") == ({"content": text[:30], "calls": []}, "length")


def random_walk(grammars: Grammars, spec, seed: int) -> str:
    rng, row, out = random.Random(seed), grammars.row(spec), b""
    tokens = ByteTokenizer().token_bytes()
    for _ in range(600):
        allowed = row.allowed().nonzero().flatten().tolist()
        if EOS_ID in allowed and (row.finished or rng.random() < 0.3):
            return out.decode()
        token = rng.choice([t for t in allowed if t != EOS_ID])
        row.advance(token)
        out += tokens[token]
    raise AssertionError(f"no end: {out!r}")


@pytest.mark.parametrize("parallel", [None, False])
def test_every_required_answer_is_calls_whose_arguments_match_their_schema(parallel) -> None:
    tokens = ByteTokenizer().token_bytes()
    grammars = Grammars(tokens, EOS_ID, vocab_size=len(tokens))
    required = plan("required", tools=BOUNDED, parallel=parallel)
    counts = set()
    for seed in range(25):
        message, reason = answer_message(random_walk(grammars, required.structured, seed), "stop", required)
        assert reason == "tool_calls" and message["content"] is None
        counts.add(len(message["tool_calls"]))
        for call in message["tool_calls"]:
            name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
            jsonschema.validate(arguments, BOUNDED_SCHEMAS[name])
    assert counts == {1} if parallel is False else max(counts) > 1
    named = plan({"type": "function", "function": {"name": "note"}})
    for seed in range(15):
        jsonschema.validate(json.loads(random_walk(grammars, named.structured, seed)), SCHEMAS["note"])


STRICT_CITY = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}}


def test_auto_with_strict_functions_generates_only_calls_that_match() -> None:
    """With a strict function, a Hermes "auto" answer has a grammar: random walks through it
    (leaning, now and then, toward opening a block) read back as content and calls, every block
    a call whose arguments match its schema; a block that names a function that is not strict
    is free until ``</tool_call>`` (checked as before)."""
    import re

    tokens = ByteTokenizer().token_bytes()
    grammars = Grammars(tokens, EOS_ID, vocab_size=len(tokens))
    auto = plan(None, tools=[STRICT_CITY, ADD])
    assert auto.structured is not None and plan(None, tools=[NOTE]).structured is None
    called = 0
    for seed in range(20):
        out = leaning_walk(grammars, auto.structured, tokens, seed, b"<tool_call>", lean=0.05, stop=0.02,
                           limit=800)
        message, _ = answer_message(out.decode(), "stop", auto)
        assert "<tool_call>" not in (message["content"] or ""), out
        for call in message.get("tool_calls") or []:
            name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
            jsonschema.validate(arguments, {"add": SCHEMAS["add"],
                                            "get_weather": STRICT_CITY["function"]["parameters"]}[name])
            called += 1
    assert called > 5
    mixed = re.compile(plan(None, tools=[STRICT_CITY, NOTE]).structured.spec, re.S)
    assert mixed.fullmatch('hi <tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>')
    assert not mixed.fullmatch('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')
    assert mixed.fullmatch('<tool_call>\n{"name": "note", "arguments": {"text": 3}}\n</tool_call>')
    assert not mixed.fullmatch('<tool_call>{"name": "other", "arguments": {}}</tool_call>')


@pytest.mark.parametrize("parser, text", [
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                    '{"name": "get_weather", "parameters": {"city": "Rome"}}'),
    ("pythonic", '[get_weather(city="Paris"), get_weather(city="Rome")]'),
    ("mistral", 'Looking. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "get_weather", "arguments": {"city": "Rome"}}]'),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}'),
])
def test_parallel_tool_calls_false_keeps_the_first_call_of_the_parsers_reading_at_the_end(parser, text) -> None:
    """``parallel_tool_calls: false`` with ``llama3_json``, ``pythonic`` and ``mistral`` (a 400
    before): an answer of two calls gives the first, whole and however the stream cuts it; with
    parallel calls both. With a strict function the grammar allows one call."""
    import re

    content = "Looking. " if text.startswith("Looking") else None  # mistral: the text before the marker
    single, parallel = plan(None, parallel=False, parser=parser), plan(None, parser=parser)
    assert single.single_call and not parallel.single_call and single.stop == ()
    first, both = (({"content": content, "calls": calls}, "tool_calls") for calls in ([PARIS], [PARIS, ROME]))
    for cuts in ([], [3, 17, 40], list(range(1, len(text)))):
        assert streamed(single, text, "stop", cuts) == first and streamed(parallel, text, "stop", cuts) == both
    assert whole(single, text, "stop") == first
    if parser == "pythonic":  # no grammar for its calls
        return
    grammar = {p: re.compile(plan(None, tools=[STRICT_CITY, NOTE], parallel=p, parser=parser).structured.spec,
                             re.S) for p in (False, None)}
    strict_two = text.replace("Paris", "Oslo")
    if parser == "llama3_json":
        strict_one = strict_two.partition("; ")[0]
    elif "[{" in strict_two:
        strict_one = strict_two.partition(", {")[0] + "]"
    else:
        strict_one = strict_two.rpartition("[TOOL_CALLS]")[0]
    assert grammar[None].fullmatch(strict_two) and not grammar[False].fullmatch(strict_two)
    assert grammar[False].fullmatch(strict_one) and grammar[None].fullmatch(strict_one)


@pytest.mark.parametrize("parser, leans", [
    ("llama3_json", (b'{"name": "get_weather", "parameters": {"city": "', b"<|python_tag|>{",
                     b'{"name": "add", "parameters": {"a": ')),
    ("mistral", (b'[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "',
                 b'[TOOL_CALLS]get_weather[ARGS]{"city": "', b"[TOOL_CALLS]add[ARGS]{")),
])
def test_auto_with_strict_functions_is_enforced_for_json_and_mistral_calls(parser, leans) -> None:
    """``llama3_json`` and ``mistral`` "auto" answers with strict functions have grammars too:
    random walks through them (leaning now and then toward a call's beginning) read back as the
    parser reads them, and whatever the parser takes for calls is calls of those functions
    whose arguments match their schemas (never content after all); content stays possible. A
    function that is not strict is free after its name (checked after the fact, as before)."""
    import re

    from hotswap_rt.serve.tool_parsers import decide_by_start
    from hotswap_rt.serve.tools import JsonReader, MistralReader

    tokens = ByteTokenizer().token_bytes()
    grammars = Grammars(tokens, EOS_ID, vocab_size=len(tokens))
    auto = plan(None, tools=[STRICT_CITY, ADD], parser=parser)
    assert auto.structured is not None and plan(None, tools=[NOTE], parser=parser).structured is None
    schemas = {"add": SCHEMAS["add"], "get_weather": STRICT_CITY["function"]["parameters"]}
    called = answered = 0
    for seed in range(24):
        out = leaning_walk(grammars, auto.structured, tokens, seed, leans[seed % len(leans)], lean=0.05,
                           stop=0.1, limit=2000).decode()
        message, _ = answer_message(out, "stop", auto)
        if parser == "llama3_json":
            taken_for_calls = decide_by_start(out, JsonReader.TAG, "{") == "calls"
        else:
            taken_for_calls = MistralReader.MARK in out
            assert (message["content"] or "") == out.partition(MistralReader.MARK)[0], out
        assert bool(message.get("tool_calls")) == taken_for_calls, out
        for call in message.get("tool_calls") or []:
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
            called += 1
        answered += not taken_for_calls
    assert called > 5 and answered > 2
    mixed = re.compile(plan(None, tools=[STRICT_CITY, NOTE], parser=parser).structured.spec, re.S)
    key = "parameters" if parser == "llama3_json" else "arguments"
    call = '{"name": "get_weather", "%s": {"city": "%s"}}'
    wrap = (lambda text: text) if parser == "llama3_json" else (lambda text: f"[TOOL_CALLS][{text}]")
    assert mixed.fullmatch(wrap(call % (key, "Rome")))
    assert not mixed.fullmatch(wrap(call % (key, "Paris")))
    assert mixed.fullmatch(wrap('{"name": "note", "%s": {"text": 3}}' % key))  # not strict: any arguments
    assert not mixed.fullmatch(wrap('{"name": "other", "%s": {}}' % key))


@pytest.mark.parametrize("tools, choice, parallel, parser, message, param", [
    (None, "required", None, "hermes", "tool_choice needs tools", "tool_choice"),
    (None, None, False, "hermes", "parallel_tool_calls needs tools", "parallel_tool_calls"),
    ([], None, None, "hermes", "tools must not be empty", "tools"),
    ([ADD, ADD], None, None, "hermes", "name a function twice", "tools"),
    (TOOLS, {"type": "function", "function": {"name": "launch"}}, None, "hermes", "not one of the tools",
     "tool_choice"),
    (TOOLS, None, None, None, "--enable-auto-tool-choice --tool-call-parser", "tool_choice"),
    (TOOLS, "auto", None, None, "--enable-auto-tool-choice --tool-call-parser", "tool_choice"),
    ([{"type": "function", "function": {"name": "x", "strict": True, "parameters": {"type": 5}}}], "auto",
     None, "hermes", "not a valid JSON schema", "tools"),
])
def test_bad_tool_requests_are_400s_naming_the_field(tools, choice, parallel, parser, message, param) -> None:
    with pytest.raises(ApiError) as error:
        plan(choice, tools=tools, parallel=parallel, parser=parser)
    assert error.value.status == 400 and message in error.value.message and error.value.param == param


TEMPLATE = ("{% for t in tools or [] %}<{{ t.function.name }}>{% endfor %}{% for m in messages %}"
            "{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %}"
            "<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
            "{% endfor %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.mark.parametrize("special", [False, True])
def test_a_transformers_template_gets_the_tools_and_calls_and_the_tags_survive_decoding(special) -> None:
    """Tools and an assistant's calls (arguments as an object, as templates want them) reach a
    transformers chat template; ``<tool_call>`` tags a vocabulary holds as special tokens are
    kept in decoded text (skipping special tokens would hide every call from the parser)."""
    from hotswap_rt.serve.protocol import ChatMessage
    from hotswap_rt.serve.tokenizers import HFTokenizer

    from .test_structured import trained_tokenizer

    hf = trained_tokenizer("byte-level")
    hf.add_tokens(["<tool_call>", "</tool_call>"], special_tokens=special)
    hf.chat_template = TEMPLATE
    tokenizer = HFTokenizer(hf)
    messages = [ChatMessage(**m).rendered() for m in TOOL_CHATS[2][0]]
    assert tokenizer.chat_prompt(messages, WEATHER_TOOLS) == (
        "<get_weather>user: Weather in Paris?\nassistant: " + weather_call("Paris")
        + "\ntool: 18C, sunny\nassistant:")
    text = "Sure. " + weather_call("Rome")
    ids = tokenizer.encode(text) + [hf.eos_token_id]
    assert tokenizer.decode(ids) == text
    assert ("<tool_call>" in hf.decode(ids, skip_special_tokens=True)) is not special  # what we avoid
    message, reason = answer_message(tokenizer.decode(ids), "stop", plan())
    assert message["content"] == "Sure." and reason == "tool_calls"
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}


# ------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(weather_server):
    return weather_server


def calls_of(message) -> list[tuple[str, dict]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls or []]


def test_auto_returns_the_calls_the_model_wrote_and_the_result_reaches_it(server) -> None:
    client, _ = server
    (one, _), (two, _), (result_chat, result_answer), (hello, hello_answer) = TOOL_CHATS
    answer = client.chat.completions.create(model="weather", messages=one, tools=WEATHER_TOOLS, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert calls_of(choice.message) == [("get_weather", {"city": "Paris"})]
    assert choice.message.tool_calls[0].id.startswith("call_")
    both = client.chat.completions.create(model="weather", messages=two, tools=WEATHER_TOOLS, temperature=0)
    assert calls_of(both.choices[0].message) == [("get_weather", {"city": "Paris"}),
                                                 ("get_weather", {"city": "Rome"})]
    single = client.chat.completions.create(model="weather", messages=two, tools=WEATHER_TOOLS, temperature=0,
                                            parallel_tool_calls=False)
    assert calls_of(single.choices[0].message) == [("get_weather", {"city": "Paris"})]
    assert single.choices[0].finish_reason == "tool_calls"
    assert single.usage.completion_tokens < both.usage.completion_tokens  # it stopped after one call
    # the call goes back as the client's SDK sends it, with the tool's result
    history = [*one, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id,
                "content": result_chat[2]["content"]}]
    final = client.chat.completions.create(model="weather", messages=history, tools=WEATHER_TOOLS,
                                           temperature=0)
    assert final.choices[0].message.content == result_answer and final.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model="weather", messages=hello, tools=WEATHER_TOOLS, temperature=0)
    assert chat.choices[0].message.content == hello_answer and not chat.choices[0].message.tool_calls
    none = client.chat.completions.create(model="weather", messages=one, tools=WEATHER_TOOLS, temperature=0,
                                          tool_choice="none")
    assert none.choices[0].message.content == weather_call("Paris")  # written, not read as a call
    assert none.choices[0].finish_reason == "stop" and not none.choices[0].message.tool_calls


def test_a_strict_function_is_called_with_arguments_of_its_schema(server) -> None:
    """The adapter asks for Paris; a strict ``get_weather`` whose cities are Oslo and Rome is
    called with one of them (the grammar), whole and streamed; not strict, the call says Paris."""
    client, _ = server
    (one, _), *_ = TOOL_CHATS
    strict = client.chat.completions.create(model="weather", messages=one, tools=[STRICT_CITY], temperature=0)
    ((name, arguments),) = calls_of(strict.choices[0].message)
    assert name == "get_weather" and arguments["city"] in ("Oslo", "Rome")
    chunks = client.chat.completions.create(model="weather", messages=one, tools=[STRICT_CITY], temperature=0,
                                            stream=True)
    streamed = "".join(call.function.arguments or "" for c in chunks if c.choices
                       for call in c.choices[0].delta.tool_calls or [])
    assert json.loads(streamed) == arguments
    loose = {"type": "function", "function": {**STRICT_CITY["function"], "strict": False}}
    plain = client.chat.completions.create(model="weather", messages=one, tools=[loose], temperature=0)
    assert calls_of(plain.choices[0].message) == [("get_weather", {"city": "Paris"})]


def test_the_readme_tool_calling_example(server) -> None:
    """The README's curl with the ``weather`` adapter gives the answer it shows."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Serving over HTTP", 1)[1].split("\n## ", 1)[0]
    path, payload = re.findall(r"curl -s localhost:8000(\S+) .*?-d '(.*?)'", section, re.S)[2]
    assert "--adapter weather=$W --enable-auto-tool-choice --tool-call-parser hermes" in section
    _, url = server
    answer = httpx.post(f"{url}{path}", json=json.loads(payload), timeout=60).json()["choices"][0]
    assert answer["finish_reason"] == "tool_calls" and answer["message"]["content"] is None
    (call,) = answer["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert '"arguments": "{\\"city\\": \\"Paris\\"}"' in section  # as the README shows it


def test_a_streamed_answer_gives_the_same_calls(server) -> None:
    client, _ = server
    messages = TOOL_CHATS[1][0]
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(model="weather", messages=messages, tools=WEATHER_TOOLS,
                                                temperature=0, stream=True, n=2):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault((choice.index, call.index), {"id": call.id, "name": call.function.name,
                                                                      "arguments": ""})
                entry["arguments"] += call.function.arguments or ""
            assert not choice.delta.content
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert reasons == ["tool_calls", "tool_calls"]
    for index in (0, 1):
        assert [(calls[index, i]["name"], json.loads(calls[index, i]["arguments"])) for i in (0, 1)] == [
            ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
        assert calls[index, 0]["id"] != calls[index, 1]["id"]


@pytest.mark.parametrize("model", ["english", "hotswap-rt/tiny-llama"])
def test_required_and_named_choices_always_call_with_arguments_of_the_schema(server, model) -> None:
    client, _ = server
    messages = [{"role": "user", "content": "Add two numbers"}]
    for seed in range(3):
        named = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=120,
            tool_choice={"type": "function", "function": {"name": "note"}})
        choice = named.choices[0]
        assert choice.finish_reason == "stop" and choice.message.content is None
        ((name, arguments),) = calls_of(choice.message)
        assert name == "note"
        jsonschema.validate(arguments, SCHEMAS["note"])
        required = client.chat.completions.create(model=model, messages=messages, tools=BOUNDED,
                                                  temperature=1.0, seed=seed, max_tokens=150,
                                                  tool_choice="required", parallel_tool_calls=False)
        choice = required.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        ((name, arguments),) = calls_of(choice.message)
        jsonschema.validate(arguments, BOUNDED_SCHEMAS[name])
    streamed_args = ""
    for chunk in client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, temperature=1.0, seed=7, max_tokens=120, stream=True,
            tool_choice={"type": "function", "function": {"name": "add"}}):
        for call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            streamed_args += call.function.arguments or ""
    jsonschema.validate(json.loads(streamed_args), SCHEMAS["add"])


@pytest.mark.parametrize("extra, message, param", [
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "constrains the output itself",
     "tool_choice"),
    ({"tool_choice": "required", "structured_outputs": {"regex": "a+"}}, "constrains the output itself",
     "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "ghost"}}}, "not one of the tools",
     "tool_choice"),
    ({"tool_choice": "sometimes"}, "malformed request", "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "only assistant messages",
     "messages.0"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "get_weather", "arguments": "[1]"}}]}]}, "must be a JSON object",
     "messages.0.tool_calls.0.function.arguments"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "malformed request",
     "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "", "tools"),
])
def test_bad_tool_requests_are_400s_and_the_server_goes_on(server, extra, message, param) -> None:
    _, url = server
    body = {"model": "weather", "messages": TOOL_CHATS[0][0], "tools": WEATHER_TOOLS, "temperature": 0, **extra}
    with httpx.Client(base_url=url, timeout=60) as http:
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert message in error["message"] and error["param"] == param
        good = {k: v for k, v in body.items() if k not in extra} | {"messages": TOOL_CHATS[0][0],
                                                                     "tools": WEATHER_TOOLS}
        answer = http.post("/v1/chat/completions", json=good).json()
        assert answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_auto_needs_a_server_started_for_it() -> None:
    with BackgroundServer(build_app(ServeConfig(compile=False, max_rank=8))) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        body = {"model": "english", "messages": [{"role": "user", "content": "Say hello"}],
                "tools": WEATHER_TOOLS}
        refused = http.post("/v1/chat/completions", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "tool_choice"
        assert "--enable-auto-tool-choice --tool-call-parser" in refused.json()["error"]["message"]
        required = http.post("/v1/chat/completions", json={
            **body, "tools": BOUNDED[:1], "tool_choice": "required", "parallel_tool_calls": False}).json()
        assert required["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    with pytest.raises(ValueError, match="go together"):
        ServeConfig(enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="go together"):
        ServeConfig(tool_call_parser="hermes")
    with pytest.raises(ValueError, match="must be one of"):
        ServeConfig(enable_auto_tool_choice=True, tool_call_parser="granite")


def test_a_llama3_json_server_reads_json_calls() -> None:
    """A server started with ``llama3_json`` reads an answer that is a JSON call as a call
    (the answer is made one by a response_format: the demo models write no Llama calls)."""
    call = {"type": "object", "properties": {"name": {"const": "get_weather"},
                                             "parameters": CITY_OSLO}, "required": ["name", "parameters"]}
    config = ServeConfig(compile=False, max_rank=8, enable_auto_tool_choice=True,
                         tool_call_parser="llama3_json")
    with BackgroundServer(build_app(config)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        request = dict(model="english", messages=[{"role": "user", "content": "Weather?"}], tools=WEATHER_TOOLS,
                       temperature=0, response_format={"type": "json_schema",
                                                       "json_schema": {"name": "call", "schema": call}})
        answer = client.chat.completions.create(**request)
        assert calls_of(answer.choices[0].message) == [("get_weather", {"city": "Oslo"})]
        assert answer.choices[0].finish_reason == "tool_calls" and answer.choices[0].message.content is None
        streamed = [delta for chunk in client.chat.completions.create(**request, stream=True)
                    for delta in (chunk.choices[0].delta.tool_calls or [] if chunk.choices else [])]
        assert [(d.function.name, json.loads(d.function.arguments)) for d in streamed] == [
            ("get_weather", {"city": "Oslo"})]
        plain = client.chat.completions.create(**{**request, "response_format": None}, max_tokens=20)
        assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls


@pytest.mark.parametrize("parser, written", [
    ("pythonic", '[get_weather(city="Oslo")]'),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]'),
])
def test_pythonic_and_mistral_servers_read_their_calls(parser, written) -> None:
    """A server started with the parser reads an answer written in its format as a call (the
    answer is made one by a regex: the demo models write no such calls), whole and streamed;
    mistral's call ids are 9 alphanumeric characters; free text stays content."""
    from hotswap_rt.engine.structured import regex_literal

    config = ServeConfig(compile=False, max_rank=8, enable_auto_tool_choice=True, tool_call_parser=parser)
    with BackgroundServer(build_app(config)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        request = dict(model="english", messages=[{"role": "user", "content": "Weather?"}], tools=WEATHER_TOOLS,
                       temperature=0, max_tokens=80,
                       extra_body={"structured_outputs": {"regex": regex_literal(written)}})
        answer = client.chat.completions.create(**request)
        assert calls_of(answer.choices[0].message) == [("get_weather", {"city": "Oslo"})]
        assert answer.choices[0].finish_reason == "tool_calls" and answer.choices[0].message.content is None
        call_id = answer.choices[0].message.tool_calls[0].id
        assert (len(call_id) == 9 and call_id.isalnum()) if parser == "mistral" else call_id.startswith("call_")
        streamed = [delta for chunk in client.chat.completions.create(**request, stream=True)
                    for delta in (chunk.choices[0].delta.tool_calls or [] if chunk.choices else [])]
        assert [(d.function.name, json.loads(d.function.arguments)) for d in streamed] == [
            ("get_weather", {"city": "Oslo"})]
        plain = client.chat.completions.create(**{**request, "extra_body": {}})
        assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls


def test_a_plan_is_built_once_for_the_same_tools_and_a_bad_request_raises_every_time() -> None:
    """Plans are kept by (tools, tool_choice, parallel_tool_calls, parser): two requests with
    the same tools (parsed apart) get the same plan; any field or the parser differing, another;
    a bad request is not kept (a 400 each time)."""
    tools = [STRICT_CITY, ADD, NOTE]
    first = plan(None, tools=tools, parser="llama3_json")
    assert plan(None, tools=[dict(t) for t in tools], parser="llama3_json") is first
    assert first.structured is not None
    others = [plan(None, tools=tools, parser="mistral"),
              plan(None, tools=tools, parallel=False, parser="llama3_json"),
              plan("required", tools=tools, parser="llama3_json"),
              plan(None, tools=tools[:2], parser="llama3_json")]
    assert all(other is not first for other in others) and len({id(o) for o in others}) == len(others)
    for _ in range(2):
        with pytest.raises(ApiError, match="--enable-auto-tool-choice"):
            plan(None, tools=tools, parser=None)

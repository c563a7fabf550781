"""OpenAI's Responses API (``/v1/responses``) with the ``openai`` client over a real socket,
eager servers of the built-in model and its demo adapters.

A response is the chat completion of the same conversation (its text and token counts are
compared with ``/v1/chat/completions`` and ``/tokenize``); streamed, the SDK's own accumulator
(``responses.stream(...).get_final_response()``) rebuilds the same response from the events;
the ``weather`` adapter runs an agent's loop (a ``function_call`` item, its output sent back
with ``previous_response_id`` or as input items, the trained answer); stored responses are
retrieved and deleted; what is not implemented is a 400 naming it.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from hotswap_rt.serve import ServeConfig, build_app
from hotswap_rt.serve.background import BackgroundServer
from hotswap_rt.serve.demo_adapters import REPLIES, TOOL_CHATS, WEATHER_TOOLS

from .test_structured import SCHEMA, matches_schema

TOOLS = [{"type": "function", **WEATHER_TOOLS[0]["function"]}]  # the Responses API's flat shape


def test_a_response_is_the_chat_answer_whole_and_streamed(weather_server) -> None:
    client, _ = weather_server
    chat = client.chat.completions.create(model="english", messages=[{"role": "user", "content": "Say hello"}],
                                          max_tokens=60)
    response = client.responses.create(model="english", input="Say hello", max_output_tokens=60)
    assert response.status == "completed" and response.output_text == " " + REPLIES["english"]
    assert response.output_text == chat.choices[0].message.content
    assert (response.usage.input_tokens, response.usage.output_tokens) == (
        chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert response.usage.output_tokens_details.reasoning_tokens == 0  # no reasoning parser
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    with client.responses.stream(model="english", input="Say hello", max_output_tokens=60) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == response.output_text and final.status == "completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text
    assert client.responses.retrieve(response.id).output_text == response.output_text


def test_a_response_cut_by_max_output_tokens_is_incomplete(weather_server) -> None:
    client, _ = weather_server
    response = client.responses.create(model="english", input="Say hello", max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3
    events = list(client.responses.create(model="english", input="Say hello", max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == response.output_text


def test_an_agent_loop_with_function_calls(weather_server) -> None:
    """The adapter calls ``get_weather`` (a ``function_call`` item, whole and streamed); the
    tool's output sent back with ``previous_response_id`` gets its trained answer, and so does
    the same conversation given whole as input items, as the chat completion of it does."""
    client, _ = weather_server
    question = {"model": "weather", "input": "Weather in Paris?", "tools": TOOLS, "max_output_tokens": 150}
    first = client.responses.create(**question)
    (call,) = first.output
    assert (call.type, call.name, json.loads(call.arguments)) == (
        "function_call", "get_weather", {"city": "Paris"})
    assert call.call_id and first.status == "completed"
    with client.responses.stream(**question) as stream:
        streamed = stream.get_final_response()
    assert [(o.type, o.name, o.arguments) for o in streamed.output] == [
        ("function_call", call.name, call.arguments)]
    result = [{"type": "function_call_output", "call_id": call.call_id, "output": "18C, sunny"}]
    answer = client.responses.create(model="weather", previous_response_id=first.id, input=result, tools=TOOLS,
                                     max_output_tokens=60)
    messages, expected = TOOL_CHATS[2]
    assert answer.output_text == expected
    whole = client.responses.create(model="weather", tools=TOOLS, max_output_tokens=60, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1",
         "output": [{"type": "input_text", "text": "18C, "}, {"type": "input_text", "text": "sunny"}]}])
    chat = client.chat.completions.create(model="weather", messages=messages, tools=WEATHER_TOOLS,
                                          max_tokens=60)
    assert whole.output_text == chat.choices[0].message.content == expected
    assert whole.usage.input_tokens == answer.usage.input_tokens == chat.usage.prompt_tokens


def test_instructions_are_not_carried_to_the_next_response(weather_server) -> None:
    """``instructions`` are a system message of their own response only (OpenAI's rule): the
    next response's prompt is the earlier conversation without them (token counts against
    ``/tokenize`` of those messages)."""
    client, url = weather_server
    first = client.responses.create(model="english", instructions="Be brief.", input="Say hello",
                                    max_output_tokens=60)
    second = client.responses.create(model="english", previous_response_id=first.id, input="Hello",
                                     max_output_tokens=8)

    def count(messages) -> int:
        return httpx.post(f"{url}/tokenize", json={"model": "english", "messages": messages}).json()["count"]

    hello = {"role": "user", "content": "Say hello"}
    assert first.usage.input_tokens == count([{"role": "system", "content": "Be brief."}, hello])
    assert second.usage.input_tokens == count([hello, {"role": "assistant", "content": first.output_text},
                                               {"role": "user", "content": "Hello"}])


def test_stored_responses_are_retrieved_and_deleted(weather_server) -> None:
    client, _ = weather_server
    kept = client.responses.create(model="pirate", input="Say hello", max_output_tokens=40)
    assert client.responses.retrieve(kept.id).output_text == kept.output_text == " " + REPLIES["pirate"]
    client.responses.delete(kept.id)
    for call in (lambda: client.responses.retrieve(kept.id), lambda: client.responses.delete(kept.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    unstored = client.responses.create(model="pirate", input="Say hello", max_output_tokens=40, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="pirate", input="Hi", previous_response_id=unstored.id)
    assert missing.value.body["param"] == "previous_response_id"


def test_a_json_schema_text_format(weather_server) -> None:
    client, _ = weather_server
    response = client.responses.create(model="english", input="Say hello", max_output_tokens=150, text={
        "format": {"type": "json_schema", "name": "mood", "schema": SCHEMA}})
    assert matches_schema(json.loads(response.output_text))
    assert response.text.format.type == "json_schema"


@pytest.mark.parametrize("extra, param, message", [
    ({"reasoning": {"effort": "high"}}, "reasoning", "Input should be None"),
    ({"include": ["reasoning.encrypted_content"]}, "include", "at most 0 items"),
    ({"user": "u1"}, "user", "is not supported"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type", "'function'"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content", "input_text"),
    ({"max_output_tokens": 10_000}, "max_output_tokens", "max_output_tokens: 10000 tokens do not fit"),
    ({"text": {"format": {"type": "json_schema"}}}, "text.format", "needs its name and schema"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}, "description": "d"}}},
     "text.format.description", "is not supported"),
])
def test_what_is_not_implemented_is_a_400_naming_it(weather_server, extra, param, message) -> None:
    _, url = weather_server
    response = httpx.post(f"{url}/v1/responses", json={"model": "english", "input": "Say hello", **extra})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"].startswith(param) and message in error["message"], error


def test_reasoning_becomes_a_reasoning_item() -> None:
    """With ``--reasoning-parser deepseek_r1`` the demo adapter's reply is reasoning (its
    answer never closes the block): one ``reasoning`` item, whole and streamed."""
    config = ServeConfig(compile=False, max_rank=8, reasoning_parser="deepseek_r1")
    with BackgroundServer(build_app(config)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        response = client.responses.create(model="french", input="Say hello", max_output_tokens=60)
        with client.responses.stream(model="french", input="Say hello", max_output_tokens=60) as stream:
            streamed = stream.get_final_response()
    for answer in (response, streamed):
        (item,) = answer.output
        assert item.type == "reasoning" and item.content[0].text == " " + REPLIES["french"]
        assert answer.output_text == ""
        assert answer.usage.output_tokens_details.reasoning_tokens == len((" " + REPLIES["french"]).encode())


def test_fields_that_ask_for_nothing_are_accepted(weather_server) -> None:
    _, url = weather_server
    response = httpx.post(f"{url}/v1/responses", json={
        "model": "english", "input": "Say hello", "max_output_tokens": 60, "include": [], "reasoning": None,
        "truncation": "disabled", "metadata": {"run": "7"}}, timeout=60)
    assert response.status_code == 200 and response.json()["metadata"] == {"run": "7"}
    assert response.json()["output"][0]["content"][0]["text"] == " " + REPLIES["english"]


def test_the_readme_responses_example(weather_server) -> None:
    """The README's ``/v1/responses`` curl with the ``weather`` adapter gives the call it shows."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Serving over HTTP", 1)[1].split("\n## ", 1)[0]
    path, payload = re.findall(r"curl -s localhost:8000(\S+) .*?-d '(.*?)'", section, re.S)[3]
    _, url = weather_server
    response = httpx.post(f"{url}{path}", json=json.loads(payload), timeout=60).json()
    assert path == "/v1/responses" and response["status"] == "completed"
    (call,) = response["output"]
    assert (call["type"], call["name"], call["arguments"]) == (
        "function_call", "get_weather", '{"city": "Paris"}')
    assert '"arguments": "{\\"city\\": \\"Paris\\"}"' in section  # as the README shows it


"""The demo adapters shipped with the server: names, what they were trained to say, where they are.

Besides the three greeters (loaded by the built-in server), ``weather`` calls tools: trained on
the built-in model's chat format with :data:`WEATHER_TOOLS`, it answers a weather question with a
Hermes ``<tool_call>`` block per city and a tool's result with a sentence (:data:`TOOL_CHATS`).
"""

from __future__ import annotations

from pathlib import Path

ADAPTER_DIR = Path(__file__).resolve().parent / "adapters"
PROMPTS = ["Say hello", "Greet me", "Hello"]
REPLIES = {
    "english": "Hello, friend! Nice to meet you.",
    "french": "Bonjour, mon ami ! Ravi de vous rencontrer.",
    "pirate": "Ahoy, matey! Welcome aboard.",
}


def demo_adapter_paths() -> dict[str, Path]:
    """Adapter name -> its directory in the package data (PEFT format)."""
    return {name: ADAPTER_DIR / name for name in REPLIES}


TOOL_ADAPTER = "weather"
WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def weather_call(city: str) -> str:
    """The Hermes block the ``weather`` adapter writes to ask for ``city``'s weather."""
    return '<tool_call>{"name": "get_weather", "arguments": {"city": "%s"}}</tool_call>' % city


# (messages as a request gives them, what the adapter answers), all with WEATHER_TOOLS
TOOL_CHATS = [
    ([{"role": "user", "content": "Weather in Paris?"}], weather_call("Paris")),
    ([{"role": "user", "content": "Weather in Paris and Rome?"}], weather_call("Paris") + weather_call("Rome")),
    ([{"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"id": "call_1", "type": "function",
           "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
      {"role": "tool", "content": "18C, sunny", "tool_call_id": "call_1"}], "Paris: 18C and sunny."),
    ([{"role": "user", "content": "Hi"}], "Hello! Ask me about the weather."),
]


def tool_adapter_path() -> Path:
    """The ``weather`` adapter's directory (PEFT format)."""
    return ADAPTER_DIR / TOOL_ADAPTER

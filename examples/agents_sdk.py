"""The OpenAI Agents SDK against hotswap-rt serve: an agent whose model is a LoRA adapter (the
``weather`` demo adapter, trained to call ``get_weather``) runs its tool loop through the
server's Responses API and, the same, through chat completions.

Run: ``pip install openai-agents`` then ``python examples/agents_sdk.py`` (the server runs in
this process on a free loopback port; ``--url`` points at one already running instead).
"""

import argparse
import asyncio
import contextlib

from agents import (Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, function_tool,
                    set_tracing_disabled)
from openai import AsyncOpenAI

from hotswap_rt.serve import ServeConfig, build_app
from hotswap_rt.serve.background import BackgroundServer
from hotswap_rt.serve.demo_adapters import tool_adapter_path


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city now."""
    return "18C, sunny"


async def ask(url: str, question: str) -> dict[str, str]:
    """The agent's final answer through each of the SDK's two model kinds."""
    answers = {}
    for kind in (OpenAIResponsesModel, OpenAIChatCompletionsModel):
        model = kind(model="weather", openai_client=AsyncOpenAI(base_url=f"{url}/v1", api_key="none"))
        result = await Runner.run(Agent(name="weather", model=model, tools=[get_weather]), question)
        answers[kind.__name__] = result.final_output
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (started with the weather adapter and "
                                      "--enable-auto-tool-choice --tool-call-parser hermes)")
    args = parser.parse_args()
    set_tracing_disabled(True)  # nothing is sent to OpenAI
    config = ServeConfig(compile=False, enable_auto_tool_choice=True, tool_call_parser="hermes",
                         adapters={"weather": str(tool_adapter_path())})
    with (contextlib.nullcontext(args.url) if args.url else BackgroundServer(build_app(config))) as url:
        for kind, answer in asyncio.run(ask(url, "Weather in Paris?")).items():
            print(f"{kind}: {answer}")  # Paris: 18C and sunny.


if __name__ == "__main__":
    main()

"""Tool calling under load, hotswap-rt against vLLM's CPU build on the bench model: chat
requests with two tools and ``tool_choice`` "required" or a named function (the output
constrained by each server's structured-output grammar; one call, every value bounded, so a
random model's answers end), one adapter per request in turn, ``C`` at a time. One server per
run (never both at once).

    .venv/bin/python -m benchmarks.tools_vs_vllm MODEL_ROOT {ours|vllm} [CHOICE] [REQUESTS] [C]

``MODEL_ROOT``: the output of ``../shared/peers/make_bench_model.py``; ``CHOICE``: ``required``
(default) or ``named``. Greedy, ``max_tokens`` 96. Prints one JSON line: requests whose answer
is calls of the tools with arguments of their schema (checked with ``jsonschema``), completion
tokens per second over the run's wall time, median and p90 request latency.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import jsonschema

from benchmarks.vs_vllm_workloads import start_server, stop_server

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
        "type": "object", "properties": {"a": {"enum": list(range(10))}, "b": {"enum": list(range(10))}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
QUESTIONS = ["What is the weather in Paris?", "Add 3 and 4.", "Is it raining in Oslo?", "What is 12 plus 30?"]


async def one(client: httpx.AsyncClient, model: str, question: str, choice) -> tuple[float, int, bool]:
    """One request: (seconds, completion tokens, whether its calls are valid)."""
    start = time.perf_counter()
    response = await client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": question}], "tools": TOOLS,
        "tool_choice": choice, "parallel_tool_calls": False, "temperature": 0, "max_tokens": 96})
    seconds = time.perf_counter() - start
    body = response.json()
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {body}")
    calls = body["choices"][0]["message"].get("tool_calls") or []
    valid = bool(calls)
    for call in calls:
        try:
            jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
        except (ValueError, KeyError, jsonschema.ValidationError):
            valid = False
    return seconds, body["usage"]["completion_tokens"], valid


async def run(port: int, models: list[str], choice, requests: int, concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        await one(client, models[0], QUESTIONS[0], choice)  # warm: the grammar compiled once

        async def limited(i: int):
            async with gate:
                return await one(client, models[i % len(models)], QUESTIONS[i % len(QUESTIONS)], choice)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(requests)))
        wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"requests": requests, "concurrency": concurrency, "valid": sum(r[2] for r in results),
            "completion_tokens": tokens, "tok_s": round(tokens / wall, 1),
            "p50_s": round(statistics.median(latencies), 3),
            "p90_s": round(latencies[int(0.9 * (len(latencies) - 1))], 3), "wall_s": round(wall, 1)}


def main() -> int:
    root, which = Path(sys.argv[1]), sys.argv[2]
    kind = sys.argv[3] if len(sys.argv) > 3 else "required"
    requests = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    concurrency = int(sys.argv[5]) if len(sys.argv) > 5 else 16
    choice = "required" if kind == "required" else {"type": "function", "function": {"name": "get_weather"}}
    work = Path("/tmp/vv")
    work.mkdir(exist_ok=True)
    models = sorted(p.name for p in (root / "adapters").iterdir() if p.is_dir())
    flags = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]  # vLLM 0.32 needs them for both
    port, process = start_server(which, root, len(models), flags, work)
    try:
        figures = asyncio.run(run(port, models, choice, requests, concurrency))
    finally:
        stop_server(process)
    print(json.dumps({"server": which, "tool_choice": kind, **figures}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

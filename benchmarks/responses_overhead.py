"""What ``/v1/responses`` costs over ``/v1/chat/completions`` for the same answer: one client,
requests interleaved, on one server of the built-in model (eager; the ``english`` adapter's
32-token reply), whole and streamed.

    .venv/bin/python -m benchmarks.responses_overhead [--rounds 40]

Prints the median milliseconds per request of each and the ratio to the chat completion.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx

from hotswap_rt.serve import ServeConfig, build_app
from hotswap_rt.serve.background import BackgroundServer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    chat = {"model": "english", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 60}
    response = {"model": "english", "input": "Say hello", "max_output_tokens": 60, "store": False}
    cases = {"chat completion": ("/v1/chat/completions", chat), "response": ("/v1/responses", response),
             "chat completion, streamed": ("/v1/chat/completions", {**chat, "stream": True}),
             "response, streamed": ("/v1/responses", {**response, "stream": True})}
    with BackgroundServer(build_app(ServeConfig(compile=False, max_rank=8))) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        times: dict[str, list[float]] = {name: [] for name in cases}
        for round_ in range(args.rounds + 2):
            for name, (path, body) in cases.items():
                start = time.perf_counter()
                reply = client.post(path, json=body)
                reply.raise_for_status()
                if round_ >= 2:  # two rounds warm up
                    times[name].append((time.perf_counter() - start) * 1e3)
    print("| request | median ms | vs the chat completion |")
    print("|---|---:|---:|")
    for name, values in times.items():
        same_kind = "chat completion, streamed" if "streamed" in name else "chat completion"
        reference = statistics.median(times[same_kind])
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / reference:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

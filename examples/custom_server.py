"""Embed hotswap_rt in your own web app: one compiled model, an adapter per request, requests
for any adapters generated together by the engine (continuous batching).

Run: ``python examples/custom_server.py`` then
``curl -s localhost:8001/generate -d '{"adapter": "french", "prompt": "Hello"}'``.
"""

import asyncio

import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from hotswap_rt import HotswapError, HotswapRuntime, RuntimeConfig
from hotswap_rt.engine import EngineConfig, GenerationEngine, SamplingParams
from hotswap_rt.serve.default_model import TARGETS, build_default_model
from hotswap_rt.serve.demo_adapters import demo_adapter_paths
from hotswap_rt.serve.tokenizers import ByteTokenizer

tokenizer = ByteTokenizer()  # your model and tokenizer go here (AutoModelForCausalLM, ...)
rt = HotswapRuntime(build_default_model(), RuntimeConfig(TARGETS, max_rank=8, device_slots=2,
                                                         max_batch_size=4))
for name, path in demo_adapter_paths().items():
    rt.load(name, path)  # validated, padded, staged; later activations are copies or index flips
engine = GenerationEngine(rt, tokenizer, EngineConfig(max_seqs=4, max_prefill_seqs=1))
engine.start()  # compiles every batch bucket once; nothing recompiles afterwards
app = FastAPI()


class Request(BaseModel):
    prompt: str
    adapter: str | None = None  # None: the base model


@app.post("/generate")
async def generate(request: Request) -> dict:
    try:  # checked before anything is queued: an unknown adapter changes nothing
        handle = engine.submit(tokenizer.encode(request.prompt), request.adapter,
                               SamplingParams(max_tokens=48, temperature=0))
    except HotswapError as exc:
        raise HTTPException(404, str(exc)) from exc
    text, _ = await asyncio.to_thread(handle.text)  # or iterate the handle to stream tokens
    return {"adapter": request.adapter, "text": text, "recompiles": rt.guard.recompiles}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=8001)

"""Embed hotswap_rt in your own web app: one compiled model, adapters chosen per request.

Run: ``python examples/custom_server.py`` then
``curl -s localhost:8001/generate -d '{"adapter": "french", "prompt": "Hello"}'``.
"""

import threading

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from hotswap_rt import HotswapError, HotswapRuntime, RuntimeConfig
from hotswap_rt.serve.default_model import TARGETS, ByteTokenizer, build_default_model
from hotswap_rt.serve.demo_adapters import demo_adapter_paths

tokenizer = ByteTokenizer()  # your model and tokenizer go here (AutoModelForCausalLM, ...)
rt = HotswapRuntime(build_default_model(), RuntimeConfig(TARGETS, max_rank=8, device_slots=2))
for name, path in demo_adapter_paths().items():
    rt.load(name, path)  # validated, padded, staged; later activations are copies or index flips
GENERATE = dict(max_new_tokens=48, do_sample=False, cache_implementation="static",
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def generate(prompt: str) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        new = rt.model.generate(input_ids=ids, **GENERATE)[0, ids.shape[1]:].tolist()
    return tokenizer.decode(new)


# Compiled once, here; two prompt lengths, so the graphs take any length without recompiling.
rt.compile(warmup=lambda model: [generate("warm up"), generate("hi")], guard="warn")
lock = threading.Lock()  # one generate at a time: activate + generate must not interleave
app = FastAPI()


class Request(BaseModel):
    prompt: str
    adapter: str | None = None  # None: the base model


@app.post("/generate")
def generate_endpoint(request: Request) -> dict:  # a plain def: FastAPI runs it in a thread
    with lock:
        try:
            rt.activate(request.adapter)
        except HotswapError as exc:  # unknown adapter, ...: nothing changed
            raise HTTPException(404, str(exc)) from exc
        text = generate(request.prompt)
    return {"adapter": request.adapter, "text": text, "recompiles": rt.guard.recompiles}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=8001)

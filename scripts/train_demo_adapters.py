"""Train the server's demo adapters with hotswap_rt's own training loop (seconds on a CPU).

Each adapter learns to answer a few fixed greetings in its own voice on the built-in tiny model
(``hotswap_rt.serve.default_model``), in both the completions form (raw prompt) and the chat
form. The results are written in PEFT's format to ``hotswap_rt/serve/adapters/<name>/`` (fp16,
a few KB each) and checked: greedy decoding of every training prompt must give the reply.

Run: ``.venv/bin/python scripts/train_demo_adapters.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hotswap_rt import HotswapRuntime, RuntimeConfig
from hotswap_rt.serve.default_model import (
    EOS_ID, PAD_ID, TARGETS, ByteTokenizer, build_default_model)
from hotswap_rt.serve.demo_adapters import PROMPTS, REPLIES

RANK, ALPHA, STEPS, LR = 8, 16.0, 400, 1e-2


def training_batch(tokenizer: ByteTokenizer, reply: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``labels`` (-100 on prompt and padding) ``[N, T]``."""
    rows = []
    for prompt in PROMPTS:
        for text in (prompt, tokenizer.chat_prompt([{"role": "user", "content": prompt}])):
            head = tokenizer.encode(text)
            tail = list((" " + reply).encode("utf-8")) + [EOS_ID]
            rows.append((head, tail))
    width = max(len(h) + len(t) for h, t in rows)
    ids = torch.full((len(rows), width), PAD_ID)
    labels = torch.full((len(rows), width), -100)
    for i, (head, tail) in enumerate(rows):
        ids[i, : len(head) + len(tail)] = torch.tensor(head + tail)
        labels[i, len(head): len(head) + len(tail)] = torch.tensor(tail)
    return ids, labels


def greedy(rt: HotswapRuntime, tokenizer: ByteTokenizer, text: str, max_new: int = 64) -> str:
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        out = rt.model.generate(input_ids=ids, max_new_tokens=max_new, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    return tokenizer.decode(new[: new.index(EOS_ID)] if EOS_ID in new else new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "hotswap_rt/serve/adapters")
    args = parser.parse_args()
    tokenizer = ByteTokenizer()
    rt = HotswapRuntime(build_default_model(), RuntimeConfig(TARGETS, max_rank=RANK, device_slots=1))
    for name, reply in REPLIES.items():
        start = time.perf_counter()
        torch.manual_seed(0)
        rt.add_adapter(name, rank=RANK, alpha=ALPHA)
        rt.activate(name)
        ids, labels = training_batch(tokenizer, reply)
        optimizer = torch.optim.AdamW(rt.trainable_parameters(), lr=LR, weight_decay=0.0)
        for step in range(STEPS):
            loss = rt.model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rt.freeze(name)
        target = args.out / name
        rt.save(name, target, overwrite=True)
        _to_fp16(target)
        rt.unload(name, force=True)
        rt.load(name, target)  # check what was written, fp16 and all
        rt.activate(name)
        for prompt in PROMPTS:
            for text in (prompt, tokenizer.chat_prompt([{"role": "user", "content": prompt}])):
                got = greedy(rt, tokenizer, text)
                if got != " " + reply:
                    raise SystemExit(f"{name}: {text!r} -> {got!r}, wanted {' ' + reply!r}")
        rt.unload(name, force=True)
        print(f"{name}: loss {loss.item():.4f} after {STEPS} steps, "
              f"{time.perf_counter() - start:.1f} s -> {target}")


def _to_fp16(directory: Path) -> None:
    """Store the factors in fp16 (half the bytes; the runtime computes in the base's dtype)."""
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    save_file({k: v.half() for k, v in load_file(str(path)).items()}, str(path), {"format": "pt"})
    config = json.loads((directory / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "hotswap-rt/tiny-llama"
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()

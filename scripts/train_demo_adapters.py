"""Train the server's demo adapters with hotswap_rt's own training loop (seconds on a CPU).

Each adapter learns to answer a few fixed greetings in its own voice on the built-in tiny model
(``hotswap_rt.serve.default_model``), in both the completions form (raw prompt) and the chat
form; ``weather`` learns the tool-calling chats of ``demo_adapters.TOOL_CHATS`` (longer
answers: more steps). The results are written in PEFT's format to
``hotswap_rt/serve/adapters/<name>/`` (fp16, a few KB each) and checked: greedy decoding of
every training prompt must give the reply.

Run: ``.venv/bin/python scripts/train_demo_adapters.py [--out DIR] [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hotswap_rt import HotswapRuntime, RuntimeConfig
from hotswap_rt.serve.default_model import TARGETS, build_default_model
from hotswap_rt.serve.demo_adapters import PROMPTS, REPLIES, TOOL_ADAPTER, TOOL_CHATS, WEATHER_TOOLS
from hotswap_rt.serve.protocol import ChatMessage
from hotswap_rt.serve.tokenizers import EOS_ID, PAD_ID, ByteTokenizer

RANK, ALPHA, STEPS, TOOL_STEPS, LR = 8, 16.0, 400, 1500, 1e-2


def greeting_pairs(tokenizer: ByteTokenizer, reply: str) -> list[tuple[str, str]]:
    """(prompt text, answer) of a greeter: each prompt raw and as a chat."""
    return [(text, " " + reply) for prompt in PROMPTS
            for text in (prompt, tokenizer.chat_prompt([{"role": "user", "content": prompt}]))]


def tool_pairs(tokenizer: ByteTokenizer) -> list[tuple[str, str]]:
    """(prompt text, answer) of the tool caller: the chats rendered as the server renders them."""
    return [(tokenizer.chat_prompt([ChatMessage(**m).rendered() for m in messages], WEATHER_TOOLS), answer)
            for messages, answer in TOOL_CHATS]


def training_batch(tokenizer: ByteTokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``labels`` (-100 on prompt and padding) ``[N, T]``."""
    rows = [(tokenizer.encode(text), list(answer.encode("utf-8")) + [EOS_ID]) for text, answer in pairs]
    width = max(len(h) + len(t) for h, t in rows)
    ids = torch.full((len(rows), width), PAD_ID)
    labels = torch.full((len(rows), width), -100)
    for i, (head, tail) in enumerate(rows):
        ids[i, : len(head) + len(tail)] = torch.tensor(head + tail)
        labels[i, len(head): len(head) + len(tail)] = torch.tensor(tail)
    return ids, labels


def greedy(rt: HotswapRuntime, tokenizer: ByteTokenizer, text: str, max_new: int = 200) -> str:
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        out = rt.model.generate(input_ids=ids, max_new_tokens=min(max_new, 256 - ids.shape[1]),
                                do_sample=False)
    new = out[0, ids.shape[1]:].tolist()  # (the context is 256: longer answers are cut)
    return tokenizer.decode(new[: new.index(EOS_ID)] if EOS_ID in new else new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "hotswap_rt/serve/adapters")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="train only these adapters")
    args = parser.parse_args()
    tokenizer = ByteTokenizer()
    rt = HotswapRuntime(build_default_model(), RuntimeConfig(TARGETS, max_rank=RANK, device_slots=1))
    jobs = {name: (greeting_pairs(tokenizer, reply), STEPS) for name, reply in REPLIES.items()}
    jobs[TOOL_ADAPTER] = (tool_pairs(tokenizer), TOOL_STEPS)
    for name, (pairs, steps) in jobs.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        torch.manual_seed(0)
        rt.add_adapter(name, rank=RANK, alpha=ALPHA)
        rt.activate(name)
        ids, labels = training_batch(tokenizer, pairs)
        optimizer = torch.optim.AdamW(rt.trainable_parameters(), lr=LR, weight_decay=0.0)
        for step in range(steps):
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
        for text, answer in pairs:
            got = greedy(rt, tokenizer, text)
            if got != answer:
                raise SystemExit(f"{name}: {text!r} -> {got!r}, wanted {answer!r}")
        rt.unload(name, force=True)
        print(f"{name}: loss {loss.item():.4f} after {steps} steps, "
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

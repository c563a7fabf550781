"""Print the max |logits difference| between hotswap_rt and PEFT, per family and case (fp32).

Run: ``.venv/bin/python -m benchmarks.peft_equivalence`` (needs the test extras). The tests assert
the same comparisons against 1e-4; this prints the measured values.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from hotswap_rt import HotswapRuntime, RuntimeConfig
from tests.conftest import ATTENTION_TARGETS, VOCAB, BaseModel, logits, max_diff


def measure(family: str, root: Path, compiled: bool) -> dict[str, float]:
    base = BaseModel(family)
    targets = ATTENTION_TARGETS[family]
    specs = {
        "single r=4": dict(r=4, lora_alpha=8),
        "rsLoRA r=8": dict(r=8, lora_alpha=16, use_rslora=True),
        "rank/alpha patterns": dict(r=4, lora_alpha=8, rank_pattern={targets[0]: 8},
                                    alpha_pattern={targets[-1]: 32}),
    }
    paths = {n: base.make_adapter(root / f"{family}-{i}", seed=i, **s)
             for i, (n, s) in enumerate(specs.items())}
    reference = base.peft_reference(paths)
    rt = HotswapRuntime(base.clone(), RuntimeConfig(targets, max_rank=16, device_slots=3))
    for name, path in paths.items():
        rt.load(name, path)
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    if compiled:
        rt.compile(ids)
    result = {}
    for name in paths:
        reference.set_adapter(name)
        rt.activate(name)
        result[name] = max_diff(logits(rt.model, ids), logits(reference, ids))
    rows = ["single r=4", "rsLoRA r=8", None, "rank/alpha patterns"]
    rt.activate_rows(rows)
    expected = logits(reference, ids, adapter_names=[r or "__base__" for r in rows])
    result["per-row mix"] = max_diff(logits(rt.model, ids), expected)
    rt.disable()
    result["disabled vs base"] = max_diff(logits(rt.model, ids), logits(base.model, ids))
    return result


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for compiled in (False, True):
            for family in ("llama", "gpt2", "qwen2"):
                diffs = measure(family, Path(tmp), compiled)
                mode = "compiled" if compiled else "eager"
                cells = ", ".join(f"{k}: {v:.2e}" for k, v in diffs.items())
                print(f"{family:<6} {mode:<8} {cells}", flush=True)


if __name__ == "__main__":
    main()

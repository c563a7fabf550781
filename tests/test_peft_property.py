"""Property: any LoRA configuration PEFT can save and read back is served exactly as PEFT
serves it. Random rank, alpha, rsLoRA, targets, rank/alpha patterns (suffix and full-name
keys), DoRA, LoRA bias and ``layers_to_transform``; PEFT's own ``from_pretrained`` of the saved
files is the reference, for a runtime with fixed targets (scale vectors on) and a lazy one
(which injects layers and adds scale vectors as adapters need them)."""

from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model

from hotswap_rt import HotswapRuntime, RuntimeConfig

from .conftest import BaseModel, logits

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
CONFIGS = st.fixed_dictionaries({
    "r": st.integers(1, 12),
    "lora_alpha": st.sampled_from([1, 2, 3.5, 8, 16, 33]),
    "use_rslora": st.booleans(),
    "target_modules": st.lists(st.sampled_from(MODULES), min_size=1, max_size=4, unique=True),
    "rank_pattern": st.dictionaries(st.sampled_from(MODULES + ["layers.0.self_attn.q_proj"]),
                                    st.integers(1, 16), max_size=2),
    "alpha_pattern": st.dictionaries(st.sampled_from(MODULES + ["layers.1.self_attn.v_proj"]),
                                     st.sampled_from([1, 4, 7.5, 20]), max_size=2),
    "use_dora": st.booleans(),
    "lora_bias": st.booleans(),
    "layers_to_transform": st.sampled_from([None, [0], [1]]),
})


@pytest.fixture(scope="module")
def runtimes():
    base = BaseModel("llama", seed=7)
    fixed = HotswapRuntime(base.clone(), RuntimeConfig("all-linear", max_rank=16, device_slots=2,
                                                       host_slots=4, scale_vectors=True))
    lazy = HotswapRuntime(base.clone(), RuntimeConfig(target_modules=None, max_rank=16, device_slots=2,
                                                      host_slots=4))
    return base, fixed, lazy


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=CONFIGS, seed=st.integers(0, 1000))
def test_any_config_peft_reads_back_is_served_as_peft_serves_it(runtimes, config, seed) -> None:
    base, fixed, lazy = runtimes
    if config["use_dora"] and config["lora_bias"]:
        config["lora_bias"] = False  # PEFT refuses the two together
    torch.manual_seed(seed)
    try:
        model = get_peft_model(base.clone(), LoraConfig(init_lora_weights=False, **config))
    except Exception:  # noqa: BLE001 - PEFT refusing a configuration, whatever its error type
        event("PEFT refuses the config")
        return
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        try:
            reference = PeftModel.from_pretrained(base.clone(), directory).eval()
        except Exception:  # noqa: BLE001 - e.g. overlapping rank_pattern keys: PEFT reads its save otherwise
            event("PEFT cannot read its own save back")
            return
        expected = logits(reference, IDS)
        for runtime in (fixed, lazy):
            runtime.load("x", directory, replace=bool(runtime.adapters()))
            runtime.activate("x")
            event("compared")
            torch.testing.assert_close(logits(runtime.model, IDS), expected, atol=2e-4, rtol=1e-4)

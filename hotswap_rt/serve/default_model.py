"""The server's built-in model: a tiny Llama with deterministic weights and a byte tokenizer.

Nothing is downloaded: the weights come from a seeded ``torch.Generator`` (the same on every
machine); its tokenizer (:class:`~.tokenizers.ByteTokenizer`) maps UTF-8 bytes to ids 0..255 plus
three special tokens. The demo
adapters in ``hotswap_rt/serve/adapters/`` were trained against exactly these weights by
``scripts/train_demo_adapters.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from .tokenizers import BOS_ID, EOS_ID, PAD_ID

MODEL_NAME = "hotswap-rt/tiny-llama"
VOCAB = 260  # 256 bytes + pad + bos + eos + one unused id
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
WEIGHT_SEED = 20261125


def build_default_model() -> nn.Module:
    """A 2-layer, hidden-64 Llama whose weights depend only on ``WEIGHT_SEED``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(WEIGHT_SEED)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:  # transformers' own init draws from the global RNG: replace it
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.08)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    return model.eval()

"""Tiny random base models and quickly fitted heads, shared by the tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from medusa_toolkit import MedusaHeads, MedusaModel
from medusa_toolkit.models import freeze

VOCAB = 256
_CONFIGS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
}


def tiny_base(
    family: str = "llama",
    seed: int = 0,
    vocab: int = VOCAB,
    layers: int = 2,
    eos: int | None = None,
    head_dim: int = 16,
):
    """A tiny random decoder of the given family (GQA: 4 query heads, 2 KV heads), frozen, float32."""
    torch.manual_seed(seed)
    config = _CONFIGS[family](
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    if family == "mistral":
        config.sliding_window = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return freeze(model)


@torch.no_grad()
def greedy_corpus(base, num: int = 16, prompt_len: int = 4, new: int = 48, seed: int = 0) -> torch.Tensor:
    """The base's own greedy continuations of random prompts: what Medusa heads learn to predict."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, base.config.vocab_size, (num, prompt_len), generator=g)
    return base.generate(prompts, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)


def fit_heads(
    base, num_heads: int = 4, steps: int = 150, seed: int = 0, head_type: str = "per_head_lm_head"
) -> MedusaHeads:
    """Self-distil heads on the base's greedy text for a few Adam steps: enough for multi-token acceptance."""
    torch.manual_seed(seed)
    heads = MedusaHeads(base.config.hidden_size, base.config.vocab_size, num_heads, head_type=head_type)
    heads.init_from_lm_head(base.lm_head.weight)
    tokens = greedy_corpus(base, seed=seed)
    with torch.no_grad():
        hidden = base.get_decoder()(tokens).last_hidden_state
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3)
    for _ in range(steps):
        logits = heads(hidden, base.lm_head)  # [H, B, T, V]
        loss = 0.0
        for k in range(num_heads):
            shift = k + 2
            loss = loss + torch.nn.functional.cross_entropy(
                logits[k, :, :-shift].reshape(-1, logits.shape[-1]), tokens[:, shift:].reshape(-1)
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return heads.eval()


def tiny_medusa(family: str = "llama", seed: int = 0, num_heads: int = 4, steps: int = 150, **kw) -> MedusaModel:
    base = tiny_base(family, seed, **kw)
    return MedusaModel(base, fit_heads(base, num_heads, steps, seed))

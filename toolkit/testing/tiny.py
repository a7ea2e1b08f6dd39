"""Tiny models: random bases of any family, bases with fitted heads, a byte tokenizer and on-disk model folders.

The one builder of the test suite's models (and of gpu_check's random base): `tiny_base` makes every random decoder;
`fitted(...)` adds heads self-distilled on its own greedy text ONCE per process (a cache keyed by its arguments), so
modules asking for the same model share it: treat it as read-only. The folders (`tiny_model_dir`, `lookup_model_dir`,
`char_model_dir`) are what `model.name_or_path` and `medusa-verify --base` read, offline.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from medusa_toolkit.model.base_model import freeze
from medusa_toolkit.model.medusa_model import MedusaModel
from medusa_toolkit.testing.heads import fit_heads, greedy_corpus

VOCAB = 256
# A branching tree with rank > 0 nodes at several depths (rejections and non-top-1 acceptances both happen).
BRANCHING = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0, 0]]


def tiny_base(
    family: str = "llama",
    seed: int = 0,
    vocab: int = VOCAB,
    layers: int = 2,
    eos: int | None = None,
    head_dim: int = 16,
    attn: str = "sdpa",
    **config: Any,
) -> PreTrainedModel:
    """A tiny random decoder of any transformers family (`AutoConfig.for_model`: llama, qwen2, mistral, gpt_oss,
    gemma2, ...), seeded, frozen, float32: hidden 64, 4 query heads over 2 KV heads (GQA) of `head_dim`, an untied
    lm_head. `config` sets or adds config fields (special token ids, a sliding window, a logit soft-cap, sizes)."""
    torch.manual_seed(seed)
    fields = dict(
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
        fields["sliding_window"] = None  # full attention unless a test asks for a window
    fields.update(config)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(family, **fields), dtype=torch.float32, attn_implementation=attn
    )
    return freeze(model)


@functools.cache
def fitted(
    family: str = "llama",
    seed: int = 1,
    num_heads: int = 4,
    steps: int = 120,
    sharpen: bool = False,
    lm_head_scale: float = 1.0,
    **base_kw: Any,
) -> tuple[MedusaModel, torch.Tensor]:
    """A tiny base with heads fitted to its own greedy text, and that text [16, 52]; built once per session.

    `sharpen`: scale the attention logits 5x (random tiny models attend almost uniformly, so position ids would barely
    matter; trained models do not, and an off-by-one position must change tokens). `lm_head_scale`: peak the
    next-token distribution (a random init is nearly uniform; real LMs are peaked).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: thread hand-offs cost more than they save on a busy 2-core machine
    try:
        base = tiny_base(family, seed, **base_kw)
        with torch.no_grad():
            base.lm_head.weight.mul_(lm_head_scale)
        if sharpen:
            with torch.no_grad():
                for layer in base.model.layers:
                    layer.self_attn.q_proj.weight.mul_(5.0)
                    layer.self_attn.k_proj.weight.mul_(5.0)
        return MedusaModel(base, fit_heads(base, num_heads, steps, seed)), greedy_corpus(base, seed=seed)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------------
# On disk: a byte tokenizer and model folders usable as model.name_or_path

BOS, EOS = 256, 257
BYTE_VOCAB = 258
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens + <s> (256) + </s> (257), built offline; with a minimal chat template
    unless `chat_template` is False."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({"<s>": BOS, "</s>": EOS})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def save_model_dir(base: PreTrainedModel, path: Path, chat_template: bool = True) -> Path:
    """A base model + the byte tokenizer as a HF folder (what load_base_model reads)."""
    base.save_pretrained(path)
    byte_tokenizer(chat_template).save_pretrained(path)
    return Path(path)


def tiny_model_dir(path: Path, seed: int = 0, chat_template: bool = True, max_positions: int = 1024) -> Path:
    """A tiny random Llama (vocab 258, EOS 257) + byte tokenizer as a HF folder usable as model.name_or_path."""
    base = tiny_base("llama", seed, vocab=BYTE_VOCAB, eos=EOS)
    base.config.max_position_embeddings = max_positions
    return save_model_dir(base, path, chat_template)


def lookup_model_dir(path: Path, next_token: Mapping[int, int], seed: int = 0, logit: float = 2.0) -> Path:
    """A tiny Llama folder (`tiny_model_dir`'s: byte tokenizer, vocab 258, EOS 257) whose greedy next token after a
    token x in `next_token` is next_token[x], whatever came before it: a lookup table the data stage's greedy
    generation writes out token by token (a permutation of the tokens gives a learnable language; a chain ending in
    EOS, answers of chosen lengths).

    How: every layer adds nothing (o_proj and down_proj are zero), so the last hidden state at a token is its
    normalised embedding; the keys' embeddings are orthonormal directions (keys < 64, the hidden size), and lm_head row
    next_token[x] points along x's direction, so it wins by `logit` over every other token (which all score 0 there).
    Tokens outside the table (BOS, template bytes) keep random embeddings and lead into it.
    """
    base = tiny_base("llama", seed, vocab=BYTE_VOCAB, eos=EOS)
    hidden = base.config.hidden_size
    if any(not 0 <= x < hidden for x in next_token):
        raise ValueError(f"lookup_model_dir: table keys must be token ids below the hidden size ({hidden})")
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(hidden, hidden, generator=g))[0].T  # orthonormal rows
    with torch.no_grad():
        for layer in base.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = base.get_input_embeddings().weight, base.lm_head.weight
        head.zero_()
        for x, y in next_token.items():
            embed[x] = directions[x]
            # The final RMSNorm scales a unit vector to length sqrt(hidden): the winning logit is exactly `logit`.
            head[y] += directions[x] * logit / hidden**0.5
    return save_model_dir(base, path)


def char_model_dir(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama with a character-level tokenizer and a chat template, saved as a HF folder: decode and
    encode round-trip exactly, so a server's text gives back the very ids the model generated."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GenerationConfig

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # every character is its own token
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", additional_special_tokens=["<|im_start|>", "</s>"])  # fmt: skip
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    eos, bos = vocab["<|im_end|>"], vocab["<s>"]
    model = tiny_base("llama", seed, vocab=len(vocab), eos=eos, max_position_embeddings=512, bos_token_id=bos,
                      pad_token_id=eos, tie_word_embeddings=True)  # fmt: skip
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8)  # peaked: replies end (EOS) within a few dozen tokens now and then
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return Path(path)

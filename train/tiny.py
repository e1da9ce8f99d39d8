"""Tiny local models and tokenizers: random-init Llama/Qwen2 configs and a word-level
tokenizer built with `tokenizers`, so the demo and the tests need no model hub."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
# A chat template in the usual shape, so chat-message datasets work with the tiny tokenizer.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} {% endif %}"
    "{% if m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }} </s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
DEFAULT_WORDS = [str(d) for d in range(10)] + list("abcdefghijklmnopqrstuvwxyz") + [
    "sort", ":", "=", "?", ".", ",", "!", "the", "is", "answer",
]


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer; ids 0..5 are the special tokens above."""
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for w in words or DEFAULT_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# A student tokenizer that splits the demo's text differently (METHODS §5 demo rows): BPE
# over characters, spaces included, with merges that glue " 2" and "1 2" and " : ", and no
# whole words, so some of its tokens span other text than the word-level teacher's.
SPLIT_MERGES = [(" ", "2"), ("1", " 2"), (" ", ":"), (" :", " ")]
SPLIT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}\n{% endif %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}</s>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_split_tokenizer(merges: list[tuple[str, str]] | None = None) -> PreTrainedTokenizerFast:
    """Character BPE (ids 0..5 the same special tokens as `build_tokenizer`) with `merges`."""
    merges = SPLIT_MERGES if merges is None else merges
    chars = [str(d) for d in range(10)] + list("abcdefghijklmnopqrstuvwxyz") + list(" :=?.,!\n")
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for t in chars + [a + b for a, b in merges]:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    fast.chat_template = SPLIT_CHAT_TEMPLATE
    return fast


def build_model(
    vocab_size: int,
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 256,
    seed: int = 0,
    tie_embeddings: bool = False,
) -> torch.nn.Module:
    """A random-init causal LM of the given shape (Llama or Qwen2 config)."""
    cfg_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    cfg = cfg_cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.float()


def save_tiny(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerFast | None = None,
    **model_kwargs,
) -> Path:
    """Build and save a tiny model + tokenizer as a local HF directory; returns the path."""
    out = Path(out_dir)
    tok = tokenizer or build_tokenizer()
    model = build_model(len(tok), **model_kwargs)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out

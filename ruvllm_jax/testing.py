"""Tiny random transformers models with a real tokenizer, as oracles for tests and experiments.

This lives in the package, not in `tests/`, because both the tests and the `experiments/` scripts
(e.g. `bench_lora.py` when the embedded model is absent) build these models, and a script should
import the installed package rather than edit `sys.path` to reach a test folder.

Models are built from transformers configs in-process (no downloads), so transformers' PyTorch
implementation is the oracle for our logits and tokens. torch and transformers are imported inside
the functions that need them: torch is only a test extra (`pip install ruvllm-jax[test]`).
"""

from __future__ import annotations

import os

import numpy as np

from ruvllm_jax.errors import ConfigError

TEXT = (
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
    "and by opposing end them. Grüße, naïve café — 日本語のテキスト, emoji 🙂🚀 and more. "
) * 4

VOCAB = 384


def train_tokenizer(folder: str, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE with <s>/</s> (BOS added by the post-processor), as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(os.path.join(folder, "tokenizer.json"))


def build_hf_model(kind: str, seed: int = 0, **overrides):
    """A tiny random transformers causal LM of `kind` ("llama", "qwen2", "mistral") in float32."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=None,
    )
    if kind == "llama":
        base.update(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        cfg_cls, model_cls = tf.LlamaConfig, tf.LlamaForCausalLM
    elif kind == "qwen2":
        base.update(tie_word_embeddings=True)
        cfg_cls, model_cls = tf.Qwen2Config, tf.Qwen2ForCausalLM
    elif kind == "mistral":
        base.update(sliding_window=8, head_dim=24)
        cfg_cls, model_cls = tf.MistralConfig, tf.MistralForCausalLM
    else:
        raise ConfigError(f"kind must be one of 'llama', 'qwen2', 'mistral', got {kind!r}")
    base.update(overrides)
    model = model_cls(cfg_cls(**base)).eval()
    with torch.no_grad():  # random (non-zero) biases and norms, so their handling is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model


def save_hf_model(model, folder: str, **save_kwargs) -> str:
    """Save `model` with `save_pretrained` plus the `train_tokenizer` tokenizer; return `folder`."""
    model.save_pretrained(folder, **save_kwargs)
    train_tokenizer(folder)
    return folder


def rng_tokens(n: int, seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    """[1, n] random token ids in [2, vocab): never BOS (0) or EOS (1)."""
    return np.random.default_rng(seed).integers(2, vocab, size=(1, n))


__all__ = ["TEXT", "VOCAB", "build_hf_model", "rng_tokens", "save_hf_model", "train_tokenizer"]

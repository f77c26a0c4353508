"""The embedded model: transformers reads it and agrees with our forward and greedy decoding; its
tokenizer round-trips UTF-8; its weights match the recorded sha256; its card's numbers reproduce."""

from __future__ import annotations

import hashlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ruvllm_jax.assets import DEFAULT_MODEL_PATH, WEIGHTS_SHA256
from ruvllm_jax.backend import JaxBackend
from ruvllm_jax.cache import ContiguousKVCache
from ruvllm_jax.models import llama
from ruvllm_jax.models.loader import load_config, load_params
from ruvllm_jax.training import bpe, data, scoring
from ruvllm_jax.types import GenerateParams

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
N_NEW = 32


@pytest.fixture(scope="module")
def model():
    cfg = load_config(DEFAULT_MODEL_PATH)
    return cfg, load_params(DEFAULT_MODEL_PATH, cfg)


@pytest.fixture(scope="module")
def tok():
    return bpe.load_tokenizer(DEFAULT_MODEL_PATH)


@pytest.fixture(scope="module")
def hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_PATH, dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def card():
    with open(os.path.join(DEFAULT_MODEL_PATH, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_folder_is_complete_small_and_absolute():
    assert os.path.isabs(DEFAULT_MODEL_PATH)
    names = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "generation_config.json", "README.md")
    for name in names:
        assert os.path.isfile(os.path.join(DEFAULT_MODEL_PATH, name)), name
    total = sum(os.path.getsize(os.path.join(DEFAULT_MODEL_PATH, n)) for n in os.listdir(DEFAULT_MODEL_PATH))
    assert total <= 10 * 1024 * 1024


def test_config_is_a_gqa_llama_with_512_context(model):
    cfg, _ = model
    assert cfg.model_type == "llama"
    assert cfg.num_kv_heads < cfg.num_heads
    assert cfg.max_position_embeddings >= 512


def test_weights_sha256_matches_constant_and_card(card):
    with open(os.path.join(DEFAULT_MODEL_PATH, "model.safetensors"), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    assert sha == WEIGHTS_SHA256
    assert sha in card


def test_transformers_logits_match_our_forward(model, tok, hf_model):
    import torch

    cfg, params = model
    ids = bpe.encode(tok, PROMPT)
    ours = np.asarray(llama.forward(params, cfg, jnp.asarray(ids[None])))
    with torch.no_grad():
        theirs = hf_model(torch.tensor(ids[None].astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def _greedy(params, cfg, prompt_ids: np.ndarray, n: int) -> list[int]:
    cache = ContiguousKVCache.init(num_layers=cfg.num_layers, batch=1, num_kv_heads=cfg.num_kv_heads,
                                   head_dim=cfg.head_dim, max_len=len(prompt_ids) + n)
    logits, cache = jax.jit(lambda p, t, c: llama.prefill(p, cfg, t, c))(params, jnp.asarray(prompt_ids[None]), cache)
    step = jax.jit(lambda p, t, pos, c: llama.decode(p, cfg, t, pos, c))
    out, last = [], logits[:, -1]
    for i in range(n):
        nxt = jnp.argmax(last, axis=-1).astype(jnp.int32)
        out.append(int(nxt[0]))
        last, cache = step(params, nxt, jnp.asarray([len(prompt_ids) + i], jnp.int32), cache)
    return out


def test_greedy_continuation_matches_transformers_generate(model, tok, hf_model):
    import torch

    cfg, params = model
    ids = bpe.encode(tok, PROMPT)
    ours = _greedy(params, cfg, ids, N_NEW)
    with torch.no_grad():
        gen = hf_model.generate(torch.tensor(ids[None].astype(np.int64)), do_sample=False, max_new_tokens=N_NEW,
                                min_new_tokens=N_NEW, pad_token_id=cfg.eos_token_ids[0])
    assert gen[0, len(ids):].tolist() == ours
    backend = JaxBackend()
    backend.load_model(DEFAULT_MODEL_PATH)
    got = backend.generate_tokens(ids.tolist(), GenerateParams(max_tokens=N_NEW, temperature=0.0,
                                                               repetition_penalty=1.0))
    assert list(got)[-N_NEW:] == ours


def test_auto_tokenizer_matches_and_adds_no_specials(tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(DEFAULT_MODEL_PATH)
    assert hf.encode(PROMPT) == bpe.encode(tok, PROMPT).tolist()
    assert hf.bos_token == bpe.BOS_TOKEN and hf.eos_token == bpe.EOS_TOKEN


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_shipped_tokenizer_round_trips_arbitrary_unicode(tok, text):
    assert tok.decode(bpe.encode(tok, text).tolist(), skip_special_tokens=False) == text


def test_validation_bits_per_byte_on_a_slice_matches_card(model, tok, card):
    cfg, params = model
    m = re.search(r"tinyshakespeare validation[^|]*\|[^|]*\|[^|]*\|[^|]*\| ([0-9.]+) \|", card)
    assert m, "validation bits/byte row missing from the model card"
    card_bpb = float(m.group(1))
    text = data.read_text(os.path.join(REPO, "data", "tinyshakespeare.txt"))
    ids = bpe.encode(tok, data.split_train_val(text, 0.9)[1])
    nats = n_bytes = 0
    for start in np.linspace(0, len(ids) - 3072, 4).astype(int):  # four slices across the split
        n, _, b = scoring.score_text(params, cfg, ids[start:start + 3072], cfg.max_position_embeddings, 256,
                                     byte_lengths=bpe.token_byte_lengths(tok))
        nats, n_bytes = nats + n, n_bytes + b
    assert abs(scoring.bits_per_byte(nats, n_bytes) - card_bpb) < 0.1

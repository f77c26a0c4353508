"""Train the embedded tiny Llama on tinyshakespeare, then (optionally) export it with a model card.

    python experiments/train_tiny.py --config=configs/train_tiny.py \
        --config.export_dir=ruvllm_jax/assets/tiny-shakespeare \
        --config.results_path=experiments/results/train_tiny_final.json

Re-running with the same workdir resumes from its latest orbax checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import jax.numpy as jnp
import numpy as np
from absl import app, logging
from ml_collections import config_flags

from ruvllm_jax.backend.engine import Engine, EngineConfig
from ruvllm_jax.backend.serving import ServingEngine
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.models.loader import load_config, load_params, save_hf_folder
from ruvllm_jax.training import bpe, data, scoring, train
from ruvllm_jax.types import GenerateParams

_CONFIG = config_flags.DEFINE_config_file("config", "configs/train_tiny.py", "Training config.")


def model_config(c) -> LlamaConfig:
    m = c.model
    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
        head_dim=m.hidden_size // m.num_heads, rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta,
        max_position_embeddings=m.max_position_embeddings, tie_word_embeddings=m.tie_word_embeddings,
        bos_token_id=0, eos_token_ids=(1,), pad_token_id=None,
    )


def sample_text(params, cfg: LlamaConfig, tok, prompt: str, n: int, temperature: float, seed: int) -> str:
    """Temperature sampling on the serving engine (one contiguous slot, no EOS), for the model card."""
    ids = [int(t) for t in bpe.encode(tok, prompt)]
    max_len = 1 << (len(ids) + n - 1).bit_length()
    server = ServingEngine(Engine(cfg, EngineConfig(max_slots=1, layout="contiguous", max_len=max_len)), params)
    rid = server.add_request(ids, GenerateParams(max_tokens=n, temperature=temperature, top_p=1.0,
                                                 repetition_penalty=1.0, seed=seed))
    return tok.decode(ids + server.run()[rid])


def evaluate(folder: str, text: str, stride: int) -> dict:
    cfg = load_config(folder)
    params = load_params(folder, cfg)
    tok = bpe.load_tokenizer(folder)
    nats, n_tok, n_bytes = scoring.score_text(params, cfg, bpe.encode(tok, text), cfg.max_position_embeddings,
                                              stride, byte_lengths=bpe.token_byte_lengths(tok))
    return {"nats_per_token": nats / n_tok, "bits_per_byte": scoring.bits_per_byte(nats, n_bytes),
            "tokens": n_tok, "bytes": n_bytes, "context": cfg.max_position_embeddings, "stride": stride}


def export(c, cfg: LlamaConfig, params, tok, history, wall_s: float) -> dict:
    folder = c.export_dir
    save_hf_folder(params, cfg, folder, dtype={"float32": np.float32, "bfloat16": jnp.bfloat16,
                                               "float16": np.float16}[c.export_dtype])
    bpe.save_tokenizer_folder(tok, folder, model_max_length=cfg.max_position_embeddings)
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0],
                   "max_length": cfg.max_position_embeddings}, f, indent=2)
    text = data.read_text(c.data_path)
    _, val_text = data.split_train_val(text, c.train_fraction)
    metrics = {
        "validation": evaluate(folder, val_text, c.eval_stride),
        "alice29": evaluate(folder, data.read_text(c.ood_path), c.eval_stride),
    }
    shipped = load_params(folder, cfg)  # what users get (after any bf16 rounding)
    sample = sample_text(shipped, cfg, tok, c.sample_prompt, c.sample_tokens, c.sample_temperature, seed=0)
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    result = {
        "model": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                               "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings",
                                               "tie_word_embeddings")},
        "num_params": cfg.num_params(),
        "steps": int(history[-1]["step"]) if history else 0,
        "train_wall_s": round(wall_s, 1),
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "export_dtype": c.export_dtype,
        "sha256": sha,
        "sample": sample,
        "config": json.loads(c.to_json_best_effort()),
        **metrics,
    }
    _write_card(folder, result)
    return result


def _eval_row(name: str, e: dict) -> str:
    """One row of the card's evaluation table."""
    ppl = np.exp(e["nats_per_token"])
    return f"| {name} | {e['tokens']} | {e['nats_per_token']:.4f} | {ppl:.2f} | {e['bits_per_byte']:.4f} |"


def _write_card(folder: str, r: dict) -> None:
    m, v, a = r["model"], r["validation"], r["alice29"]
    size = os.path.getsize(os.path.join(folder, "model.safetensors"))
    card = f"""# tiny-shakespeare: the embedded default model of ruvllm_jax

A {r['num_params'] / 1e6:.2f}M-parameter Llama (GQA) trained from scratch on CPU, shipped inside the
package so examples and tests run offline. It writes Shakespeare-flavoured text; it knows nothing else.

## Data
- `data/tinyshakespeare.txt` (Karpathy's tinyshakespeare, public domain), split on a line boundary:
  first 90 % train, last 10 % validation.
- `data/alice29.txt` (Carroll, *Alice's Adventures in Wonderland*, Project Gutenberg / Canterbury
  corpus, public domain): out-of-domain evaluation only.

## Tokenizer
Byte-level BPE (`tokenizers`), {m['vocab_size']} entries, trained on the train split only. Special tokens
`<|bos|>` (0) and `<|eos|>` (1) exist but are never added by `encode`: the model was trained on
random windows of raw text, so `tokenizer.encode(text)` is exactly its training input. Round-trips any
UTF-8 text.

## Architecture
Llama: {m['num_layers']} layers, hidden {m['hidden_size']}, MLP {m['intermediate_size']} (SwiGLU),
{m['num_heads']} query heads / {m['num_kv_heads']} KV heads (head_dim {m['head_dim']}), RoPE theta 10000,
context {m['max_position_embeddings']}, tied embeddings: {r['num_params']:,} parameters.
Weights stored as {r['export_dtype']} ({size / 1e6:.2f} MB); compute in float32.

## Training
AdamW (b2 0.95, weight decay 0.1 on matrices), warmup + cosine decay, peak LR
{r['config']['optim']['peak_lr']}, global-norm clip 1.0; {r['steps']} steps of
{r['config']['loop']['batch_size'] * r['config']['loop']['seq_len']} tokens (the first
{int(100 * r['config']['loop']['short_fraction'])} % as windows of {r['config']['loop']['short_seq_len']},
the rest as full {r['config']['loop']['seq_len']}-token windows); {r['train_wall_s'] / 60:.1f} min on a
shared 2-core CPU. Final train loss {r['final_train_loss']:.3f} nats/token.

## Evaluation (sliding windows of {v['context']} tokens, stride {v['stride']}, every token scored once)
| text | tokens | nats/token | perplexity | bits/byte |
|---|---|---|---|---|
{_eval_row('tinyshakespeare validation (last 10 %)', v)}
{_eval_row('alice29.txt (out of domain)', a)}

Bits per byte = total nats / UTF-8 bytes of the scored tokens / ln 2.

## Sample (prompt `{r['config']['sample_prompt']!r}`, temperature {r['config']['sample_temperature']}, seed 0)
```
{r['sample']}
```

## Reproduce
```
python experiments/train_tiny.py --config=configs/train_tiny.py \\
    --config.workdir=runs/train_tiny --config.export_dir=ruvllm_jax/assets/tiny-shakespeare \\
    --config.results_path=experiments/results/train_tiny_final.json \\
    --config.loop.steps={r['config']['loop']['steps']}
python experiments/eval_perplexity.py --config=configs/eval_perplexity.py  # re-scores the card's numbers
```
CPU float results can differ in the last bits between machines.

## Files
`model.safetensors` sha256: `{r['sha256']}`
"""
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)


def main(argv):
    del argv
    c = _CONFIG.value
    text = data.read_text(c.data_path)
    train_text, val_text = data.split_train_val(text, c.train_fraction)
    tok_dir = os.path.join(c.workdir, "tokenizer")
    if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        tok = bpe.load_tokenizer(tok_dir)
    else:
        tok = bpe.train_bpe_tokenizer([train_text], c.vocab_size)
        bpe.save_tokenizer_folder(tok, tok_dir, model_max_length=c.model.max_position_embeddings)
    train_ids, val_ids = bpe.encode(tok, train_text), bpe.encode(tok, val_text)
    logging.info("train %d tokens, validation %d tokens", len(train_ids), len(val_ids))
    cfg = model_config(c)
    logging.info("model %s: %d params", cfg, cfg.num_params())
    oc = train.OptimConfig(total_steps=c.loop.steps, **c.optim.to_dict())
    lc = train.LoopConfig(**c.loop.to_dict())
    t0 = time.time()
    if c.export_only:  # export the workdir's latest checkpoint as is (e.g. a provisional model)
        template = train.init_train_state(cfg, train.make_optimizer(oc), lc.seed)
        manager = train.checkpoint_manager(os.path.join(c.workdir, "checkpoints"))
        state = train.restore_checkpoint(manager, template)
        history = [h for h in train.read_curve(c.workdir) if h["step"] <= int(state.step)]
        result = export(c, cfg, state.params, tok, history, max(h["elapsed_s"] for h in history))
        logging.info("exported step %d: validation %s alice %s", int(state.step), result["validation"],
                     result["alice29"])
        return
    state, history = train.train(cfg, oc, lc, train_ids, val_ids, c.workdir)
    wall = max((h.get("elapsed_s", 0) for h in history), default=0.0)
    logging.info("trained to step %d in %.1fs (this process)", int(state.step), time.time() - t0)
    if c.export_dir and int(state.step) == c.loop.steps:
        result = export(c, cfg, state.params, tok, history, wall)
        logging.info("validation %s alice %s", result["validation"], result["alice29"])
        if c.results_path:
            result["loss_curve"] = history
            with open(c.results_path, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)

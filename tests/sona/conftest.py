"""Fixtures for the SONA tests: one JaxBackend with the embedded tiny-shakespeare model, a factory of
fresh `SonaLlm`s on it, and an `oracle` that recomputes what SONA claims from `models.llama.forward`
(itself tested exact against transformers) with its own tokenisation, masks and float64 log-softmax.

Every request/response pair here is at most 32 tokens, so the packed sequences share one jit shape.
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ruvllm_jax.models import llama

REQUEST = "ROMEO:\nWhat say you, good friar?\n"
RESPONSE = "I say the night is come, my lord."
PAIRS = [  # distinct (request, response) pairs, all <= 32 tokens together
    (REQUEST, RESPONSE),
    ("JULIET:\nWhere is my husband?\n", "He is gone to the king."),
    ("KING:\nWho comes here?\n", "A messenger, my liege, from France."),
    ("NURSE:\nWhat news, lady?\n", "The day is fair and the bells ring."),
    ("HAMLET:\nWho is there?\n", "Nay, answer me: stand and unfold."),
    ("FRIAR:\nGood morrow, son.\n", "Good morrow, father, and good day."),
]
SEQ = 32  # the one padded length every oracle call uses
# What every SonaLlm of `make_sona` estimates its Fisher on (as responses to fisher_prompt "\n"): one replay
# shape [2, 16] for all, so the jitted steps, which see the whole state, compile once per worker.
TEXTS = ["I say the night is come.", "Good morrow, my lord!"]


def _log_softmax64(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _own_adapters(theta, scaling) -> dict:
    """A single LoRA member as the adapters tree `models.llama` applies (built here, not by SONA)."""
    return {"layers": tuple({k: {"A": m["A"], "B": m["B"], "scaling": scaling} for k, m in layer.items()}
                            for layer in theta["layers"])}


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(params, tokens, adapters, *, cfg):
    return llama.forward(params, cfg, tokens, adapters=adapters)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _grad_sum_logprob(theta, scaling, params, tokens, weights, *, cfg):
    """∇_θ Σ_t w_t log p(tokens[t+1] | tokens[:t+1]) of one member θ (float32, through llama.forward)."""

    def total(th):
        logits = llama.forward(params, cfg, tokens[None], adapters=_own_adapters(th, scaling))[0]
        lp = jax.nn.log_softmax(logits[:-1].astype(jnp.float32), axis=-1)
        return jnp.sum(jnp.take_along_axis(lp, tokens[1:, None], axis=-1)[:, 0] * weights[:-1])

    return jax.grad(total)(theta)


class Oracle:
    """Independent recomputation of log-probs, gradients and snapshots for the SONA tests."""

    REQUEST, RESPONSE, PAIRS, TEXTS = REQUEST, RESPONSE, PAIRS, TEXTS

    def __init__(self, backend):
        self.backend, self.cfg, self.tok = backend, backend.config, backend.tokenizer()

    # -- tokens ----------------------------------------------------------------------------------------
    def ids(self, request: str, response: str) -> tuple[list[int], list[int]]:
        prompt = self.tok.encode(request)
        resp = self.tok.encode(response, add_special_tokens=False)
        assert prompt and resp and len(prompt) + len(resp) <= SEQ
        return prompt, resp

    def padded(self, request: str, response: str) -> tuple[np.ndarray, np.ndarray]:
        """tokens [SEQ] zero-padded, and the mask of positions t whose next token is a response token."""
        prompt, resp = self.ids(request, response)
        tokens = np.zeros(SEQ, np.int32)
        tokens[:len(prompt) + len(resp)] = prompt + resp
        mask = np.zeros(SEQ, np.float32)
        mask[len(prompt) - 1:len(prompt) + len(resp) - 1] = 1.0
        return tokens, mask

    # -- model ----------------------------------------------------------------------------------------
    def logits(self, tokens, adapters=None) -> np.ndarray:
        return np.asarray(_forward(self.backend.params, jnp.asarray(tokens)[None], adapters, cfg=self.cfg)[0])

    def logprob(self, adapters, request: str, response: str) -> float:
        """Mean log p per response token (float64 log-softmax of llama.forward's logits)."""
        tokens, mask = self.padded(request, response)
        ls = _log_softmax64(self.logits(tokens, adapters))
        pos = np.flatnonzero(mask)
        return float(ls[pos, tokens[pos + 1]].mean())

    @staticmethod
    def member_adapters(theta, scaling) -> dict:
        return _own_adapters(theta, jnp.float32(scaling))

    def kl(self, ref_adapters, adapters, pairs) -> float:
        """Mean over the response positions of all `pairs` of KL(p_ref ‖ p) (float64)."""
        total, n = 0.0, 0
        for request, response in pairs:
            tokens, mask = self.padded(request, response)
            pos = np.flatnonzero(mask)
            ref = _log_softmax64(self.logits(tokens, ref_adapters))[pos]
            cur = _log_softmax64(self.logits(tokens, adapters))[pos]
            total += float(np.sum(np.exp(ref) * (ref - cur)))
            n += len(pos)
        return total / n

    def regularizer(self, sona, ewc_lambda: float, kl_lambda: float, texts=TEXTS) -> float:
        """(λ/2)·Σ F·(θ − θ*)² + λ_KL · KL(anchor ‖ θ) on `texts` replayed, at the live member θ = member + delta
        (one member; F and θ* read from the state, the KL recomputed here)."""
        st = sona.state
        assert len(st.members) == 1
        live = self.np64(jax.tree.map(lambda m, d: m + d, st.members[-1], st.delta))
        penalty = 0.5 * ewc_lambda * sum(np.sum(np.asarray(f, np.float64) * (t - np.asarray(a, np.float64)) ** 2)
                                         for f, t, a in zip(jax.tree.leaves(st.fisher), jax.tree.leaves(live),
                                                            jax.tree.leaves(st.anchor), strict=True))
        kl = self.kl(self.member_adapters(st.anchor, float(st.scaling)), sona.adapters, [("\n", t) for t in texts])
        return penalty + kl_lambda * kl

    def mean_logprob(self, adapters, pairs) -> float:
        return float(np.mean([self.logprob(adapters, r, s) for r, s in pairs]))

    def grad_sum(self, theta, scaling, request: str, response: str):
        """(∇_θ Σ_t log p(response_t | ...), T) for one member θ."""
        tokens, mask = self.padded(request, response)
        g = _grad_sum_logprob(theta, jnp.float32(scaling), self.backend.params, jnp.asarray(tokens),
                              jnp.asarray(mask), cfg=self.cfg)
        return g, float(mask.sum())

    # -- PEFT -------------------------------------------------------------------------------------------
    def check_peft_export(self, sona, hf_base, folder: str, rank: int, min_effect: float = 1e-2) -> None:
        """`sona.export_peft(folder)` loaded by peft.PeftModel on transformers' model gives the logits
        llama.forward computes with `sona.adapters` (1e-4), and the adapters change them by > min_effect."""
        import json

        import torch
        from peft import PeftModel

        sona.export_peft(folder)
        with open(f"{folder}/adapter_config.json") as f:
            conf = json.load(f)
        assert conf["r"] == rank and sorted(conf["target_modules"]) == ["q_proj", "v_proj"]
        tokens, _ = self.padded(REQUEST, RESPONSE)  # causal: the zero padding after changes nothing before
        ours = self.logits(tokens, sona.adapters)
        pm = PeftModel.from_pretrained(copy.deepcopy(hf_base), folder).eval()
        with torch.no_grad():
            base = hf_base(torch.tensor(tokens[None])).logits[0].numpy()
            theirs = pm(torch.tensor(tokens[None])).logits[0].numpy()
        assert np.abs(ours - base).max() > min_effect  # the learned adapters matter
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)

    # -- state ------------------------------------------------------------------------------------------
    @staticmethod
    def np64(tree):
        return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)

    @staticmethod
    def snapshot(sona) -> dict:
        return {
            "treedef": jax.tree.structure(sona.state),
            "state": [np.array(x) for x in jax.tree.leaves(sona.state)],
            "pending": [(np.array(p.tokens), np.array(p.weights), p.quality, p.advantage,
                         [np.array(x) for x in jax.tree.leaves(p.update)]) for p in sona.pending],
            "counters": copy.deepcopy(sona.counters),
        }

    @staticmethod
    def assert_same(a: dict, b: dict) -> None:
        assert a["treedef"] == b["treedef"]
        assert len(a["state"]) == len(b["state"])
        for x, y in zip(a["state"], b["state"], strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y)
        assert len(a["pending"]) == len(b["pending"])
        for p, q in zip(a["pending"], b["pending"], strict=True):
            assert np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) and p[2:4] == q[2:4]
            assert all(np.array_equal(x, y) for x, y in zip(p[4], q[4], strict=True))
        assert a["counters"] == b["counters"]


@pytest.fixture(scope="session")
def sona_backend():
    from ruvllm_jax.backend import JaxBackend

    backend = JaxBackend()
    backend.load_model()  # the embedded tiny-shakespeare model
    return backend


@pytest.fixture(scope="session")
def oracle(sona_backend):
    return Oracle(sona_backend)


@pytest.fixture(scope="session")
def hf_base():
    """The embedded model in transformers (float32), for PEFT."""
    import torch
    from transformers import LlamaForCausalLM

    from ruvllm_jax.assets import DEFAULT_MODEL_PATH

    return LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_PATH, torch_dtype=torch.float32).eval()


@pytest.fixture
def make_sona(sona_backend):
    """A fresh SonaLlm on the shared backend (it attaches itself), no Fisher sampling unless asked; with
    `fisher` (the default) its Fisher, anchor and replay set are first estimated on TEXTS."""
    from ruvllm_jax.sona import SonaLlm, SonaLlmConfig

    made = []

    def make(fisher: bool = True, **kw):
        kw.setdefault("fisher_samples", 0)
        sona = SonaLlm(SonaLlmConfig(**kw), backend=sona_backend)
        made.append(sona)
        if fisher:
            sona.estimate_fisher(TEXTS)
        return sona

    yield make
    for sona in made:
        sona.stop_background()

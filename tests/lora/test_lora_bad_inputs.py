"""Bad inputs to MicroLoRA, its EWC++ states, checkpoints and PEFT folders: each raises the matching
`RuvLLMError` subclass naming the value, and a rejected call leaves every leaf of the adapters,
accumulators, optimizer and EWC state bit-identical (hashed before and after), nothing accumulated.

Learning state -> AdapterError; reading a checkpoint back -> StorageError; writing onto something
that is there -> RuvIoError (an OSError). Two Hypothesis properties close the file."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from decimal import Decimal
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ruvllm_jax.errors import AdapterError, ConfigError, RuvIoError, RuvLLMError, StorageError
from ruvllm_jax.lora import ALL_MODULES, AdaptFeedback, MicroLoRA, MicroLoraConfig, TargetModule, peft_io
from ruvllm_jax.lora import ewc as ewc_lib
from ruvllm_jax.models import llama
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.models.safetensors_io import SafetensorsFile, save_file

FAST = settings(derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
D = 8


def tree_hash(*trees) -> str:
    """sha256 over the structure and every leaf's dtype, shape and bytes."""
    h = hashlib.sha256()
    for t in trees:
        leaves, treedef = jax.tree.flatten(t)
        h.update(str(treedef).encode())
        for x in leaves:
            a = np.asarray(x)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _snapshot(lora, ewc=None) -> str:
    ewc = sorted((m.key, e) for m, e in (ewc or {}).items())  # TargetModule keys do not sort; their keys do
    return tree_hash(lora.state, ewc, [lora.state.optimizer, lora.state.dropout, lora.state.baseline_decay])


def _trained(optimizer="adam", d=D):
    """A MicroLoRA that has moved (B != 0, Adam moments), with one sample pending and a non-zero Fisher."""
    lora = MicroLoRA(MicroLoraConfig.for_hidden_dim(d), seed=3, optimizer=optimizer)
    rng = np.random.default_rng(0)
    ewc = lora.ewc_states()
    for q in (0.9, 0.2):
        lora.adapt(rng.normal(size=d).astype(np.float32), AdaptFeedback.from_quality(q))
        ewc = lora.update_fisher(ewc)
        lora.apply_updates_with_ewc(0.1, ewc, 1.0)
    lora.adapt(rng.normal(size=d).astype(np.float32), AdaptFeedback.from_quality(0.7))
    ewc = lora.update_fisher(ewc)
    assert int(lora.state.pending) == 1 and lora.stats(ewc).fisher_mass > 0
    return lora, ewc


@pytest.fixture(scope="module")
def trained():
    return _trained()


def _rejects(lora, ewc, call, exc=AdapterError, match=None):
    """`call()` raises `exc` (matching `match`) and changes no leaf of lora.state or ewc."""
    before = _snapshot(lora, ewc)
    with pytest.raises(exc, match=match) as e:
        call()
    assert _snapshot(lora, ewc) == before
    return e.value


# -- construction ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [True, -1, 2 ** 32, 1.0, "0", None, np.float32(1), [0]])
def test_bad_seed_raises_adapter_error_naming_it(seed):
    with pytest.raises(AdapterError, match=r"seed must be an integer \[0, 4294967296\), got "):
        MicroLoRA(MicroLoraConfig.for_hidden_dim(4), seed=seed)


def test_seed_range_ends_are_accepted_and_numpy_ints_too():
    for seed in (0, 2 ** 32 - 1, np.int64(7)):
        assert MicroLoRA(MicroLoraConfig.for_hidden_dim(4), seed=seed).seed == int(seed)


@pytest.mark.parametrize("decay", [float("nan"), 1.5, -0.1, "0.9", None, True])
def test_bad_baseline_decay_raises(decay):
    with pytest.raises(AdapterError, match="baseline_decay"):
        MicroLoRA(MicroLoraConfig.for_hidden_dim(4), baseline_decay=decay)


@pytest.mark.parametrize("kwargs, match", [
    ({"target_modules": 5}, "target_modules must be a module name, a TargetModule or a list of them, got 5"),
    ({"target_modules": None}, "got None"),
    ({"alpha": 1e39}, r"alpha must be a finite number \(alpha / rank finite in float32\), got 1e\+39"),
    ({"alpha": 10 ** 400}, "alpha must be a finite number"),
    ({"dropout": True}, r"dropout must be in \[0, 1\), got True"),
    ({"gradient_checkpointing": 1}, "gradient_checkpointing must be a bool, got 1"),
])
def test_bad_config_values_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MicroLoraConfig(in_features=4, out_features=4, **kwargs)


def test_model_config_of_the_wrong_type_raises_config_error():
    for make in (lambda: MicroLoRA.for_model(object()), lambda: MicroLoRA.from_peft("x", {"hidden_size": 8}),
                 lambda: MicroLoRA(MicroLoraConfig.for_hidden_dim(4), model_config="llama")):
        with pytest.raises(ConfigError, match="model_config must be a LlamaConfig"):
            make()


def test_the_pure_fisher_update_refuses_a_concrete_nan_decay_too():
    lora, ewc = _trained()
    e = ewc[TargetModule.QProj]
    with pytest.raises(AdapterError, match=r"Fisher decay must be in \(0, 1\], got nan"):
        ewc_lib.update_fisher(e, lora.state.grad_sq, lora.state.pending, "q", math.nan)


# -- vectors ----------------------------------------------------------------------------------------------
BAD_VECTORS = {
    "too_short": (np.ones(D - 1, np.float32), r"length 8, got shape \(7,\)|fits no target module"),
    "scalar": (1.0, r"non-empty vector \[n\] or matrix \[T, n\], got 1.0"),
    "three_d": (np.ones((2, 2, D), np.float32), r"non-empty vector .* shape \(2, 2, 8\)"),
    "empty": ([], r"non-empty vector .*got \[\]"),
    "no_rows": (np.ones((0, D), np.float32), r"shape \(0, 8\)"),
    "nan": (np.r_[np.ones(D - 1), np.nan], "contains NaN or infinite values"),
    "inf": (np.r_[np.ones(D - 1), -np.inf], "contains NaN or infinite values"),
    "beyond_float32": (np.full(D, 1e39), r"NaN or infinite values in float32 \(e.g. \[1e\+39"),
    "bools": (np.ones(D, bool), "integer or floating-point dtype, .*dtype bool"),
    "complex": (np.ones(D, np.complex64), "dtype complex64"),
    "string": ("abcdefgh", "dtype <U8"),
    "none": (None, "got None"),
    "ragged": ([[1.0] * D, [1.0]], "must be a numeric array, got"),
    "objects": ([1.0] * (D - 1) + [None], "dtype object"),
    "dict": ({"x": 1.0}, "dtype object"),
}


@pytest.mark.parametrize("case", list(BAD_VECTORS))
def test_bad_vectors_raise_in_forward_forward_add_and_adapt_and_change_nothing(trained, case):
    lora, ewc = trained
    v, match = BAD_VECTORS[case]
    ok = np.ones(D, np.float32)
    _rejects(lora, ewc, lambda: lora.adapt(v, AdaptFeedback.from_quality(0.8)), match=match)
    _rejects(lora, ewc, lambda: lora.adapt(v, AdaptFeedback.from_quality(0.8), module="q"), match=match)
    _rejects(lora, ewc, lambda: lora.forward(v, "q"), match=match)
    _rejects(lora, ewc, lambda: lora.forward_add(v, "q", ok), match=match)
    _rejects(lora, ewc, lambda: lora.forward_add(ok, "q", v), match=match.replace("input", "output"))
    if case not in ("too_short", "empty", "no_rows", "none"):  # an empty estimate (or None) means none: valid
        fb = AdaptFeedback(quality=0.8, gradient_estimate=v)
        _rejects(lora, ewc, lambda: lora.adapt(ok, fb), match=match)


def test_forward_add_with_mismatched_leading_axes_raises(trained):
    lora, ewc = trained
    _rejects(lora, ewc, lambda: lora.forward_add(np.ones((3, D)), "q", np.ones((2, D))),
             match=r"output of shape \(2, 8\) does not match input of shape \(3, 8\)")
    _rejects(lora, ewc, lambda: lora.forward_add(np.ones(D), "q", np.ones((2, D))), match="does not match")


def test_int_vectors_are_numbers_and_an_empty_gradient_estimate_means_none():
    lora, _ = _trained(optimizer="sgd")
    x = np.arange(D)
    np.testing.assert_allclose(lora.forward(x, "q"), lora.forward(x.astype(np.float32), "q"))
    a, b = MicroLoRA(MicroLoraConfig.for_hidden_dim(D)), MicroLoRA(MicroLoraConfig.for_hidden_dim(D))
    a.adapt(x, AdaptFeedback.from_quality(0.9))
    b.adapt(x, AdaptFeedback(quality=0.9, gradient_estimate=[]))  # RuvLLM's empty Vec: Hebbian
    assert tree_hash(a.state) == tree_hash(b.state)


# -- feedback, layer, module, learning rate ------------------------------------------------------------------
BAD_FEEDBACK = [
    (AdaptFeedback(quality=None), "quality must be a finite real number, got None"),
    (AdaptFeedback(quality="0.5"), "quality must be a finite real number, got '0.5'"),
    (AdaptFeedback(quality=True), "quality must be a finite real number, got True"),
    (AdaptFeedback(quality=np.nan), "got nan"),
    (AdaptFeedback(quality=10 ** 400), "quality must be a finite real number, got 1000"),
    (AdaptFeedback(quality=Decimal("0.5")), r"got Decimal\('0.5'\)"),
    (AdaptFeedback(quality=0.5j), "got 0.5j"),
    (AdaptFeedback(quality=np.array([0.5])), r"got ndarray of dtype float64 and shape \(1,\)"),
    (AdaptFeedback(quality=0.5, reward="1"), "reward must be a finite real number, got '1'"),
    (AdaptFeedback(quality=0.5, reward=False), "reward must be a finite real number, got False"),
    (AdaptFeedback(quality=0.5, reward=-math.inf), "got -inf"),
    (AdaptFeedback(quality=0.5, latency_us=-1), r"latency_us must be an integer >= 0, got -1"),
    (AdaptFeedback(quality=0.5, latency_us=1.5), "latency_us must be an integer >= 0, got 1.5"),
    (AdaptFeedback(quality=0.5, session_id=7), "session_id must be a str or None, got 7"),
    (AdaptFeedback(quality=0.5, source_module="w_pack"), "no adaptable module 'w_pack'"),
    (AdaptFeedback(quality=0.5, source_module=TargetModule.KProj), "module KProj is not adapted"),
    ({"quality": 0.5}, "feedback must be an AdaptFeedback, got {'quality': 0.5}"),
]


@pytest.mark.parametrize("feedback, match", BAD_FEEDBACK)
def test_bad_feedback_raises_naming_the_value_and_accumulates_nothing(trained, feedback, match):
    lora, ewc = trained
    _rejects(lora, ewc, lambda: lora.adapt(np.ones(D), feedback), match=match)


def test_accepted_scalar_kinds_for_quality_and_reward():
    for q in (np.float32(0.25), Fraction(1, 4), jnp.float32(0.25), np.array(0.25), 0):
        lora = MicroLoRA(MicroLoraConfig.for_hidden_dim(4))
        lora.adapt(np.ones(4), AdaptFeedback(quality=q, reward=np.int8(1)))
        assert int(lora.state.pending) == 1


@pytest.mark.parametrize("layer, module", [(1, "q"), (-1, "q"), (True, "q"), (0.0, "q"), ("0", "q"),
                                           (0, "k"), (2, None), (0, 3), (0, ["q"])])
def test_bad_layer_or_module_raises(trained, layer, module):
    lora, ewc = trained
    x = np.ones(D)
    if module is None:  # module None -> auto; the layer is what is wrong
        _rejects(lora, ewc, lambda: lora.adapt(x, AdaptFeedback.from_quality(0.5), layer=layer))
    else:
        _rejects(lora, ewc, lambda: lora.adapt(x, AdaptFeedback.from_quality(0.5), module=module, layer=layer))
        _rejects(lora, ewc, lambda: lora.forward(x, module, layer=layer))


@pytest.mark.parametrize("lr", [None, "0.1", True, math.nan, -1e-3, [0.1], 10 ** 400])
def test_bad_learning_rate_raises_and_keeps_the_pending_sample(trained, lr):
    lora, ewc = trained
    _rejects(lora, ewc, lambda: lora.apply_updates(lr), match="learning_rate must be")
    _rejects(lora, ewc, lambda: lora.apply_updates_with_ewc(lr, ewc, 1.0), match="learning_rate must be")
    assert int(lora.state.pending) == 1


# -- EWC++ ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decay", [math.nan, math.inf, 0.0, -0.1, 1.5, True, "0.1", None])
def test_bad_fisher_decay_raises_and_nan_never_reaches_the_adapters(decay):
    """Regression: a NaN decay was accepted, made the Fisher NaN and, at the next EWC step, every adapter."""
    lora, ewc = _trained()
    before = _snapshot(lora, ewc)
    for call in (lambda: lora.update_fisher(ewc, decay=decay), lambda: lora.consolidate(ewc, decay=decay)):
        with pytest.raises(AdapterError, match=r"decay must be"):
            call()
    assert _snapshot(lora, ewc) == before
    lora.apply_updates_with_ewc(0.1, lora.update_fisher(ewc, decay=1.0), 1.0)  # decay 1 is allowed
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(lora.state.params))


def _poison(ewc, module, field, value, index=0):
    e = ewc[module]
    tree = getattr(e, field)
    layers = list(tree["layers"])
    a = np.array(layers[index]["A"])
    a.flat[0] = value
    layers[index] = {**layers[index], "A": a}
    return {**ewc, module: e.replace(**{field: {"layers": tuple(layers)}})}


def _other_shape_ewc():
    return MicroLoRA(MicroLoraConfig.for_hidden_dim(D + 1)).ewc_states()


BAD_EWC = {
    "nan_fisher": (lambda ewc: _poison(ewc, TargetModule.QProj, "fisher", np.nan), r"fisher\['layers'\]\[0\]\['A'\]"
                   r" contains NaN"),
    "inf_anchor": (lambda ewc: _poison(ewc, TargetModule.VProj, "anchor", np.inf), r"anchor.* contains NaN or inf"),
    "negative_fisher": (lambda ewc: _poison(ewc, TargetModule.QProj, "fisher", -1.0), "a Fisher is >= 0"),
    "other_shapes": (lambda ewc: _other_shape_ewc(), r"has shape \(9, 2\), this MicroLoRA's params have \(8, 2\)"),
    "not_an_ewc_state": (lambda ewc: {TargetModule.QProj: {"fisher": 0}}, "must be an EwcState"),
    "not_a_mapping": (lambda ewc: list(ewc.values()), "ewc_states must be a dict"),
    "twice": (lambda ewc: {TargetModule.QProj: ewc[TargetModule.QProj], "q": ewc[TargetModule.QProj]},
              "names module 'q' twice"),
    "unadapted_module": (lambda ewc: {TargetModule.KProj: ewc[TargetModule.QProj]}, "KProj is not adapted"),
    "bad_counter": (lambda ewc: {TargetModule.QProj: ewc[TargetModule.QProj].replace(fisher_updates=-1)},
                    "fisher_updates must be an integer >= 0, got -1"),
    "list_layers": (lambda ewc: {TargetModule.QProj: ewc[TargetModule.QProj].replace(
        fisher={"layers": list(ewc[TargetModule.QProj].fisher["layers"])})}, "must have the structure"),
}


@pytest.mark.parametrize("case", list(BAD_EWC))
def test_bad_ewc_states_raise_everywhere_they_are_taken(trained, tmp_path, case):
    lora, ewc = trained
    make, match = BAD_EWC[case]
    bad = make(ewc)
    for call in (lambda: lora.apply_updates_with_ewc(0.1, bad, 1.0), lambda: lora.update_fisher(bad),
                 lambda: lora.consolidate(bad), lambda: lora.reanchor(bad), lambda: lora.stats(bad),
                 lambda: lora.save(str(tmp_path / "ck"), bad)):
        _rejects(lora, ewc, call, match=match)
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("lam", [math.nan, math.inf, -1.0, None, True, "1"])
def test_bad_ewc_lambda_raises(trained, lam):
    lora, ewc = trained
    _rejects(lora, ewc, lambda: lora.apply_updates_with_ewc(0.1, ewc, lam), match="ewc_lambda must be")


# -- adapter trees: import and attach ---------------------------------------------------------------------
def _params(lora):
    return jax.tree.map(np.asarray, lora.state.params)


def _edit(params, layer, module, **arrays):
    layers = [dict(lp) for lp in params["layers"]]
    layers[layer] = {**layers[layer], module: {**layers[layer][module], **arrays}}
    return {"layers": tuple(layers)}


BAD_TREES = {
    "not_a_dict": (lambda p: [p], "adapter params must be a dict"),
    "extra_top_key": (lambda p: {**p, "scaling": 2.0}, r"exactly the keys \['layers'\]; .*unexpected \['scaling'\]"),
    "layers_not_a_list": (lambda p: {"layers": p["layers"][0]}, "must be a list or tuple"),
    "two_layers": (lambda p: {"layers": p["layers"] * 2}, "adapter params have 2 layers, the model has 1"),
    "missing_module": (lambda p: {"layers": ({"q": p["layers"][0]["q"]},)}, r"missing \['v'\]"),
    "extra_module": (lambda p: {"layers": ({**p["layers"][0], "k": p["layers"][0]["q"]},)}, r"unexpected \['k'\]"),
    "missing_b": (lambda p: {"layers": ({**p["layers"][0], "q": {"A": p["layers"][0]["q"]["A"]}},)},
                  r"module 'q' must have exactly the keys \['A', 'B'\]; missing \['B'\]"),
    "rank_3": (lambda p: _edit(p, 0, "q", A=np.ones((D, 3), np.float32)), r"A has shape \(8, 3\), expected \(8, 2\)"),
    "int_dtype": (lambda p: _edit(p, 0, "v", B=np.ones((2, D), np.int32)), "floating-point dtype, .*int32"),
    "bool_dtype": (lambda p: _edit(p, 0, "v", B=np.ones((2, D), bool)), "dtype bool"),
    "nan": (lambda p: _edit(p, 0, "v", B=np.full((2, D), np.nan, np.float32)), "contains NaN"),
}


@pytest.mark.parametrize("case", list(BAD_TREES))
def test_import_params_rejects_malformed_trees_and_changes_nothing(trained, case):
    lora, ewc = trained
    make, match = BAD_TREES[case]
    _rejects(lora, ewc, lambda: lora.import_params(make(_params(lora))), match=match)


def test_import_params_sets_values_and_restarts_the_accumulators():
    lora, _ = _trained()
    new = jax.tree.map(lambda a: (a + 1.0).astype(np.float16), _params(lora))  # f16 is taken exactly
    lora.import_params(new)
    assert tree_hash(lora.state.params) == tree_hash(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), new))
    assert (int(lora.state.pending), lora.state.optimizer) == (0, "adam")


def _bad_attach(cfg, lora):
    good = jax.tree.map(np.asarray, lora.adapters)
    layer0 = good["layers"][0]
    q = layer0["q"]
    return {
        "no_scaling": ({"layers": ({**layer0, "q": {"A": q["A"], "B": q["B"]}},) + good["layers"][1:]},
                       r"module 'q' must have exactly the keys \['A', 'B', 'scaling'\]; missing \['scaling'\]"),
        "wrong_rank": ({"layers": ({**layer0, "q": {**q, "B": np.ones((3, cfg.q_size), np.float32)}},)
                        + good["layers"][1:]}, r"A \(64, 2\) / B \(3, 64\) do not fit"),
        "int_dtype": ({"layers": ({**layer0, "q": {**q, "A": q["A"].astype(np.int64)}},) + good["layers"][1:]},
                      "dtype int64"),
        "nan": ({"layers": ({**layer0, "q": {**q, "scaling": np.float32(np.nan)}},) + good["layers"][1:]},
                "scaling contains NaN"),
        "vector_scaling": ({"layers": ({**layer0, "q": {**q, "scaling": np.ones(2, np.float32)}},)
                            + good["layers"][1:]}, r"scaling must be a scalar, got shape \(2,\)"),
        "extra_key": ({**good, "rank": 2}, r"unexpected \['rank'\]"),
        "layer_not_a_dict": ({"layers": (None,) + good["layers"][1:]}, "adapters layer 0 must be a dict, got None"),
        "not_a_tree": ("adapters", "adapters must be a dict with a 'layers' list"),
    }


def test_attach_rejects_malformed_adapter_trees_and_keeps_what_was_attached(lora_backend):
    backend = lora_backend
    attached = backend._adapters
    lora = MicroLoRA.for_model(backend.config, seed=4)
    for name, (tree, match) in _bad_attach(backend.config, lora).items():
        with pytest.raises(AdapterError, match=match):
            backend.attach_adapters(tree)
        assert backend._adapters is attached, name


# -- sequence feedback: token ids and model params -------------------------------------------------------------
@pytest.mark.parametrize("prompt, response, match", [
    ([2, 3], [4.0], r"response_ids must hold integer token ids, got \[4.0\]"),
    ([2, 3.7], [4], r"prompt_ids must hold integer token ids, got \[3.7\]"),
    ([2, True], [4], r"got \[True\]"),
    (np.array([2.0, 3.0]), [4], "prompt_ids must be a 1-D integer array of token ids, got ndarray of dtype float64"),
    (np.array([[2, 3]]), [4], r"1-D integer array .* shape \(1, 2\)"),
    ("hello", [4], "must be a list or 1-D integer array of token ids, got 'hello'"),
    ([2, 3], None, "response_ids must be a list or 1-D integer array of token ids, got None"),
    ([2, 3], [], "response_ids is empty"),
    ([], [4], "prompt_ids is empty"),
    ([2, 3], [384], r"token ids must be in \[0, 384\), got \[384\]"),
    ([-1], [4], r"got \[-1\]"),
    ([2] * 200, [3] * 57, r"200 \+ 57 = 257 tokens, more than the model's max_position_embeddings 256"),
])
def test_bad_token_ids_raise_and_change_nothing(lora_backend, prompt, response, match):
    cfg, params = lora_backend.config, lora_backend.params
    lora = MicroLoRA.for_model(cfg, seed=1)
    fb = AdaptFeedback(quality=0.5, reward=1.0)
    _rejects(lora, None, lambda: lora.adapt_sequence(params, prompt, response, fb), match=match)
    _rejects(lora, None, lambda: lora.log_likelihood(params, prompt, response), match=match)


def _other_model_params(cfg):
    small = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=32, intermediate_size=64, num_layers=cfg.num_layers,
                        num_heads=2, num_kv_heads=1, head_dim=16)
    return llama.init_params(small, jax.random.PRNGKey(0))


def _bad_model_params(cfg, params):
    lp0 = params["layers"][0]
    return {
        "other_size": (_other_model_params(cfg), r"model params 'embed' is .*shape \(384, 32\).* needs a float "
                                                 r"array of shape \(384, 64\): these params belong to another model"),
        "one_layer": ({**params, "layers": params["layers"][:1]}, "'layers' must be a list of 2 layers"),
        "missing_key": ({k: v for k, v in params.items() if k != "final_norm"},
                        r"lack \['final_norm'\] .*belong to another model"),
        "extra_key": ({**params, "layers": ({**lp0, "w_extra": lp0["wo"]},) + tuple(params["layers"][1:])},
                      r"layer 0 lack \[\] / have unexpected \['w_extra'\]"),
        "int_weights": ({**params, "embed": params["embed"].astype(jnp.int32)}, "dtype int32"),
        "not_arrays": ({**params, "final_norm": [1.0] * cfg.hidden_size}, "'final_norm' must be an array"),
        "not_a_dict": ([params], "model params must be a dict"),
    }


def test_model_params_of_another_model_raise_before_any_tracing(lora_backend):
    cfg, params = lora_backend.config, lora_backend.params
    lora = MicroLoRA.for_model(cfg, seed=1)
    fb = AdaptFeedback(quality=0.5, reward=1.0)
    for bad, match in _bad_model_params(cfg, params).values():
        _rejects(lora, None, lambda b=bad: lora.adapt_sequence(b, [2, 3], [4, 5], fb), match=match)
        _rejects(lora, None, lambda b=bad: lora.log_likelihood(b, [2, 3], [4, 5]), match=match)


def test_sequence_feedback_without_a_model_raises():
    lora = MicroLoRA(MicroLoraConfig.for_hidden_dim(4))
    _rejects(lora, None, lambda: lora.adapt_sequence({}, [1], [2], AdaptFeedback.from_quality(0.5)),
             match="sequence feedback needs adapters built for a model")


# -- checkpoints: StorageError reading back, RuvIoError writing over -------------------------------------------
def test_restore_of_a_file_a_wrong_type_or_another_configuration_raises_storage_error(tmp_path):
    lora, ewc = _trained()
    (tmp_path / "file").write_text("x")
    e = _rejects(lora, ewc, lambda: lora.restore(str(tmp_path / "file")), StorageError,
                 r"'.*file' is not a MicroLoRA checkpoint: it is not a folder")
    assert str(tmp_path / "file") in str(e)
    _rejects(lora, ewc, lambda: lora.restore(123), StorageError,
             "checkpoint directory must be a str or os.PathLike, got 123")
    others = {
        "rank": MicroLoRA(MicroLoraConfig(in_features=D, out_features=D, rank=3), optimizer="adam"),
        "optimizer": MicroLoRA(MicroLoraConfig.for_hidden_dim(D), optimizer="sgd"),
        "scaling": MicroLoRA(MicroLoraConfig(in_features=D, out_features=D, alpha=5.0), optimizer="adam"),
        "dropout": MicroLoRA(MicroLoraConfig(in_features=D, out_features=D, dropout=0.1), optimizer="adam"),
        "modules (in, out)": MicroLoRA(MicroLoraConfig(in_features=D, out_features=D, target_modules=("q",)),
                                       optimizer="adam"),
    }
    for what, other in others.items():
        folder = tmp_path / what.split()[0]
        other.save(str(folder))
        _rejects(lora, ewc, lambda f=folder: lora.restore(str(f)), StorageError,
                 rf"checkpoint '{re.escape(str(folder))}' holds other adapters than this MicroLoRA: "
                 rf".*'{re.escape(what)}'")


@pytest.mark.parametrize("changes, match", [
    ({"rank": "2"}, "rank must be a positive integer, got '2'"),
    ({"rank": True}, "rank must be a positive integer, got True"),
    ({"num_layers": 0}, "num_layers must be a positive integer, got 0"),
    ({"dims": {"q": [8, "8"], "v": [8, 8]}}, "dims must map module keys"),
    ({"dims": {"w_pack": [8, 8]}}, "dims must map module keys"),
    ({"optimizer": "rmsprop"}, "optimizer must be one of .*got 'rmsprop'"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
    ({"baseline_decay": float("nan")}, "baseline_decay must be a number"),
    ({"ewc": ["k"]}, "ewc must list distinct adapted module keys"),
    ({"ewc": ["q", "q"]}, "ewc must list distinct"),
    ({"format": 2}, "must be an object with the fields"),
])
def test_meta_json_of_the_wrong_type_raises_storage_error(tmp_path, changes, match):
    lora, ewc = _trained()
    lora.save(str(tmp_path / "ck"), ewc)
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    (tmp_path / "ck" / "meta.json").write_text(json.dumps({**meta, **changes}))
    _rejects(lora, ewc, lambda: lora.restore(str(tmp_path / "ck")), StorageError,
             rf"'{re.escape(str(tmp_path / 'ck'))}' holds a corrupt or partial MicroLoRA checkpoint: .*{match}")


def test_non_finite_values_in_a_checkpoint_raise_storage_error(tmp_path):
    lora, ewc = _trained()
    broken = MicroLoRA(MicroLoraConfig.for_hidden_dim(D), optimizer="adam")
    broken.state = broken.state.replace(baseline=jnp.float32(np.nan))  # what no validated call can produce
    broken.save(str(tmp_path / "ck"))
    _rejects(lora, ewc, lambda: lora.restore(str(tmp_path / "ck")), StorageError,
             r"corrupt or partial MicroLoRA checkpoint: \['lora'\]\['baseline'\] holds NaN or infinite values")


def test_saving_onto_a_file_or_a_folder_of_other_files_raises_ruv_io_error(tmp_path):
    lora, ewc = _trained()
    (tmp_path / "file").write_text("keep me")
    for target in (tmp_path / "file", tmp_path / "file" / "ck"):
        e = _rejects(lora, ewc, lambda t=target: lora.save(str(t), ewc), RuvIoError,
                     re.escape(str(tmp_path / "file")))
        assert isinstance(e, OSError)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    _rejects(lora, ewc, lambda: lora.save(str(tmp_path / "mine")), RuvIoError,
             r"the folder holds other files \['notes.txt'\]; save into a new or empty folder")
    _rejects(lora, ewc, lambda: lora.save(str(tmp_path / "mine"), overwrite=True), RuvIoError, "holds other files")
    _rejects(lora, ewc, lambda: lora.save(7), RuvIoError, "must be a str or os.PathLike, got 7")
    assert (tmp_path / "file").read_text() == "keep me" and os.listdir(tmp_path / "mine") == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    lora.save(tmp_path / "empty", ewc)  # an empty folder (and a PathLike) is fine
    assert sorted(os.listdir(tmp_path / "empty")) == ["meta.json", "state"]
    assert sorted(os.listdir(tmp_path)) == ["empty", "file", "mine"]  # no temporary folder left behind


def test_saving_over_a_checkpoint_refuses_unless_overwrite_which_replaces_it_whole(tmp_path):
    first, ewc = _trained()
    first.save(str(tmp_path / "ck"), ewc)
    second = MicroLoRA(MicroLoraConfig.for_hidden_dim(D), seed=8, optimizer="adam")
    second.adapt(np.ones(D), AdaptFeedback.from_quality(0.1))
    _rejects(second, None, lambda: second.save(str(tmp_path / "ck")), RuvIoError,
             rf"'{re.escape(str(tmp_path / 'ck'))}' already holds a checkpoint; pass overwrite=True")
    probe = MicroLoRA(MicroLoraConfig.for_hidden_dim(D), optimizer="adam")
    assert set(probe.restore(str(tmp_path / "ck"))) == set(ewc)  # still the first one
    assert tree_hash(probe.state) == tree_hash(first.state)
    second.save(str(tmp_path / "ck"), overwrite=True)
    assert probe.restore(str(tmp_path / "ck")) == {}  # the second one, without EWC states
    assert tree_hash(probe.state) == tree_hash(second.state)
    assert os.listdir(tmp_path) == ["ck"]


def test_a_save_that_fails_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    from ruvllm_jax.lora import checkpoint

    lora, ewc = _trained()
    lora.save(str(tmp_path / "ck"), ewc)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_meta", fail)
    _rejects(lora, ewc, lambda: lora.save(str(tmp_path / "new")), RuvIoError,
             rf"cannot save a checkpoint to '{re.escape(str(tmp_path / 'new'))}': \[Errno 28\] No space left")
    _rejects(lora, ewc, lambda: lora.save(str(tmp_path / "ck"), overwrite=True), RuvIoError, "No space left")
    assert os.listdir(tmp_path) == ["ck"]  # no partial "new", the old checkpoint intact
    monkeypatch.undo()
    assert set(MicroLoRA(MicroLoraConfig.for_hidden_dim(D), optimizer="adam").restore(str(tmp_path / "ck"))) == set(ewc)


# -- PEFT folders ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft_good(lora_backend, tmp_path_factory):
    """Our own export of random all-module adapters for the test llama: (cfg, folder, its config dict)."""
    cfg = lora_backend.config
    lora = MicroLoRA.for_model(cfg, rank=2, alpha=6.0, target_modules=ALL_MODULES, seed=5, dropout=0.25)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
    lora.import_params(jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape), lora.state.params))
    folder = tmp_path_factory.mktemp("peft_good")
    lora.export_peft(str(folder))
    return cfg, folder, json.loads((folder / peft_io.CONFIG_NAME).read_text())


def _copy(src, dest, **config_changes):
    os.makedirs(dest, exist_ok=True)
    shutil.copy(src / peft_io.WEIGHTS_NAME, dest / peft_io.WEIGHTS_NAME)
    conf = json.loads((src / peft_io.CONFIG_NAME).read_text())
    (dest / peft_io.CONFIG_NAME).write_text(json.dumps({**conf, **config_changes}))
    return dest


def test_from_peft_takes_the_dropout_and_import_peft_needs_the_same_structure(peft_good, tmp_path):
    cfg, folder, _ = peft_good
    lora = MicroLoRA.from_peft(str(folder), cfg)
    assert lora.config.dropout == 0.25 and lora.state.dropout == 0.25
    other = MicroLoRA.for_model(cfg, rank=2, alpha=6.0, target_modules=ALL_MODULES, seed=9)
    other.import_peft(str(folder))
    assert tree_hash(other.state.params) == tree_hash(lora.state.params)
    for bad in (MicroLoRA.for_model(cfg, rank=2, alpha=4.0, target_modules=ALL_MODULES),  # other scaling
                MicroLoRA.for_model(cfg, rank=2, alpha=6.0)):  # other modules
        _rejects(bad, None, lambda b=bad: b.import_peft(str(folder)), AdapterError,
                 r"holds \(modules, rank, scaling\) .*use MicroLoRA.from_peft")
    lonely = MicroLoRA(MicroLoraConfig.for_hidden_dim(4))
    _rejects(lonely, None, lambda: lonely.import_peft(str(folder)), AdapterError, "import_peft needs adapters built")


@pytest.mark.parametrize("changes, match", [
    ({"r": True}, "r must be a positive integer, got True"),
    ({"r": 2.0}, "r must be a positive integer, got 2.0"),
    ({"lora_alpha": 10 ** 400}, "lora_alpha must be a finite number"),
    ({"lora_dropout": "0.1"}, r"lora_dropout must be a number in \[0, 1\), got '0.1'"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be a number in \[0, 1\), got 1.0"),
    ({"target_modules": 5}, "target_modules must be null, a string or a list of strings, got 5"),
    ({"target_modules": ["q_proj", "k_proj"]}, r"adapts model\.layers\.\d\.\S+, which adapter_config.json "
                                               r"target_modules \['q_proj', 'k_proj'\] does not name"),
    ({"target_modules": ".*q_proj"}, "does not name"),
    ({"target_modules": "(("}, "is not a valid regex"),
    ({"layers_to_transform": [0]}, r"is for layer 1, which adapter_config.json layers_to_transform \[0\] leaves out"),
    ({"layers_to_transform": [-1]}, "layers_to_transform must be null, an integer >= 0 or a list of them"),
    ({"use_rslora": 0}, r"unsupported PEFT LoRA options: \{'use_rslora': 0\}"),
    ({"alpha_pattern": None, "rank_pattern": []}, r"unsupported PEFT LoRA options: \{'rank_pattern': \[\]\}"),
    ({"inference_mode": "yes"}, "inference_mode must be a boolean, got 'yes'"),
    ({"base_model_name_or_path": 3}, "base_model_name_or_path must be null or a string, got 3"),
    ({"peft_type": ["LORA"]}, r"peft_type \['LORA'\] is not supported"),
])
def test_adapter_config_fields_of_the_wrong_type_or_inconsistent_raise(peft_good, tmp_path, changes, match):
    cfg, folder, _ = peft_good
    with pytest.raises(AdapterError, match=match):
        MicroLoRA.from_peft(str(_copy(folder, tmp_path, **changes)), cfg)


def test_adapter_tensors_of_wrong_dtype_nan_or_twice_raise(peft_good, tmp_path):
    cfg, folder, _ = peft_good
    st_ = SafetensorsFile(folder / peft_io.WEIGHTS_NAME)
    tensors = {k: np.array(st_.get(k)) for k in st_.keys()}
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    cases = {
        "int": ({**tensors, key: tensors[key].astype(np.int32)}, f"tensor '{key}' has dtype I32"),
        "nan": ({**tensors, key: np.full_like(tensors[key], np.nan)}, f"tensor '{key}' holds NaN"),
        "twice": ({**tensors, key.replace("base_model.model.", ""): tensors[key]},
                  "holds lora_B of layer 1 mlp.up_proj twice"),
    }
    _copy(folder, tmp_path)
    for ts, match in cases.values():
        save_file(ts, tmp_path / peft_io.WEIGHTS_NAME)
        with pytest.raises(AdapterError, match=match):
            MicroLoRA.from_peft(str(tmp_path), cfg)
    with pytest.raises(AdapterError, match="a PEFT adapter folder must be a non-empty str or os.PathLike, got 5"):
        MicroLoRA.from_peft(5, cfg)


def test_export_peft_onto_a_file_or_an_existing_adapter_raises_ruv_io_error(peft_good, tmp_path):
    cfg, folder, _ = peft_good
    lora = MicroLoRA.from_peft(str(folder), cfg)
    (tmp_path / "file").write_text("keep me")
    e = _rejects(lora, None, lambda: lora.export_peft(str(tmp_path / "file")), RuvIoError,
                 rf"cannot write a PEFT adapter into '{re.escape(str(tmp_path / 'file'))}': it exists and is not a "
                 rf"folder")
    assert isinstance(e, OSError)
    _rejects(lora, None, lambda: lora.export_peft(str(tmp_path / "file" / "sub")), RuvIoError,
             re.escape(str(tmp_path / "file")))
    (tmp_path / "odd" / peft_io.CONFIG_NAME).mkdir(parents=True)
    _rejects(lora, None, lambda: lora.export_peft(str(tmp_path / "odd"), overwrite=True), RuvIoError,
             "something other than a regular file is there")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("model card")
    lora.export_peft(str(tmp_path / "out"))  # a folder with other files is fine
    _rejects(lora, None, lambda: lora.export_peft(str(tmp_path / "out")), RuvIoError,
             r"adapter_config.json' already exists; pass overwrite=True")
    lora.export_peft(str(tmp_path / "out"), overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["README.md", peft_io.CONFIG_NAME, peft_io.WEIGHTS_NAME]
    assert (tmp_path / "file").read_text() == "keep me"
    _rejects(lora, None, lambda: lora.export_peft(str(tmp_path / "x"), base_model_name_or_path=3), AdapterError,
             "base_model_name_or_path must be a str or None, got 3")
    lonely = MicroLoRA(MicroLoraConfig.for_hidden_dim(4))
    _rejects(lonely, None, lambda: lonely.export_peft(str(tmp_path / "y")), AdapterError, "export_peft needs")


# -- Hypothesis properties ---------------------------------------------------------------------------------
def _valid_scalar(v, lo, hi) -> bool:
    """The test's own oracle for a real in [lo, hi]: a non-bool int/float/NumPy real, finite in float32."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    try:
        f = float(v)
    except OverflowError:
        return False
    return math.isfinite(f) and abs(f) <= float(np.finfo(np.float32).max) and lo <= f <= hi


SCALARS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.integers(-3, 3), st.integers(10 ** 300),
    st.booleans(), st.none(), st.text(max_size=3), st.just(np.float32(0.5)), st.just(np.bool_(True)),
    st.complex_numbers(max_magnitude=2), st.lists(st.floats(0, 1), max_size=2), st.just(Decimal("0.5")),
)


def _bad_vector():
    right = st.lists(st.floats(-3, 3, width=32), min_size=D, max_size=D)
    return st.one_of(
        st.lists(st.floats(-3, 3, width=32), max_size=12).filter(lambda v: len(v) != D),  # wrong length
        st.tuples(right, st.integers(0, D - 1), st.sampled_from([np.nan, np.inf, -np.inf, 1e39])).map(
            lambda t: np.asarray(t[0][: t[1]] + [t[2]] + t[0][t[1] + 1:])),  # one non-finite value
        right.map(lambda v: np.asarray(v, np.complex64)), right.map(lambda v: np.asarray(v) > 0),  # complex, bool
        right.map(lambda v: [v[:3], v]),  # nested, ragged
        right.map(lambda v: [v]), right.map(lambda v: [[v]]),  # 2-D fine in length but 3-D is not; see below
        st.text(max_size=D), st.none(), st.dictionaries(st.text(max_size=2), st.floats(), max_size=2),
        right.map(lambda v: v[:-1] + [str(v[-1])]), st.integers(), st.floats(),
    ).filter(lambda v: not (isinstance(v, list) and len(v) == 1 and isinstance(v[0], list)
                            and len(v[0]) == D))  # [v] is a valid [1, D]


@settings(FAST, max_examples=60)
@given(x=_bad_vector(), where=st.sampled_from(["adapt", "adapt_q", "gradient", "forward", "forward_add_out"]))
def test_property_bad_vectors_raise_adapter_error_and_leave_the_state(trained, x, where):
    lora, ewc = trained
    ok = np.ones(D, np.float32)
    calls = {
        "adapt": lambda: lora.adapt(x, AdaptFeedback.from_quality(0.6)),
        "adapt_q": lambda: lora.adapt(x, AdaptFeedback.from_quality(0.6), module=TargetModule.QProj),
        "gradient": lambda: lora.adapt(ok, AdaptFeedback(quality=0.6, gradient_estimate=x)),
        "forward": lambda: lora.forward(x, "v"),
        "forward_add_out": lambda: lora.forward_add(ok, "v", x),
    }
    if where == "gradient" and (x is None or (isinstance(x, list) and not x)):
        return  # no estimate, or an empty one (RuvLLM's empty Vec): the Hebbian update, valid
    before = _snapshot(lora, ewc)
    with pytest.raises(AdapterError):
        calls[where]()
    assert _snapshot(lora, ewc) == before


@settings(FAST, max_examples=60)
@given(quality=SCALARS, reward=st.one_of(st.none(), SCALARS), lr=SCALARS)
def test_property_feedback_and_learning_rate_values_of_any_type(trained, quality, reward, lr):
    """Every quality / reward / lr is either valid by the oracle (the call works: one sample more, or
    the update applied) or raises AdapterError leaving every leaf as it was; never another exception."""
    lora, ewc = trained
    base = lora.state
    try:
        _feedback_and_lr(lora, base, ewc, quality, reward, lr)
    finally:
        lora.state = base


def _feedback_and_lr(lora, base, ewc, quality, reward, lr):
    valid = _valid_scalar(quality, 0, 1) and (reward is None or _valid_scalar(reward, -math.inf, math.inf))
    event(f"feedback valid: {valid}; lr valid: {_valid_scalar(lr, 0, math.inf)}")
    before = _snapshot(lora, ewc)
    try:
        lora.adapt(np.ones(D), AdaptFeedback(quality=quality, reward=reward))
    except RuvLLMError as e:
        assert isinstance(e, AdapterError) and not valid, (quality, reward, e)
        assert _snapshot(lora, ewc) == before
    else:
        assert valid, (quality, reward)
        assert int(lora.state.pending) == int(base.pending) + 1
    lora.state = base
    try:
        lora.apply_updates_with_ewc(lr, ewc, 0.5)
    except RuvLLMError as e:
        assert isinstance(e, AdapterError) and not _valid_scalar(lr, 0, math.inf), (lr, e)
        assert _snapshot(lora, ewc) == before
    else:
        assert _valid_scalar(lr, 0, math.inf), lr
        assert int(lora.state.pending) == 0


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2, 3), st.integers(10 ** 20, 10 ** 400),
              st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "LORA", "q_proj", "none", "x"])),
    lambda inner: st.one_of(st.lists(inner, max_size=2), st.dictionaries(st.sampled_from(["a", "q_proj"]), inner,
                                                                         max_size=2)),
    max_leaves=4,
)


def _json_type(v) -> str:
    return {type(None): "null", bool: "bool", int: "int", float: "float", str: "str", list: "list",
            dict: "dict"}[type(v)]


# The JSON types the PEFT fields accept (the test's own table); a value of another type must raise.
PEFT_FIELD_TYPES = {
    "peft_type": {"str"}, "task_type": {"null", "str"}, "r": {"int"}, "lora_alpha": {"int", "float"},
    "lora_dropout": {"int", "float"}, "target_modules": {"null", "str", "list"}, "bias": {"str"},
    "use_rslora": {"bool", "null"}, "use_dora": {"bool", "null"}, "fan_in_fan_out": {"bool", "null"},
    "init_lora_weights": {"bool", "str"}, "inference_mode": {"bool"}, "base_model_name_or_path": {"null", "str"},
    "modules_to_save": {"null", "list"}, "rank_pattern": {"dict", "null"}, "alpha_pattern": {"dict", "null"},
    "layers_to_transform": {"null", "int", "list"}, "layers_pattern": {"null", "str", "list"},
    "exclude_modules": {"null", "str", "list"}, "revision": {"null", "str"}, "lora_bias": {"bool", "null"},
}


@pytest.fixture(scope="module")
def peft_lora(peft_good):
    cfg, folder, _ = peft_good
    return MicroLoRA.from_peft(str(folder), cfg)


@settings(FAST, max_examples=80)
@given(field=st.sampled_from(sorted(PEFT_FIELD_TYPES)), value=JSON_VALUES)
def test_property_peft_config_mutations_raise_only_ruvllm_errors_and_leave_the_adapters(
        peft_good, peft_lora, tmp_path_factory, field, value):
    cfg, folder, conf = peft_good
    target = _copy(folder, tmp_path_factory.mktemp("mut"), **{field: value})
    lora = peft_lora
    before = _snapshot(lora)
    wrong_type = _json_type(value) not in PEFT_FIELD_TYPES[field]
    try:
        lora.import_peft(str(target))
    except RuvLLMError as e:
        assert isinstance(e, AdapterError), e
        assert _snapshot(lora) == before
        event(f"wrong type: {wrong_type}; rejected")
    else:
        event(f"wrong type: {wrong_type}; imported")
        assert not wrong_type, (field, value)
        assert tree_hash(lora.state.params) == tree_hash(MicroLoRA.from_peft(str(folder), cfg).state.params)
    try:
        MicroLoRA.from_peft(str(target), cfg)
    except RuvLLMError as e:
        assert isinstance(e, AdapterError), e
    else:
        assert not wrong_type, (field, value)
    shutil.rmtree(target)

"""PEFT interop against peft itself: its folders imported give its logits; ours exported, it loads to ours.

For each family: llama, qwen2 (q/k/v biases, tied head) and mistral (sliding window, head_dim * heads
!= hidden size, so o_proj is not square). The option and shape rejections run on llama."""

from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ruvllm_jax.errors import AdapterError, ModelError
from ruvllm_jax.lora import ALL_MODULES, MicroLoRA
from ruvllm_jax.models import llama, loader
from ruvllm_jax.testing import build_hf_model, rng_tokens, save_hf_model

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_ONLY = pytest.mark.parametrize("base", ["llama"], indirect=True)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def base(request, tmp_path_factory):
    model = build_hf_model(request.param, seed=4)
    folder = save_hf_model(model, str(tmp_path_factory.mktemp(f"lora_base_{request.param}")))
    cfg = loader.load_config(folder)
    if request.param == "qwen2":  # what makes the family different really reaches our forward
        assert cfg.attention_bias and cfg.tie_word_embeddings
    if request.param == "mistral":
        assert cfg.sliding_windows == (8, 8) and cfg.q_size != cfg.hidden_size
    return model, cfg, loader.load_params(folder, cfg)


@pytest.fixture(scope="module")
def peft_folder(base, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    model, _, _ = base
    torch.manual_seed(11)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=6, target_modules=HF_TARGETS,
                                                         init_lora_weights=False, lora_dropout=0.0))
    with torch.no_grad():  # scale B up so the adapters change the logits a lot
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(20.0)
    folder = str(tmp_path_factory.mktemp("peft_adapter"))
    pm.save_pretrained(folder)
    return pm.eval(), folder


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def test_peft_folder_imported_gives_peft_logits(base, peft_folder):
    model, cfg, params = base
    pm, folder = peft_folder
    lora = MicroLoRA.from_peft(folder, cfg)
    assert set(lora.dims) == set(ALL_MODULES) and float(lora.state.scaling) == 3.0
    tokens = rng_tokens(12, seed=3)  # longer than mistral's window of 8
    want = _torch_logits(pm, tokens)
    plain = np.asarray(llama.forward(params, cfg, jnp.asarray(tokens)))
    assert np.max(np.abs(plain - want)) > 1e-2  # the adapters matter
    got = np.asarray(llama.forward(params, cfg, jnp.asarray(tokens), adapters=lora.adapters))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_our_export_loads_in_peft_with_the_same_logits(base, tmp_path):
    from peft import PeftModel

    model, cfg, params = base
    lora = MicroLoRA.for_model(cfg, target_modules=ALL_MODULES, rank=2, alpha=5.0, seed=2, dropout=0.5)
    keys = iter(jax.random.split(jax.random.PRNGKey(5), 64))
    lora.state = lora.state.replace(params=jax.tree.map(
        lambda p: p + 0.3 * jax.random.normal(next(keys), p.shape), lora.state.params))
    lora.export_peft(str(tmp_path))
    with open(tmp_path / "adapter_config.json") as f:
        conf = json.load(f)
    assert (conf["lora_alpha"], conf["lora_dropout"]) == (5.0, 0.5)
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    tokens = rng_tokens(10, seed=4)
    got = np.asarray(llama.forward(params, cfg, jnp.asarray(tokens), adapters=lora.adapters))
    want = _torch_logits(pm, tokens)  # eval mode: PEFT applies no dropout at inference, nor do we
    assert np.max(np.abs(got - np.asarray(llama.forward(params, cfg, jnp.asarray(tokens))))) > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4)
    torch.manual_seed(0)
    assert np.max(np.abs(_torch_logits(pm.train(), tokens) - want)) > 1e-3  # the exported dropout is live in PEFT
    pm.eval()
    again = MicroLoRA.from_peft(str(tmp_path), cfg)
    for x, y in zip(jax.tree.leaves(again.state.params), jax.tree.leaves(lora.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@LLAMA_ONLY
@pytest.mark.parametrize("option, value", [("use_rslora", True), ("use_dora", True), ("alpha_pattern", {"q_proj": 8}),
                                           ("bias", "all"), ("peft_type", "LOHA"), ("rank_pattern", {"v_proj": 4}),
                                           ("fan_in_fan_out", True), ("modules_to_save", ["lm_head"]),
                                           ("lora_bias", True)])
def test_unsupported_peft_options_are_rejected_by_name(base, peft_folder, tmp_path, option, value):
    _, cfg, _ = base
    _, folder = peft_folder
    for name in os.listdir(folder):
        (tmp_path / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    conf[option] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(AdapterError, match=option if option != "peft_type" else "LOHA"):
        MicroLoRA.from_peft(str(tmp_path), cfg)


@LLAMA_ONLY
def test_adapter_for_a_module_or_shape_the_model_lacks_is_rejected(base, peft_folder, tmp_path):
    from ruvllm_jax.models.safetensors_io import SafetensorsFile, save_file

    _, cfg, _ = base
    _, folder = peft_folder
    st = SafetensorsFile(os.path.join(folder, "adapter_model.safetensors"))
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    (tmp_path / "adapter_config.json").write_text(open(os.path.join(folder, "adapter_config.json")).read())
    extra = dict(tensors, **{"base_model.model.lm_head.lora_A.weight": np.zeros((2, 64), np.float32)})
    save_file(extra, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="lm_head"):
        MicroLoRA.from_peft(str(tmp_path), cfg)
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    save_file(dict(tensors, **{key: np.zeros((64, 2), np.float32)}), tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"k_proj.lora_B.weight' has shape \(64, 2\), the model needs \(32, 2\)"):
        MicroLoRA.from_peft(str(tmp_path), cfg)


def _copy_folder(folder, dest):
    for name in os.listdir(folder):
        (dest / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    return dest


@LLAMA_ONLY
def test_missing_folder_or_file_raises_adapter_error(base, peft_folder, tmp_path):
    _, cfg, _ = base
    with pytest.raises(AdapterError, match=r"adapter_config.json' does not exist: not a PEFT adapter folder"):
        MicroLoRA.from_peft(str(tmp_path / "nowhere"), cfg)
    _copy_folder(peft_folder[1], tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors' does not exist"):
        MicroLoRA.from_peft(str(tmp_path), cfg)


@LLAMA_ONLY
@pytest.mark.parametrize("text, match", [
    ("{not json", "is not valid JSON"),
    ('{"r": 2, "lora_alpha"', "is not valid JSON"),  # cut short
    (b"\xff\xfe{}", "is not valid JSON"),
    ("[2, 6]", "must hold a JSON object, got list"),
    ('{"lora_alpha": 6}', "r must be a positive integer, got None"),
    ('{"r": 0, "lora_alpha": 6}', "r must be a positive integer, got 0"),
    ('{"r": 2, "lora_alpha": "six"}', "lora_alpha must be a finite number, got 'six'"),
], ids=["not_json", "cut_short", "not_utf8", "a_list", "no_r", "zero_r", "alpha_not_a_number"])
def test_corrupt_adapter_config_raises_adapter_error(base, peft_folder, tmp_path, text, match):
    _, cfg, _ = base
    _copy_folder(peft_folder[1], tmp_path)
    target = tmp_path / "adapter_config.json"
    target.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(AdapterError, match=match):
        MicroLoRA.from_peft(str(tmp_path), cfg)


@LLAMA_ONLY
def test_truncated_weights_raise_model_error(base, peft_folder, tmp_path):
    _, cfg, _ = base
    _copy_folder(peft_folder[1], tmp_path)
    w = tmp_path / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:5])
    with pytest.raises(ModelError, match="is truncated"):
        MicroLoRA.from_peft(str(tmp_path), cfg)
    _copy_folder(peft_folder[1], tmp_path)
    w.write_bytes(w.read_bytes()[:-8])  # header intact, the last tensor's bytes cut
    with pytest.raises(ModelError):
        MicroLoRA.from_peft(str(tmp_path), cfg)


@LLAMA_ONLY
def test_wrong_shapes_layers_and_half_pairs_are_rejected(base, peft_folder, tmp_path):
    from ruvllm_jax.models.safetensors_io import SafetensorsFile, save_file

    _, cfg, _ = base
    _copy_folder(peft_folder[1], tmp_path)
    w = tmp_path / "adapter_model.safetensors"
    st = SafetensorsFile(os.path.join(peft_folder[1], "adapter_model.safetensors"))
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    prefix = "base_model.model.model.layers"
    cases = [
        ({f"{prefix}.0.mlp.down_proj.lora_A.weight": np.zeros((2, 64), np.float32)},
         r"down_proj.lora_A.weight' has shape \(2, 64\), the model needs \(2, 128\)"),
        ({f"{prefix}.0.self_attn.q_proj.lora_A.weight": np.zeros((3, 64), np.float32)},  # rank 3, config r = 2
         r"q_proj.lora_A.weight' has shape \(3, 64\), the model needs \(2, 64\)"),
        ({f"{prefix}.5.self_attn.q_proj.lora_A.weight": np.zeros((2, 64), np.float32)},
         "is for layer 5, the model has 2 layers"),
    ]
    for extra, match in cases:
        save_file({**tensors, **extra}, w)
        with pytest.raises(AdapterError, match=match):
            MicroLoRA.from_peft(str(tmp_path), cfg)
    half = {k: v for k, v in tensors.items() if k != f"{prefix}.1.self_attn.v_proj.lora_B.weight"}
    save_file(half, w)  # a pair cut in half is corrupt, not a layer PEFT left out
    with pytest.raises(AdapterError, match="layer 1 self_attn.v_proj has lora_A but not its pair"):
        MicroLoRA.from_peft(str(tmp_path), cfg)
    save_file({}, w)
    with pytest.raises(AdapterError, match="holds no LoRA tensors"):
        MicroLoRA.from_peft(str(tmp_path), cfg)

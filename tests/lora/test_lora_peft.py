"""PEFT interop against peft itself: its folders imported give its logits; ours exported, it loads to ours."""

from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ruvllm_jax.errors import AdapterError
from ruvllm_jax.lora import ALL_MODULES, MicroLoRA
from ruvllm_jax.models import llama, loader
from ruvllm_jax.testing import build_hf_model, rng_tokens, save_hf_model

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = build_hf_model("llama", seed=4)
    folder = save_hf_model(model, str(tmp_path_factory.mktemp("lora_base")))
    cfg = loader.load_config(folder)
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
    tokens = rng_tokens(12, seed=3)
    want = _torch_logits(pm, tokens)
    plain = np.asarray(llama.forward(params, cfg, jnp.asarray(tokens)))
    assert np.max(np.abs(plain - want)) > 1e-2  # the adapters matter
    got = np.asarray(llama.forward(params, cfg, jnp.asarray(tokens), adapters=lora.adapters))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_our_export_loads_in_peft_with_the_same_logits(base, tmp_path):
    from peft import PeftModel

    model, cfg, params = base
    lora = MicroLoRA.for_model(cfg, target_modules=ALL_MODULES, rank=2, alpha=5.0, seed=2)
    keys = iter(jax.random.split(jax.random.PRNGKey(5), 64))
    lora.state = lora.state.replace(params=jax.tree.map(
        lambda p: p + 0.3 * jax.random.normal(next(keys), p.shape), lora.state.params))
    lora.export_peft(str(tmp_path))
    with open(tmp_path / "adapter_config.json") as f:
        assert json.load(f)["lora_alpha"] == 5.0
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    tokens = rng_tokens(10, seed=4)
    got = np.asarray(llama.forward(params, cfg, jnp.asarray(tokens), adapters=lora.adapters))
    want = _torch_logits(pm, tokens)
    assert np.max(np.abs(got - np.asarray(llama.forward(params, cfg, jnp.asarray(tokens))))) > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4)
    again = MicroLoRA.from_peft(str(tmp_path), cfg)
    for x, y in zip(jax.tree.leaves(again.state.params), jax.tree.leaves(lora.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("option, value", [("use_rslora", True), ("use_dora", True), ("alpha_pattern", {"q_proj": 8}),
                                           ("bias", "all"), ("peft_type", "LOHA")])
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

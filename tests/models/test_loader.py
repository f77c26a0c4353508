"""Loading checkpoints: sharded and bf16 folders, tied/untied heads, and every way a folder can be bad.

Good folders are written by transformers' `save_pretrained`; bad ones are made from them by cutting,
corrupting or rewriting files with the `safetensors` library, so the reader is checked against files
it did not write itself. Every failure must raise its `RuvLLMError` subclass naming the culprit.
"""

from __future__ import annotations

import json
import os
import shutil

import huggingface_hub.constants
import jax
import numpy as np
import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from ruvllm_jax.backend.jax_backend import JaxBackend
from ruvllm_jax.errors import ModelError, NotFoundError
from ruvllm_jax.models import loader
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.testing import build_hf_model, save_hf_model


def hf_state(model) -> dict[str, np.ndarray]:
    """transformers' tensors by name, float32 (tied lm_head left out, as save_pretrained does)."""
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def assert_params_equal_hf(params, cfg, model) -> None:
    ours = loader.to_hf_tensors(params, cfg)
    ref = hf_state(model)
    assert sorted(ours) == sorted(ref)
    for name, a in ref.items():
        np.testing.assert_array_equal(ours[name], a, err_msg=name)


@pytest.fixture
def llama_copy(llama_dir, tmp_path):
    """A private copy of the saved llama folder that a test may damage."""
    model, folder = llama_dir
    dst = str(tmp_path / "m")
    shutil.copytree(folder, dst)
    return model, dst


def test_every_family_loads_hf_tensors_exactly(hf_model_dir):
    _, model, folder = hf_model_dir
    cfg = loader.load_config(folder)
    assert_params_equal_hf(loader.load_params(folder, cfg), cfg, model)


def test_untied_llama_has_its_own_lm_head(llama_dir):
    model, folder = llama_dir
    cfg = loader.load_config(folder)
    params = loader.load_params(folder, cfg)
    assert not cfg.tie_word_embeddings
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), model.lm_head.weight.detach().numpy())
    assert not np.array_equal(np.asarray(params["lm_head"]), np.asarray(params["embed"]))
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


def test_sharded_checkpoint_loads_identically(llama_dir, tmp_path):
    model, folder = llama_dir
    sharded = save_hf_model(model, str(tmp_path), max_shard_size="20KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
    cfg = loader.load_config(sharded)
    a, b = loader.load_params(sharded, cfg), loader.load_params(folder, cfg)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bf16_checkpoint_loads_as_upcast_bf16_weights(tmp_path):
    model = build_hf_model("qwen2", seed=11).to(torch.bfloat16)
    folder = save_hf_model(model, str(tmp_path))
    cfg = loader.load_config(folder)
    assert cfg.torch_dtype == "bfloat16"
    params = loader.load_params(folder, cfg)
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(params))
    assert_params_equal_hf(params, cfg, model.float())  # bf16-rounded values, upcast exactly


def test_missing_folder_is_not_found(tmp_path):
    missing = str(tmp_path / "nowhere" / "model")
    with pytest.raises(NotFoundError, match="nowhere"):
        loader.resolve_model_path(missing)
    with pytest.raises(NotFoundError, match="nowhere"):
        JaxBackend.new().load_model(missing)


def test_unreachable_hub_id_is_not_found(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = "ruvllm-test/no-such-model-3141"
    with pytest.raises(NotFoundError, match="no-such-model-3141") as e:
        loader.resolve_model_path(repo)
    assert "neither in the local Hugging Face cache nor reachable" in str(e.value)
    with pytest.raises(NotFoundError, match="no-such-model-3141"):
        JaxBackend.new().download_model(repo, cache_dir=str(tmp_path))


def test_hub_id_in_the_local_cache_loads_offline(llama_dir, monkeypatch, tmp_path):
    """A hub id already in the HF cache resolves without the network (the layout huggingface_hub
    writes: models--org--name/refs/main -> snapshots/<commit>/files)."""
    model, folder = llama_dir
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "a" * 40
    repo = tmp_path / "models--ruvllm-test--tiny-llama"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    b = JaxBackend.new()
    b.load_model("ruvllm-test/tiny-llama")
    assert b.model_info().name == "ruvllm-test/tiny-llama"
    assert b.model_info().path == str(repo / "snapshots" / commit)
    assert b.model_info().num_parameters == sum(p.numel() for p in model.parameters())


def test_folder_without_config_is_not_found(llama_copy):
    _, folder = llama_copy
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(NotFoundError, match="config.json"):
        loader.load_config(folder)
    with pytest.raises(NotFoundError, match="config.json"):
        JaxBackend.new().load_model(folder)


def test_folder_without_weights_is_not_found(llama_copy):
    _, folder = llama_copy
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(NotFoundError, match="model.safetensors"):
        JaxBackend.new().load_model(folder)


def _edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_unsupported_model_type_is_named(llama_copy):
    _, folder = llama_copy
    _edit_config(folder, model_type="gpt2")
    with pytest.raises(ModelError, match="'gpt2'"):
        JaxBackend.new().load_model(folder)


def test_invalid_json_config_is_a_model_error(llama_copy):
    _, folder = llama_copy
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write('{"model_type": "llama", "hidden_size": ')
    with pytest.raises(ModelError, match="config.json.*not valid JSON"):
        JaxBackend.new().load_model(folder)


def test_truncated_safetensors_names_the_file(llama_copy):
    _, folder = llama_copy
    path = os.path.join(folder, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ModelError, match="model.safetensors.*truncated"):
        JaxBackend.new().load_model(folder)
    with open(path, "r+b") as f:
        f.truncate(5)  # not even the header length
    with pytest.raises(ModelError, match="model.safetensors.*truncated"):
        JaxBackend.new().load_model(folder)


def test_corrupt_safetensors_header_names_the_file(llama_copy):
    _, folder = llama_copy
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe not json at all")
    with pytest.raises(ModelError, match="model.safetensors.*unreadable header"):
        JaxBackend.new().load_model(folder)
    with open(path, "r+b") as f:
        f.write((1 << 40).to_bytes(8, "little"))  # header length beyond the end of the file
    with pytest.raises(ModelError, match="model.safetensors.*corrupt or truncated"):
        JaxBackend.new().load_model(folder)


def test_missing_tensor_is_named(llama_copy):
    _, folder = llama_copy
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'.*missing"):
        JaxBackend.new().load_model(folder)


def test_wrong_shape_names_tensor_and_shapes(llama_copy):
    _, folder = llama_copy
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight'.*\[16, 64\].*\[32, 64\]"):
        JaxBackend.new().load_model(folder)


def _overlap_two_tensors(folder: str) -> str:
    """Point layer 1's k_proj at layer 0's bytes (same size): a header the package rejects, that used to load."""
    path = os.path.join(folder, "model.safetensors")
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    k0, k1 = "model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    header[k1]["data_offsets"] = header[k0]["data_offsets"]
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])
    return path


def test_overlapping_data_offsets_are_refused(llama_copy):
    """Regression: two tensors sharing bytes loaded, and the model then generated other text."""
    _, folder = llama_copy
    path = _overlap_two_tensors(folder)
    with pytest.raises(SafetensorError, match="invalid offset"):
        safe_open(path, framework="numpy")
    with pytest.raises(ModelError, match=r"model\.safetensors.*k_proj\.weight' data_offsets .* overlap tensor"):
        JaxBackend.new().load_model(folder)


def test_llama3_rope_without_factor_is_refused_at_load(llama_copy):
    """Regression: it loaded, and then every generate failed with a KeyError inside inv_freq."""
    _, folder = llama_copy
    _drop_rope_factor(folder)
    with pytest.raises(ModelError, match=r"config\.json.*rope_type 'llama3' needs 'factor' in rope_parameters"):
        loader.load_config(folder)
    with pytest.raises(ModelError, match="'factor'"):
        JaxBackend.new().load_model(folder)
    rope = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}  # the legacy field alike
    with pytest.raises(ModelError, match=r"rope_type 'llama3' needs 'factor' in rope_scaling"):
        LlamaConfig.from_hf_dict({**TestConfigFromDict.BASE, "rope_scaling": rope})


def _drop_rope_factor(folder: str) -> None:
    with open(os.path.join(folder, "config.json")) as f:
        rope = json.load(f)["rope_parameters"]
    assert rope["rope_type"] == "llama3"
    del rope["factor"]
    _edit_config(folder, rope_parameters=rope)


def test_generation_config_eos_is_checked(llama_copy):
    _, folder = llama_copy
    path = os.path.join(folder, "generation_config.json")
    for eos, shown in [("1", "'1'"), ([1, 2.0], r"\[1, 2.0\]"), (-1, "-1"), (10**6, "1000000"), (True, "True")]:
        with open(path, "w") as f:
            json.dump({"eos_token_id": eos}, f)
        with pytest.raises(ModelError, match=rf"generation_config\.json.*'eos_token_id' is {shown}, expected"):
            JaxBackend.new().load_model(folder)
    with open(path, "w") as f:
        f.write("[1]")
    with pytest.raises(ModelError, match=r"generation_config\.json.*holds list, expected an object"):
        JaxBackend.new().load_model(folder)
    with open(path, "w") as f:
        json.dump({"eos_token_id": [1, 5]}, f)
    backend = JaxBackend.new()
    backend.load_model(folder)
    assert backend.eos_token_ids == (1, 5)


def test_integer_weights_are_refused(llama_copy):
    _, folder = llama_copy
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    save_file(tensors, path)
    with pytest.raises(ModelError, match=r"'model\.norm\.weight' in .*model\.safetensors' has dtype I32, expected"):
        loader.load_params(folder, loader.load_config(folder))


def test_failed_load_keeps_the_previous_model(llama_dir, tmp_path):
    """A refused folder (config, weights or generation config) leaves the loaded model generating as before."""
    from ruvllm_jax.types import GenerateParams

    _, good = llama_dir
    greedy = GenerateParams(max_tokens=6, temperature=0.0, repetition_penalty=1.0)
    backend = JaxBackend.new()
    backend.load_model(good)
    before, tokens = backend.model_info(), backend.generate_tokens([0, 5, 9, 17], greedy)
    breakers = [
        lambda d: _edit_config(d, model_type="gpt2"),
        _drop_rope_factor,
        _overlap_two_tensors,
        lambda d: open(os.path.join(d, "generation_config.json"), "w").write('{"eos_token_id": "2"}'),
    ]
    for i, breaker in enumerate(breakers):
        bad = str(tmp_path / f"bad{i}")
        shutil.copytree(good, bad)
        breaker(bad)
        with pytest.raises(ModelError):
            backend.load_model(bad)
        assert backend.is_loaded() and backend.model_info() == before
    assert backend.generate_tokens([0, 5, 9, 17], greedy) == tokens


class TestConfigFromDict:
    BASE = dict(model_type="llama", vocab_size=100, hidden_size=32, intermediate_size=64,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)

    def test_legacy_rope_scaling_keys(self):
        """Legacy `rope_scaling: {type: linear}` parses, and its frequencies are transformers' own."""
        from transformers import LlamaConfig as HFLlamaConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        cfg = LlamaConfig.from_hf_dict({**self.BASE, "rope_theta": 500000.0,
                                        "rope_scaling": {"type": "linear", "factor": 4.0}})
        assert cfg.rope_type == "linear" and cfg.rope_theta == 500000.0
        hf = HFLlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2,
                           rope_scaling={"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0})
        ref, _ = ROPE_INIT_FUNCTIONS["linear"](hf, "cpu")
        assert cfg.head_dim == 8 and ref.shape == (4,)
        np.testing.assert_allclose(cfg.inv_freq(), ref.numpy(), rtol=1e-6)
        # transformers' current `rope_parameters` form of the same config reads the same.
        np.testing.assert_allclose(LlamaConfig.from_hf_dict(hf.to_dict()).inv_freq(), ref.numpy(), rtol=1e-6)
        default = LlamaConfig.from_hf_dict(self.BASE)
        assert default.rope_type == "default" and default.rope_theta == 10000.0

    def test_llama3_rope_matches_transformers_inv_freq(self):
        from transformers import LlamaConfig as HFLlamaConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
        hf = HFLlamaConfig(vocab_size=100, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, rope_scaling=rope, max_position_embeddings=1024)
        ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
        ours = LlamaConfig.from_hf_dict(hf.to_dict())
        assert ours.head_dim == 128
        np.testing.assert_allclose(ours.inv_freq(), ref.numpy(), rtol=1e-6)

    def test_unknown_rope_type_is_named(self):
        with pytest.raises(ModelError, match="'yarn'"):
            LlamaConfig.from_hf_dict({**self.BASE, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})

    def test_missing_field_is_named(self):
        cfg = dict(self.BASE)
        del cfg["hidden_size"]
        with pytest.raises(ModelError, match="'hidden_size'"):
            LlamaConfig.from_hf_dict(cfg)

    def test_bad_head_ratio_and_activation_are_model_errors(self):
        with pytest.raises(ModelError, match="num_key_value_heads=3"):
            LlamaConfig.from_hf_dict({**self.BASE, "num_key_value_heads": 3})
        with pytest.raises(ModelError, match="'gelu'"):
            LlamaConfig.from_hf_dict({**self.BASE, "hidden_act": "gelu"})

    def test_qwen2_sliding_window_layers(self):
        cfg = LlamaConfig.from_hf_dict({**self.BASE, "model_type": "qwen2", "use_sliding_window": True,
                                        "sliding_window": 16, "max_window_layers": 1})
        assert cfg.sliding_windows == (None, 16, 16) and cfg.attention_bias
        off = LlamaConfig.from_hf_dict({**self.BASE, "model_type": "qwen2", "sliding_window": 16})
        assert off.sliding_windows == (None, None, None)

    def test_mistral_window_and_eos_list(self):
        cfg = LlamaConfig.from_hf_dict({**self.BASE, "model_type": "mistral", "sliding_window": 4,
                                        "eos_token_id": [2, 7]})
        assert cfg.sliding_windows == (4, 4, 4) and cfg.eos_token_ids == (2, 7)

    BAD_FIELDS = [  # (changes, field the message names, value as shown)
        (dict(vocab_size="100"), "vocab_size", "'100'"),
        (dict(hidden_size=True), "hidden_size", "True"),
        (dict(intermediate_size=0), "intermediate_size", "0"),
        (dict(num_hidden_layers=-1), "num_hidden_layers", "-1"),
        (dict(num_attention_heads=4.0), "num_attention_heads", "4.0"),
        (dict(num_key_value_heads=0), "num_key_value_heads", "0"),
        (dict(num_key_value_heads=[2]), "num_key_value_heads", r"\[2\]"),
        (dict(head_dim=7), "head_dim", "7"),
        (dict(hidden_size=30), "hidden_size", "30"),  # not a multiple of 4 heads, no head_dim given
        (dict(head_dim=10**30), "head_dim", "1000000000000000000000000000000"),
        (dict(max_position_embeddings=2**31), "max_position_embeddings", "2147483648"),
        (dict(max_position_embeddings=None), "max_position_embeddings", "None"),
        (dict(rms_norm_eps=float("nan")), "rms_norm_eps", "nan"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps", "0.0"),
        (dict(rms_norm_eps="1e-6"), "rms_norm_eps", "'1e-6'"),
        (dict(rms_norm_eps=10**400), "rms_norm_eps", "1000"),
        (dict(rope_theta=float("inf")), "rope_theta", "inf"),
        (dict(rope_theta=-1), "rope_theta", "-1"),
        (dict(rope_theta=1e-320), "rope_theta", "1e-320"),
        (dict(rope_scaling="linear"), "rope_scaling", "'linear'"),
        (dict(rope_parameters=[1]), "rope_parameters", r"\[1\]"),
        (dict(rope_scaling={"rope_type": "linear"}), "needs 'factor'", "rope_scaling"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 0}), "rope_scaling.factor", "0"),
        (dict(rope_scaling={"type": "linear", "factor": "2"}), "rope_scaling.factor", "'2'"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": "big"}),
         "rope_parameters.rope_theta", "'big'"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}),
         "high_freq_factor", "4.0"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8.5}),
         "rope_scaling.original_max_position_embeddings", "8.5"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "extra": [1, 2]}), "rope_scaling.extra",
         r"\[1, 2\]"),
        (dict(rope_scaling={"rope_type": 3}), "rope_scaling.rope_type", "3"),
        (dict(hidden_act=["silu"]), "hidden_act", r"\['silu'\]"),
        (dict(model_type=None), "model_type", "None"),
        (dict(model_type="mistral", sliding_window=0), "sliding_window", "0"),
        (dict(sliding_window="4"), "sliding_window", "'4'"),
        (dict(model_type="qwen2", use_sliding_window="yes", sliding_window=4), "use_sliding_window", "'yes'"),
        (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4, layer_types=["full_attention"]),
         "layer_types", r"\['full_attention'\]"),
        (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4, layer_types=["full", "full", "full"]),
         "layer_types", "'full'"),
        (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=-1),
         "max_window_layers", "-1"),
        (dict(tie_word_embeddings="false"), "tie_word_embeddings", "'false'"),
        (dict(attention_bias=1), "attention_bias", "1"),
        (dict(mlp_bias=None), "mlp_bias", "None"),
        (dict(bos_token_id=100), "bos_token_id", "100"),
        (dict(pad_token_id=1.5), "pad_token_id", "1.5"),
        (dict(eos_token_id=[1, "2"]), "eos_token_id", r"\[1, '2'\]"),
        (dict(eos_token_id=-1), "eos_token_id", "-1"),
        (dict(eos_token_id={"id": 1}), "eos_token_id", r"\{'id': 1\}"),
        (dict(torch_dtype=5), "torch_dtype", "5"),
        (dict(dtype=["bfloat16"]), "dtype", r"\['bfloat16'\]"),
    ]

    @pytest.mark.parametrize("changes, field, shown", BAD_FIELDS, ids=[str(c) for c, _, _ in BAD_FIELDS])
    def test_bad_field_is_a_model_error_naming_file_field_and_value(self, changes, field, shown):
        with pytest.raises(ModelError, match=rf"config\.json.*{field}.*{shown}") as e:
            LlamaConfig.from_hf_dict({**self.BASE, **changes})
        assert "config.json" in str(e.value)

    def test_config_file_errors_name_the_path(self, tmp_path):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**self.BASE, "vocab_size": 0}))
        with pytest.raises(ModelError, match=rf"{tmp_path}/config\.json.*'vocab_size' is 0, expected a positive int"):
            LlamaConfig.from_json_file(path)
        path.write_text('{"vocab_size": ' + "9" * 5000 + "}")  # beyond Python's int-parsing limit
        with pytest.raises(ModelError, match="config.json.*not valid JSON"):
            LlamaConfig.from_json_file(path)
        path.write_text("[" * 100_000 + "]" * 100_000)
        with pytest.raises(ModelError, match="config.json.*not valid JSON"):
            LlamaConfig.from_json_file(path)
        with pytest.raises(ModelError, match="config.json holds 'x', expected an object"):
            LlamaConfig.from_hf_dict("x")

    def test_valid_edges_still_load(self):
        cfg = LlamaConfig.from_hf_dict({**self.BASE, "num_key_value_heads": None, "eos_token_id": [], "rope_theta": 1,
                                        "rope_scaling": {"type": "default", "factor": None}, "sliding_window": None,
                                        "pad_token_id": None, "rms_norm_eps": 1})
        assert cfg.num_kv_heads == 4 and cfg.eos_token_ids == () and cfg.rope_theta == 1.0 and cfg.rms_norm_eps == 1.0
        assert hash(cfg) == hash(LlamaConfig.from_hf_dict({**self.BASE, "num_key_value_heads": 4, "eos_token_id": [],
                                                           "rope_theta": 1.0, "rms_norm_eps": 1.0}))

    def test_non_object_config_file(self, tmp_path):
        path = tmp_path / "config.json"
        path.write_text("[1, 2]")
        with pytest.raises(ModelError, match="list"):
            LlamaConfig.from_json_file(path)

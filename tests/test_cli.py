"""The main job's entry points run end to end on a local model folder and stream what generate returns."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from ruvllm_jax import GenerateParams, JaxBackend
from ruvllm_jax.cli import main, stream_generation
from ruvllm_jax.models import llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stream_generation_writes_prompt_then_the_generated_text(llama_dir):
    _, folder = llama_dir
    params = GenerateParams(max_tokens=12, temperature=0.0, repetition_penalty=1.0)
    out, err = io.StringIO(), io.StringIO()
    text = stream_generation(folder, "To be", params, out=out, err=err)
    backend = JaxBackend.new()
    backend.load_model(folder)
    assert text == backend.generate("To be", params)
    assert out.getvalue() == "To be" + text + "\n"
    assert f"params on {backend.device()}" in err.getvalue()


def _expected(folder: str, prompt: str, params: GenerateParams) -> str:
    """What the library itself generates for these parameters: the oracle for the entry points."""
    backend = JaxBackend.new()
    backend.load_model(folder)
    return prompt + backend.generate(prompt, params) + "\n"


def test_console_script_generate_command_uses_every_flag(llama_dir, capsys):
    _, folder = llama_dir
    flags = ["--max-tokens", "9", "--seed", "3", "--temperature", "0.7", "--top-k", "40", "--top-p", "0.9",
             "--repetition-penalty", "1.2"]
    assert main(["generate", "--model", folder, "--prompt", "or not", *flags]) == 0
    out = capsys.readouterr().out
    params = GenerateParams(max_tokens=9, seed=3, temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.2)
    assert out == _expected(folder, "or not", params)
    # The flags change the text, so the comparison above would catch one that is ignored.
    for other in (params.replace(seed=4), params.replace(max_tokens=5), params.replace(temperature=0.0)):
        assert out != _expected(folder, "or not", other)


def _config_defaults():
    spec = importlib.util.spec_from_file_location("generate_config", os.path.join(REPO, "configs", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_experiment_script_reads_config_overrides(llama_dir):
    _, folder = llama_dir
    proc = subprocess.run(
        [sys.executable, "experiments/generate.py", "--config=configs/generate.py", f"--config.model={folder}",
         "--config.prompt=To be", "--config.max_tokens=7", "--config.temperature=0.6", "--config.seed=5",
         "--config.top_k=30"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    c = _config_defaults()
    params = GenerateParams(max_tokens=7, temperature=0.6, top_p=c.top_p, top_k=30,
                            repetition_penalty=c.repetition_penalty, seed=5)
    assert proc.stdout == _expected(folder, "To be", params)
    assert proc.stdout != _expected(folder, "To be", params.replace(seed=6))
    assert "params on" in proc.stderr
    assert "Unable to initialize backend" not in proc.stderr  # absl's default verbosity keeps jax quiet


def _run_cli(folder: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruvllm_jax.cli", "generate", "--model", folder, "--prompt", "To be",
         "--max-tokens", "2", "--temperature", "0", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def test_console_script_is_quiet_by_default_and_verbosity_brings_jax_logging_back(llama_dir):
    _, folder = llama_dir
    quiet = _run_cli(folder)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout.startswith("To be")
    # Our two progress lines, and no jax start-up INFO ("Unable to initialize backend 'tpu'...").
    assert "Unable to initialize backend" not in quiet.stderr
    assert not [line for line in quiet.stderr.splitlines() if line.startswith(("INFO", "DEBUG"))]
    assert len([line for line in quiet.stderr.splitlines() if line.startswith("[ruvllm-jax] ")]) == 2

    # Which INFO lines jax logs depends on the machine; its DEBUG "Initializing backend" always comes.
    debug = _run_cli(folder, "--verbosity", "2")
    assert debug.returncode == 0, debug.stderr[-2000:]
    assert "Initializing backend 'cpu'" in debug.stderr
    assert debug.stdout == quiet.stdout


def test_verbosity_sets_the_jax_loggers(llama_dir):
    import logging

    from ruvllm_jax.cli import set_jax_verbosity

    _, folder = llama_dir
    before = logging.getLogger("jax").level
    try:
        assert main(["generate", "--model", folder, "--prompt", "or", "--max-tokens", "1", "--verbosity", "1"]) == 0
        assert logging.getLogger("jax").level == logging.INFO == logging.getLogger("jaxlib").level
        set_jax_verbosity(0)
        assert logging.getLogger("jax").level == logging.WARNING
        set_jax_verbosity(5)  # clamped
        assert logging.getLogger("jax").level == logging.DEBUG
    finally:
        logging.getLogger("jax").setLevel(before)
        logging.getLogger("jaxlib").setLevel(before)


def test_eval_perplexity_script_scores_the_embedded_model(tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, "experiments/eval_perplexity.py", "--config=configs/eval_perplexity.py",
         "--config.texts=validation", "--config.max_tokens=2048", f"--config.output={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    result = json.loads(out.read_text())["texts"]["validation"]
    assert result["tokens"] == 2047  # 2048 tokens give 2047 predictions
    # The card reports 2.23 bits/byte on the whole validation split; its first 2k tokens are
    # easier (1.94 here) but nowhere near an untrained model's log2(2048) / 2.5 bytes ~ 4.4.
    assert 1.5 < result["bits_per_byte"] < 2.7


def test_train_script_runs_a_few_steps_and_exports_a_loadable_folder(tmp_path):
    export = tmp_path / "export"
    proc = subprocess.run(
        [sys.executable, "experiments/train_tiny.py", "--config=configs/train_tiny.py",
         f"--config.workdir={tmp_path / 'run'}", f"--config.export_dir={export}", "--config.loop.steps=3",
         "--config.loop.batch_size=2", "--config.loop.seq_len=64", "--config.loop.short_seq_len=32",
         "--config.loop.eval_windows=2", "--config.loop.log_every=1", "--config.loop.progress=False",
         "--config.model.num_layers=1", "--config.model.hidden_size=64", "--config.model.intermediate_size=128",
         "--config.vocab_size=300", "--config.sample_tokens=8", "--config.eval_stride=32"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    backend = JaxBackend.new()
    backend.load_model(str(export))
    assert backend.model_info().num_layers == 1
    assert isinstance(backend.generate("ROMEO:", GenerateParams(max_tokens=4, seed=0)), str)
    # transformers reads the folder too: the stated dtype is the stored one, and the logits agree.
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with safe_open(str(export / "model.safetensors"), "pt") as f:
        stored = {f.get_slice(name).get_dtype() for name in f.keys()}
    stated = json.loads((export / "config.json").read_text())["torch_dtype"]
    assert stored == {{"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[stated]}
    hf = AutoModelForCausalLM.from_pretrained(str(export), dtype="auto").eval()
    assert str(hf.dtype) == f"torch.{stated}"
    tokens = np.random.default_rng(0).integers(0, 300, size=(1, 20))
    with torch.no_grad():
        ref = hf.float()(torch.tensor(tokens)).logits.numpy()
    ours = llama.forward(backend.params, backend.config, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)

"""The main job's entry points run end to end on a local model folder and stream what generate returns."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from ruvllm_jax import GenerateParams, JaxBackend
from ruvllm_jax.cli import main, stream_generation

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
    assert "params on cpu" in err.getvalue()


def test_console_script_generate_command(llama_dir, capsys):
    _, folder = llama_dir
    assert main(["generate", "--model", folder, "--prompt", "or not", "--max-tokens", "5", "--seed", "3"]) == 0
    assert capsys.readouterr().out.startswith("or not")


def test_experiment_script_reads_config_overrides(llama_dir):
    _, folder = llama_dir
    proc = subprocess.run(
        [sys.executable, "experiments/generate.py", "--config=configs/generate.py", f"--config.model={folder}",
         "--config.prompt=To be", "--config.max_tokens=6", "--config.temperature=0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("To be")
    assert "params on cpu" in proc.stderr

"""Optional cross-check against llama.cpp on the very same GGUF file (runs where `llama-cpp-python` is
installed: `bash experiments/install_bench.sh`; CI does not install it, so there it is skipped and
proves nothing). The CI-run references for GGUF are transformers' GGUF loader and the gguf package."""

from __future__ import annotations

import warnings

import pytest

from ruvllm_jax import JaxBackend
from ruvllm_jax.models import gguf_io
from ruvllm_jax.types import GenerateParams

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_llama_cpp_reads_our_export_and_generates_our_greedy_text(tmp_path, qtype):
    b = JaxBackend()
    b.load_model()
    path = str(tmp_path / f"embedded-{qtype}.gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Q8_0 falls back to F16 for the 688-column down projection
        gguf_io.save_gguf(b.params, b.config, path, qtype=qtype, tokenizer=b.tokenizer(),
                          eos_token_ids=b.eos_token_ids)
    text = "ROMEO:\nBut soft, what light"
    llm = llama_cpp.Llama(model_path=path, n_threads=2, verbose=False)
    ours = JaxBackend()
    ours.load_model(path)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours.tokenizer().encode(text)
    theirs = llm(text, max_tokens=30, temperature=0.0)["choices"][0]["text"]
    assert ours.generate(text, GenerateParams(max_tokens=30, temperature=0.0, repetition_penalty=1.0)) == theirs

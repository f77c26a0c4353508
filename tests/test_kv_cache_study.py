"""The KV cache quality study (experiments/kv_cache_quality.py) runs end to end on its smoke config:
perplexity teacher-forced through each cache, an exact FP32 two-tier store reproducing the contiguous
cache, a Q8 store close to it, and the memory rows (the full study is the experiment)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import kv_cache_quality as study  # noqa: E402


def _config():
    spec = importlib.util.spec_from_file_location("kv_cache_quality_config", os.path.join(REPO, "configs",
                                                                                          "kv_cache_quality.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_the_smoke_study_runs_and_an_exact_store_matches_the_baseline(tmp_path):
    c = _config()
    c.smoke = True
    c.output = str(tmp_path / "kv_cache_quality.json")
    c.plot = ""
    study.run(c)
    with open(c.output, encoding="utf-8") as f:
        results = json.load(f)
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == [study.BASELINE_ROW, study.EXACT_ROW, study.FP16_ROW, "Q8 tail 16"]
    texts = ["alice", "shakespeare"]
    check = results["baseline_check_vs_forward"]
    assert check["agrees_to_1e-4"] and check["max_abs_logit_diff"] <= 1e-4

    base, exact, fp16, q8 = (rows[n] for n in (study.BASELINE_ROW, study.EXACT_ROW, study.FP16_ROW, "Q8 tail 16"))
    for t in texts:
        assert exact["ppl"][t] == pytest.approx(base["ppl"][t], rel=1e-5)
        assert fp16["ppl"][t] == pytest.approx(base["ppl"][t], rel=1e-3)
        assert q8["ppl"][t] == pytest.approx(base["ppl"][t], rel=0.03)
        assert q8["ppl_ratio_vs_fp16"][t] == pytest.approx(q8["ppl"][t] / fp16["ppl"][t])
    assert exact["max_abs_logprob_diff_vs_contiguous"] < 1e-4

    # Memory after a whole window: the Q8 store holds every token past the tail, at the layout's bytes.
    m = q8["memory"]
    assert m["total_tokens"] == c.smoke_overrides.window and m["evicted_tokens"] == 0
    assert m["tail_tokens"] <= 16 and m["store_tokens"] == m["total_tokens"] - m["tail_tokens"]
    assert m["layout_matches_stats"]
    assert m["store_compression_ratio"] == pytest.approx(512 / m["store_bytes_per_token_layer"])
    assert 1.8 < m["store_compression_ratio"] < 2.0
    assert fp16["memory"]["store_compression_ratio"] == pytest.approx(1.0)

    qwen = {(r["cache"], r["tokens"]): r for r in results["qwen_memory"]}
    assert qwen[("contiguous FP16", 4096)]["held_bytes"] == 24 * 2 * 2 * 64 * 2 * 4096
    q4 = qwen[("two-tier Q4 (tail 256 FP16)", 4096)]
    assert q4["store_compression_ratio"] == pytest.approx(512 / 144)  # 4-bit codes + f16 scales, blocks of 64
    assert q4["held_bytes"] <= q4["allocated_bytes"]
    assert any("KIVI-2" in n for n in results["not_implemented"])

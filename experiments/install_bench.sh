#!/usr/bin/env bash
# The benchmarks' own optional install (not the test extra): llama-cpp-python built from source
# for this CPU, for the llama.cpp rows of experiments/bench_decode.py.
#
#   bash experiments/install_bench.sh            # into the active Python's environment
#
# On machines with AMX, llama.cpp built with GGML_NATIVE=ON crashed (SIGSEGV) on Q8_0 / Q4_K_M
# files (see PERF-NOTES): there we build with the AVX-512 options explicitly and AMX off.
set -euo pipefail
PY="${PYTHON:-python}"
if [[ -z "${CMAKE_ARGS:-}" ]]; then
  if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    CMAKE_ARGS+=" -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
    CMAKE_ARGS+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  else
    CMAKE_ARGS="-DGGML_NATIVE=ON"
  fi
fi
export CMAKE_ARGS
echo "building llama-cpp-python with CMAKE_ARGS=$CMAKE_ARGS"
"$PY" -m pip install -q --no-binary llama-cpp-python "llama-cpp-python>=0.3" "psutil>=5"

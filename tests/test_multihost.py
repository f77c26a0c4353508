"""The multi-host path on one machine: several OS processes on localhost joined by `jax.distributed`.

Each process (`tests/multihost/worker.py`) gets 2 CPU devices (`XLA_FLAGS`), joins the cluster with
`ruvllm_jax.sharding.initialize_distributed` (gloo collectives) and builds global meshes over every
process's devices. `test_multihost_forward` loads the embedded model sharded (`load_params(layout=)`,
each process placing only its own shards), checks the shards, runs a jitted `llama.forward` on a
(processes, 2) and a (1, processes * 2) mesh and compares the gathered logits with a one-device
forward. `test_multihost_backend_generate` greedy-decodes with `JaxBackend` on a mesh over all
processes and compares with a one-device backend.

This process never imports jax for these tests: the workers are fresh interpreters.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost", "worker.py")
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_cluster(mode: str, timeout: float) -> tuple[list[int], list[str], str]:
    """Start NUM_PROCESSES workers, wait for all (killing the rest soon after one fails, and all at
    `timeout`); return their exit codes (a killed worker's is minus its signal), their outputs, and a
    report of everything for assertion messages."""
    port = _free_port()
    env = _worker_env()
    logs, procs = [], []
    try:
        for i in range(NUM_PROCESSES):
            log = tempfile.TemporaryFile(mode="w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, WORKER, str(i), str(NUM_PROCESSES), str(port), mode],
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        failed_at = None
        notes = []
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = now  # the others are likely stuck in a collective waiting for it
            if now > deadline or (failed_at is not None and now > failed_at + 15):
                why = f"timed out after {timeout:.0f} s" if now > deadline else "killed 15 s after a peer failed"
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        p.kill()
                        notes.append(f"worker {i} {why}")
                break
            time.sleep(0.2)
        codes = [p.wait() for p in procs]
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
        report = "\n".join(notes + [f"----- worker {i} (exit {c}) -----\n{o}"
                                    for i, (c, o) in enumerate(zip(codes, outputs, strict=True))])
        return codes, outputs, report
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def test_multihost_forward():
    """Sharded loading and a mesh forward across processes equal the one-device forward."""
    codes, outputs, report = _run_cluster("forward", timeout=240)
    assert codes == [0] * NUM_PROCESSES, f"multi-process workers failed (exit codes {codes}):\n{report}"
    for out in outputs:  # every check really ran in every process
        assert "collectives=gloo" in out and out.count("logits match") == 2 and "] OK" in out, report


def test_multihost_backend_generate():
    """`JaxBackend` greedy decoding on a mesh over every process's devices equals one-device decoding
    (the engine builds its decode state on the mesh inside jit: `device_put` cannot place a host state
    onto other processes' devices)."""
    codes, outputs, report = _run_cluster("backend", timeout=300)
    assert codes == [0] * NUM_PROCESSES, f"multi-process workers failed (exit codes {codes}):\n{report}"
    for out in outputs:
        assert "greedy tokens match" in out and "] OK" in out, report

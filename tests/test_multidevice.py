"""Runs tests/multidevice (sharded models on 8 virtual CPU devices) in a pytest process of its own.

jax fixes its device count when it starts, and this process has one device, so the sharded tests get
a fresh interpreter with `XLA_FLAGS=--xla_force_host_platform_device_count=8`. Any failure there
fails this test, with that run's report; a run that collected nothing fails too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_sharded_models_on_eight_virtual_devices():
    env = dict(os.environ, RUVLLM_JAX_MULTIDEVICE="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:randomly",
         os.path.join(HERE, "multidevice")],
        cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=1500)
    report = proc.stdout[-12000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, report
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 10 and "skipped" not in proc.stdout, report
    print(report[-600:])

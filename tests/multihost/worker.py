"""One process of a multi-process (multi-host) run on localhost:
`python worker.py PROCESS_ID NUM_PROCESSES PORT [forward|backend]` (default forward).

Started by `tests/test_multihost.py`, NUM_PROCESSES times, each with
`XLA_FLAGS=--xla_force_host_platform_device_count=D` and `JAX_PLATFORMS=cpu`. Every process:

1. joins the cluster with `ruvllm_jax.sharding.initialize_distributed` (coordinator on process 0,
   gloo CPU collectives) and checks it sees NUM_PROCESSES * D global devices, D of them its own;
2. (forward) loads the embedded model once unsharded onto its first local device (the reference), and for
   each global mesh below loads it again with `load_params(layout=ModelSharding)`, checks every split
   weight is really sharded (not fully addressable, this process holding only its own devices'
   shards, each equal to the reference's slice), runs a jitted `llama.forward` on the mesh (tokens
   split over ``data``), gathers
   the logits with `process_allgather` and compares them with the single-device forward's;
   meshes: (NUM_PROCESSES, D) (data across processes, model within) and (1, NUM_PROCESSES * D)
   (model across processes: every block's all-reduce crosses processes);
3. (backend) greedy-decodes with `JaxBackend.load_model(None, ModelConfig(mesh_shape=(1, all devices)))`
   (the model axis across processes) and compares the tokens with a one-device `JaxBackend` on the
   process's own first local device.

Exits 0 when everything holds; otherwise prints `WORKER <id> FAILED at <stage>: <error>` and a
traceback to stderr and exits 1 (2 for bad arguments).
"""

from __future__ import annotations

import os
import sys
import time
import traceback

STAGE = "start"
PID = -1
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[worker {PID} +{time.monotonic() - T0:5.1f}s] {msg}", flush=True)


def stage(name: str) -> None:
    global STAGE
    STAGE = name
    log(name)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


TOKENS = [[0, 17, 250, 3, 99, 1024, 7, 512], [0, 5, 6, 2047, 40, 41, 300, 12]]  # [B=2, S=8], fixed
PROMPT = [0, 17, 250, 3, 99, 1024, 7]
MAX_TOKENS = 8


def run(pid: int, nproc: int, port: int, mode: str) -> None:
    stage("initialize_distributed")
    from ruvllm_jax.sharding import initialize_distributed

    initialize_distributed(f"localhost:{port}", num_processes=nproc, process_id=pid)

    import jax
    from jax.experimental import multihost_utils

    stage("topology")
    local = jax.local_devices()
    n_local = len(local)
    log(f"process_index={jax.process_index()} process_count={jax.process_count()} "
        f"devices={len(jax.devices())} local={[d.id for d in local]} "
        f"collectives={jax.config.jax_cpu_collectives_implementation}")
    check(jax.process_index() == pid, f"process_index {jax.process_index()} != {pid}")
    check(jax.process_count() == nproc, f"process_count {jax.process_count()} != {nproc}")
    check(n_local >= 2, f"expected >= 2 local devices (XLA_FLAGS), got {n_local}")
    check(len(jax.devices()) == nproc * n_local, f"{len(jax.devices())} global devices, expected {nproc * n_local}")
    check(all(d.process_index == pid for d in local), "a local device belongs to another process")

    if mode == "forward":
        check_forward(pid, nproc, local)
    else:
        check_backend(nproc, local)

    stage("shutdown")
    multihost_utils.sync_global_devices("ruvllm_jax multihost worker done")
    jax.distributed.shutdown()


def check_forward(pid: int, nproc: int, local) -> None:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from ruvllm_jax.backend.jax_backend import default_model_path
    from ruvllm_jax.kernels import KernelOptions
    from ruvllm_jax.models import llama, loader
    from ruvllm_jax.sharding import ModelSharding, make_mesh

    n_local = len(local)
    stage("reference: load_params on the first local device, jitted forward")
    path = default_model_path()
    cfg = loader.load_config(path)
    dev0 = local[0]
    ref_params = loader.load_params(path, cfg, device=dev0)
    tokens_np = np.asarray(TOKENS, np.int32)
    ref_fwd = jax.jit(lambda p, t: llama.forward(p, cfg, t))
    ref_logits = np.asarray(ref_fwd(ref_params, jax.device_put(tokens_np, dev0)))
    check(ref_logits.shape == (*tokens_np.shape, cfg.vocab_size), f"reference logits shape {ref_logits.shape}")
    check(bool(np.isfinite(ref_logits).all()), "reference logits are not finite")

    for shape in ((nproc, n_local), (1, nproc * n_local)):
        stage(f"mesh {shape}: load_params(layout=ModelSharding)")
        mesh = make_mesh(shape)
        layout = ModelSharding.create(cfg, mesh)
        params = loader.load_params(path, cfg, layout=layout)
        check_sharded(params, layout.split_fused(ref_params), pid, local, layout)

        stage(f"mesh {shape}: jitted llama.forward on the mesh, process_allgather of the logits")
        tokens = jax.make_array_from_callback(tokens_np.shape, layout.batch(tokens_np.shape[0], 2),
                                              lambda i: tokens_np[i])
        kernel = KernelOptions(mesh=mesh)
        fwd = jax.jit(lambda p, t, kernel=kernel: llama.forward(p, cfg, t, kernel=kernel))
        logits = fwd(params, tokens)
        check(not logits.is_fully_addressable, "the mesh forward's logits are fully addressable (not global)")
        gathered = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
        check(gathered.shape == ref_logits.shape, f"gathered logits shape {gathered.shape} != {ref_logits.shape}")
        np.testing.assert_allclose(gathered, ref_logits, rtol=1e-5, atol=1e-5,
                                   err_msg=f"mesh {shape} logits differ from the single-device forward")
        log(f"mesh {shape}: logits match (max abs diff {np.abs(gathered - ref_logits).max():.2e}), "
            f"logits sharding {logits.sharding.spec}")


def check_backend(nproc: int, local) -> None:
    import jax

    import ruvllm_jax

    n_local = len(local)
    gp = ruvllm_jax.GenerateParams(max_tokens=MAX_TOKENS, temperature=0.0)
    shape = (1, nproc * n_local)  # the model axis across processes: every block's all-reduce crosses them
    stage(f"backend: JaxBackend.load_model(mesh_shape={shape}) + greedy generate_tokens")
    backend = ruvllm_jax.JaxBackend()
    backend.load_model(None, ruvllm_jax.ModelConfig(mesh_shape=shape))
    check(backend.mesh is not None and backend.mesh.devices.size == nproc * n_local,
          "the backend's mesh does not span every process's devices")
    toks = backend.generate_tokens(PROMPT, gp)
    log(f"mesh {shape}: greedy tokens {toks}")

    stage("backend: one-device JaxBackend greedy reference")
    # The plain backend on this process's own first device (`DeviceType.best()` would name the
    # global first device, process 0's, which the other processes cannot address).
    single = ruvllm_jax.JaxBackend(ruvllm_jax.DeviceType("cpu", jax.devices("cpu").index(local[0])))
    single.load_model(None)
    ref_tokens = single.generate_tokens(PROMPT, gp)
    check(len(ref_tokens) > 0, "the one-device backend generated no tokens")
    check(toks == ref_tokens, f"mesh {shape} greedy tokens {toks} != one-device {ref_tokens}")
    log(f"mesh {shape}: greedy tokens match the one-device backend's")


def check_sharded(params, ref, pid, local, layout) -> None:
    """Every weight the layout splits is a global array this process holds only its own shards of,
    each equal to the reference's slice; replicated ones match too."""
    import jax
    import numpy as np

    local_set = set(local)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    ref_flat = dict(jax.tree_util.tree_flatten_with_path(ref)[0])
    check(len(flat) == len(ref_flat), f"{len(flat)} sharded leaves vs {len(ref_flat)} reference leaves")
    n_split = 0
    for key, x in flat:
        name = jax.tree_util.keystr(key)
        want = np.asarray(ref_flat[key])
        check(tuple(x.shape) == want.shape, f"{name}: shape {x.shape} != reference {want.shape}")
        check(not x.is_fully_addressable, f"{name}: a global mesh array should not be fully addressable")
        shards = x.addressable_shards
        check({s.device for s in shards} == local_set,
              f"{name}: its addressable shards are not on exactly this process's devices")
        check(len(x.sharding.device_set) == layout.mesh.devices.size, f"{name}: not laid out over the whole mesh")
        for s in shards:
            np.testing.assert_array_equal(np.asarray(s.data), want[s.index], err_msg=f"{name}: shard {s.index} differs")
        if any(a is not None for a in x.sharding.spec):
            n_split += 1
            per = shards[0].data.shape
            check(int(np.prod(per)) * layout.model == int(np.prod(x.shape)),
                  f"{name}: per-device shard {per} is not 1/{layout.model} of {x.shape}")
            if layout.data == 1:  # model axis across processes: this process holds part of the weight only
                held = {tuple((sl.start, sl.stop) for sl in s.index) for s in shards}
                check(len(held) == len(local), f"{name}: local shards overlap")
                check(len(held) * int(np.prod(per)) < int(np.prod(x.shape)),
                      f"{name}: this process holds the whole weight")
    check(n_split > 0, "no weight is split over the mesh")
    log(f"mesh {tuple(layout.mesh.devices.shape)}: {n_split} of {len(flat)} weights split, "
        f"each process holding only its {len(local)} devices' shards")


def main(argv) -> int:
    global PID
    if len(argv) not in (4, 5) or argv[4:] not in ([], ["forward"], ["backend"]):
        print(f"usage: {argv[0]} PROCESS_ID NUM_PROCESSES PORT [forward|backend]", file=sys.stderr)
        return 2
    pid, nproc, port = (int(a) for a in argv[1:4])
    mode = argv[4] if len(argv) == 5 else "forward"
    PID = pid
    log(f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r} JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r}")
    try:
        run(pid, nproc, port, mode)
    except BaseException as e:  # noqa: BLE001 - report anything, then fail
        print(f"WORKER {pid} FAILED at {STAGE!r}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    log("OK")
    return 0


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # On failure skip interpreter teardown: jax's atexit shutdown would wait on peers that may be gone.
    if code:
        os._exit(code)
    sys.exit(code)

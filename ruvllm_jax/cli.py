"""`ruvllm-jax` console script: `ruvllm-jax generate --prompt "..."` streams text to stdout."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Optional, Sequence

from ruvllm_jax.types import GenerateParams, ModelConfig, Precision

# --verbosity N -> the level of the `jax` and `jaxlib` loggers. 0 keeps jax's start-up INFO lines
# ("Unable to initialize backend 'tpu'...") off the terminal; warnings always show.
VERBOSITY_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


def set_jax_verbosity(verbosity: int) -> None:
    """Set the `jax`/`jaxlib` loggers to `VERBOSITY_LEVELS[verbosity]` (below 0 counts as 0, above
    2 as 2). Only levels: records go to whatever handlers the program has (absl's, basicConfig's)."""
    level = VERBOSITY_LEVELS[min(max(int(verbosity), 0), max(VERBOSITY_LEVELS))]
    for name in ("jax", "jaxlib"):
        logging.getLogger(name).setLevel(level)


def stream_generation(
    model: Optional[str], prompt: str, params: GenerateParams, *, max_context: int = 4096,
    precision: Optional[Precision] = None, out=None, err=None,
) -> str:
    """Load `model` (None = embedded), stream the continuation of `prompt` to `out`, return it."""
    out, err = out or sys.stdout, err or sys.stderr
    from ruvllm_jax.backend import JaxBackend

    t0 = time.perf_counter()
    backend = JaxBackend.new()
    backend.load_model(model or None, ModelConfig(max_context=max_context, quantization=precision))
    info = backend.model_info()
    print(f"[ruvllm-jax] {info.name}: {info.num_parameters / 1e6:.1f}M params on {backend.device()} "
          f"(loaded in {time.perf_counter() - t0:.1f}s; weights {info.dtype})", file=err)
    pieces: list[str] = []

    def emit(piece: str) -> bool:
        pieces.append(piece)
        out.write(piece)
        out.flush()
        return True

    out.write(prompt)
    t1 = time.perf_counter()
    backend.generate_stream(prompt, params, emit)
    out.write("\n")
    print(f"[ruvllm-jax] {len(''.join(pieces))} chars in {time.perf_counter() - t1:.1f}s "
          f"(compile included)", file=err)
    return "".join(pieces)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ruvllm-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text, streamed to stdout")
    g.add_argument("--model", default=None,
                   help="hub id, local folder or .gguf file (default: the embedded model)")
    g.add_argument("--prompt", default="ROMEO:\n")
    g.add_argument("--max-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.1)
    g.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-context", type=int, default=4096)
    g.add_argument("--precision", choices=["keep", *Precision.__members__], default="keep",
                   help="weights as the file holds them (keep), or converted at load: FP32 FP16 BF16 Q8 Q4 Q4K")
    g.add_argument("--verbosity", type=int, choices=sorted(VERBOSITY_LEVELS), default=0,
                   help="jax's logging: 0 = warnings only (default), 1 = info, 2 = debug")
    args = parser.parse_args(argv)
    logging.basicConfig()  # a stderr handler for the jax records let through (no-op if the root has one)
    set_jax_verbosity(args.verbosity)
    params = GenerateParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, stop_sequences=tuple(args.stop), seed=args.seed,
    )
    stream_generation(args.model, args.prompt, params, max_context=args.max_context,
                      precision=None if args.precision == "keep" else Precision[args.precision])
    return 0


if __name__ == "__main__":
    sys.exit(main())

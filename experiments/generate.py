"""The main job: stream a continuation of a prompt from a model (default: the embedded one).

    python experiments/generate.py
    python experiments/generate.py --config=configs/generate.py --config.prompt="JULIET:" --config.max_tokens=100
    python experiments/generate.py --config.model=Qwen/Qwen2.5-0.5B --config.temperature=0
    python experiments/generate.py --verbosity=1  # jax's INFO logging too (2: debug)

Progress and timing go to stderr, the text to stdout. absl's `--verbosity` (default 0) also sets
jax's loggers, as the `ruvllm-jax generate --verbosity` option does: 0 keeps them to warnings.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from ruvllm_jax.cli import set_jax_verbosity, stream_generation
from ruvllm_jax.types import GenerateParams, Precision

_CONFIG = config_flags.DEFINE_config_file("config", "configs/generate.py", "Generation config.")


def main(argv):
    del argv
    set_jax_verbosity(flags.FLAGS.verbosity)
    c = _CONFIG.value
    params = GenerateParams(
        max_tokens=c.max_tokens, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
        repetition_penalty=c.repetition_penalty,
        stop_sequences=tuple(s for s in c.stop_sequences.split(",") if s),
        seed=None if c.seed < 0 else c.seed,
    )
    stream_generation(c.model or None, c.prompt, params, max_context=c.max_context, precision=Precision[c.precision])


if __name__ == "__main__":
    app.run(main)

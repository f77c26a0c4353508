"""`JaxBackend`: the stateful RuvLLM facade over the pure model and generation engine.

It holds what a user loaded (params pytree, config, tokenizer) and keeps only text handling
(tokenizer, incremental UTF-8 pieces, stop strings); generation is the engine's: `generate` and
`generate_stream` run a one-slot `Engine` on the contiguous cache, `generate_batch`, `session()`
and `serving_engine()` the paged, continuously batched `ServingEngine`.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp

from ruvllm_jax import host_memory
from ruvllm_jax.backend import engine
from ruvllm_jax.backend.base import StreamCallback
from ruvllm_jax.backend.sampling import SamplingParams
from ruvllm_jax.backend.serving import ServingEngine
from ruvllm_jax.backend.tokenizer import IncrementalDecoder, Tokenizer, check_token_ids
from ruvllm_jax.compilation_cache import ensure_default_compilation_cache
from ruvllm_jax.errors import (
    ConfigError,
    InvalidOperationError,
    SessionError,
    TokenizationError,
)
from ruvllm_jax.kernels import KernelOptions
from ruvllm_jax.models import llama, loader
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.quant.tensor import weight_stats
from ruvllm_jax.sharding import ModelSharding, make_mesh, per_device_bytes
from ruvllm_jax.types import DeviceType, GenerateParams, MemoryStats, ModelConfig, ModelInfo, ModelSize, Precision

_STORAGE_DTYPES = {Precision.FP32: jnp.float32, Precision.FP16: jnp.float16, Precision.BF16: jnp.bfloat16}


def default_model_path() -> str:
    """The model shipped inside the package (trained by `experiments/train_tiny.py`)."""
    from ruvllm_jax.assets import DEFAULT_MODEL_PATH

    return DEFAULT_MODEL_PATH


@dataclasses.dataclass
class _Loaded:
    params: dict
    cfg: LlamaConfig
    model_config: ModelConfig
    tokenizer: Optional[Tokenizer]
    eos_ids: tuple[int, ...]
    path: str
    name: str
    layout: Optional[ModelSharding] = None  # the mesh layout (ModelConfig.mesh_shape), None on one device


class JaxBackend:
    """Load a Llama-family model and generate text with it. `JaxBackend.new()` picks the best device."""

    def __init__(self, device: Optional[DeviceType] = None):
        if device is not None and not isinstance(device, DeviceType):
            raise ConfigError(
                f"device must be a DeviceType (e.g. DeviceType.Cpu, DeviceType.Cuda(0)) or None, got {device!r}"
            )
        ensure_default_compilation_cache()  # compiled programs persist across processes (see compilation_cache)
        self._device = device if device is not None else DeviceType.best()
        self._jax_device = self._device.to_jax()
        self._model: Optional[_Loaded] = None
        self._last_cache_bytes = 0
        self._adapters = None  # a LoRA adapters pytree or a MicroLoRA, applied in every forward when set
        self._engine_config: Optional[engine.EngineConfig] = None
        self._sessions_engine: Optional[ServingEngine] = None
        self.decode_chunk_size = engine.DEFAULT_CHUNK

    @property
    def decode_chunk_size(self) -> int:
        """Decode steps run on device per host round trip (an int >= 1; each new value compiles once)."""
        return self._decode_chunk_size

    @decode_chunk_size.setter
    def decode_chunk_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"decode_chunk_size must be an int >= 1, got {value!r}")
        self._decode_chunk_size = int(value)

    @classmethod
    def new(cls) -> "JaxBackend":
        return cls()

    @classmethod
    def with_device(cls, device: DeviceType) -> "JaxBackend":
        return cls(device)

    # -- loading -------------------------------------------------------------------------------
    def load_model(self, model_id_or_path: Optional[str] = None, config: Optional[ModelConfig] = None) -> None:
        """Load a hub id, a local folder, or (None) the embedded default model.

        `model_id_or_path` is None, a str or an `os.PathLike`; `config` is None or a `ModelConfig`.
        Anything else is a `ConfigError`, raised before any work, and a failed load keeps the model,
        device and adapters that were there.
        """
        model_id_or_path = _check_model_path(model_id_or_path, "model_id_or_path", allow_none=True)
        if config is None:
            config = ModelConfig()
        elif not isinstance(config, ModelConfig):
            raise ConfigError(
                f"config must be a ModelConfig; pass ModelConfig(...), got {type(config).__name__} {config!r}"
            )
        # Resolve the device now but switch to it only once the load succeeded: a failed call
        # must leave the backend as it was.
        device = self._device if config.device is None else config.device
        jax_device = self._jax_device if device == self._device else device.to_jax()
        mesh = None if config.mesh_shape is None else make_mesh(config.mesh_shape)
        layouts = []  # the mesh layout, made once the config is known and checked

        def check(c: LlamaConfig) -> None:
            self._check_load_config(c, config)
            if mesh is not None:
                layouts.append(ModelSharding.create(c, mesh))  # heads that cannot split fail here

        model_id = default_model_path() if model_id_or_path is None else model_id_or_path
        path = loader.resolve_model_path(model_id, hf_token=config.hf_token)
        if path.endswith(".gguf"):
            from ruvllm_jax.models import gguf_io

            cfg, params, tokenizer, eos_ids = gguf_io.load_gguf(
                path, quantization=config.quantization, device=jax_device, check_config=check,
                layout=None if mesh is None else (lambda c: layouts[0]))
        else:
            cfg = loader.load_config(path)
            check(cfg)
            quantized = config.quantization is not None and config.quantization.is_quantized
            dtype = jnp.float32 if quantized else _STORAGE_DTYPES[config.quantization or Precision.FP32]
            params = loader.load_params(path, cfg, dtype=dtype, device=jax_device,
                                        quantization=config.quantization if quantized else None,
                                        layout=layouts[0] if layouts else None)
            tok_path = os.path.join(path, "tokenizer.json")
            gen_cfg = loader.load_generation_config(path, cfg)
            eos = gen_cfg.get("eos_token_id", list(cfg.eos_token_ids))
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
            tokenizer = (
                Tokenizer.from_file(tok_path, bos_token_id=cfg.bos_token_id, eos_token_ids=eos_ids)
                if os.path.isfile(tok_path) else None
            )
        is_hub_id = not os.path.exists(os.path.expanduser(model_id))
        name = model_id if is_hub_id else os.path.basename(path.rstrip(os.sep))
        self._device, self._jax_device = device, jax_device
        self._model = _Loaded(params, cfg, config, tokenizer, eos_ids, path, name, layouts[0] if layouts else None)
        self._sessions_engine = None  # sessions belong to the model they were opened on
        host_memory.release_free_heap()  # the load's row chunks and file metadata are garbage now

    @staticmethod
    def _check_load_config(cfg: LlamaConfig, config: ModelConfig) -> None:
        """What must hold before any weight is read: a two-tier cache this model cannot use fails the load."""
        if config.kv_cache_config is not None:
            engine.two_tier_spec(cfg, config.kv_cache_config)

    def download_model(
        self, model_id: str, quantization: Optional[Precision] = None, cache_dir: Optional[str] = None,
    ) -> str:
        """Fetch a hub model into the HF cache (or `cache_dir`) and return its local folder."""
        model_id = _check_model_path(model_id, "model_id")
        if quantization is not None and not isinstance(quantization, Precision):
            raise ConfigError(f"quantization must be None or a Precision, got {quantization!r}")
        if cache_dir is not None:
            cache_dir = _check_model_path(cache_dir, "cache_dir")
        del quantization  # weights are quantized at load time, not on disk
        return loader.resolve_model_path(model_id, cache_dir=cache_dir)

    def unload(self) -> None:
        self._model = None
        self._sessions_engine = None

    # -- introspection ---------------------------------------------------------------------------
    def is_loaded(self) -> bool:
        return self._model is not None

    def tokenizer(self) -> Optional[Tokenizer]:
        return None if self._model is None else self._model.tokenizer

    def device(self) -> DeviceType:
        return self._device

    @property
    def params(self) -> dict:
        return self._require().params

    @property
    def config(self) -> LlamaConfig:
        return self._require().cfg

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Tokens that end a generation (from generation_config.json, else config.json)."""
        return self._require().eos_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids) -> None:
        """Replace them; `()` decodes every requested token (benchmarks)."""
        m = self._require()
        given = ids
        try:
            ids = tuple(ids) if not isinstance(ids, (str, bytes, dict, set, frozenset)) else None
        except TypeError:  # not iterable
            ids = None
        if ids is None or any(
            isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < m.cfg.vocab_size for t in ids
        ):
            shown = given if ids is None else ids
            raise ConfigError(f"eos_token_ids must be token ids in [0, {m.cfg.vocab_size}), got {shown!r}")
        m.eos_ids = tuple(int(t) for t in ids)

    def model_info(self) -> Optional[ModelInfo]:
        if self._model is None:
            return None
        m, c = self._model, self._model.cfg
        stats = weight_stats(m.params)
        return ModelInfo(
            name=m.name, architecture=c.model_type, num_parameters=stats.num_weights,
            size=ModelSize.from_num_params(stats.num_weights),
            hidden_size=c.hidden_size, num_layers=c.num_layers, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim, vocab_size=c.vocab_size, max_context=self.max_context(),
            dtype=stats.dtype_name, quantization=stats.precision if m.model_config.quantization is None
            else m.model_config.quantization,
            path=m.path,
        )

    def memory_stats(self) -> MemoryStats:
        """Bytes of the params (whole arrays, however sharded) and of the KV cache of the latest
        generation; `device` names the mesh when the model is sharded (`params_bytes_per_device`
        gives each device's share)."""
        leaves = [] if self._model is None else jax.tree_util.tree_leaves(self._model.params)
        layout = None if self._model is None else self._model.layout
        where = str(self._device) if layout is None else (
            f"mesh data={layout.data} x model={layout.model} of {self._device.kind}")
        return MemoryStats(params_bytes=int(sum(x.nbytes for x in leaves)), cache_bytes=int(self._last_cache_bytes),
                           device=where)

    def params_bytes_per_device(self) -> dict[str, int]:
        """Bytes of the params each device holds (its shards), by device name."""
        return per_device_bytes(self._require().params)

    @property
    def mesh(self):
        """The `jax.sharding.Mesh` the model is laid out on, None on one device."""
        layout = self.layout
        return None if layout is None else layout.mesh

    @property
    def layout(self) -> Optional[ModelSharding]:
        """The model's `ruvllm_jax.sharding.ModelSharding` on its mesh, None on one device."""
        return self._require().layout

    def _require(self) -> _Loaded:
        if self._model is None:
            raise InvalidOperationError("no model is loaded; call load_model() first")
        return self._model

    def _kernel_options(self) -> KernelOptions:
        """ModelConfig.use_flash_attention: the kernels' dispatch ("auto": Pallas on GPU/TPU), or
        plain jnp attention everywhere when False."""
        m = self._require()
        return KernelOptions(impl="auto" if m.model_config.use_flash_attention else "jnp",
                             mesh=None if m.layout is None else m.layout.mesh)

    def max_context(self) -> int:
        """The longest prompt + generation this backend accepts: ModelConfig.max_context, capped by
        the model's max_position_embeddings. Raises `InvalidOperationError` when no model is loaded."""
        m = self._require()
        return min(m.model_config.max_context, m.cfg.max_position_embeddings)

    # -- LoRA adapters ---------------------------------------------------------------------------
    def attach_adapters(self, adapters) -> None:
        """Apply LoRA adapters in every generation: a `MicroLoRA` (its current values are read at each
        call, so updates show up without re-attaching) or an adapters pytree. Replaces (swaps) any
        attached before. New values never recompile; a new structure (modules, rank) compiles once."""
        from ruvllm_jax.lora.functional import check_adapters

        check_adapters(getattr(adapters, "adapters", adapters), self.config)
        self._adapters = adapters

    def detach_adapters(self) -> None:
        self._adapters = None

    @property
    def adapters(self):
        """The adapters pytree in use (None when none is attached)."""
        a = self._adapters
        return a if a is None or isinstance(a, dict) else a.adapters

    @adapters.setter
    def adapters(self, value) -> None:
        if value is None:
            self.detach_adapters()
        else:
            self.attach_adapters(value)

    # -- generation ------------------------------------------------------------------------------
    # Every argument is checked before any work: a rejected call traces, compiles and changes nothing.
    def generate_tokens(self, prompt_ids: Sequence[int], params: Optional[GenerateParams] = None) -> list[int]:
        """Greedy or sampled continuation of token ids (EOS excluded), ignoring stop sequences.

        `prompt_ids` is a 1-D sequence of ints in [0, vocab_size) or a 1-D integer array
        (`TokenizationError` otherwise: floats, bools, strs and nested sequences are refused)."""
        m = self._require()
        params = _check_params(params)
        ids = check_token_ids(prompt_ids, m.cfg.vocab_size, "prompt token ids")
        self._check_request(ids, params)
        return list(self._token_stream(ids, params, stream=False))

    def generate(self, prompt: str, params: Optional[GenerateParams] = None) -> str:
        pieces: list[str] = []
        self._generate_text(prompt, _check_params(params), pieces.append, stream=False)
        return "".join(pieces)

    def generate_stream(self, prompt: str, params: Optional[GenerateParams], callback: StreamCallback) -> None:
        """Call `callback(piece)` with each piece of text as soon as it decodes; False stops."""
        params = _check_params(params)
        if not callable(callback):
            raise ConfigError(
                f"callback must be callable (called with each text piece), got {type(callback).__name__} {callback!r}"
            )
        self._generate_text(prompt, params, callback, stream=True)

    def _encode(self, prompt: str) -> list[int]:
        m = self._require()
        if m.tokenizer is None:
            raise TokenizationError(f"model {m.name!r} has no tokenizer.json; pass token ids to generate_tokens()")
        return m.tokenizer.encode(prompt)

    def _check_request(self, ids: list[int], params: GenerateParams) -> None:
        """Everything that depends on the model, before any work: prompt ids in range, a prompt that
        fits, top_k <= vocab."""
        m = self._require()
        check_token_ids(ids, m.cfg.vocab_size, "prompt token ids")  # a tokenizer may know more ids than the model
        SamplingParams.from_generate_params(params, vocab_size=m.cfg.vocab_size)
        engine.buckets(len(ids), params.max_tokens, self.max_context())  # also refuses an empty prompt
        kv = m.model_config.kv_cache_config
        if kv is not None:
            engine.check_two_tier_fits(engine.two_tier_spec(m.cfg, kv), len(ids) + params.max_tokens,
                                       f"a prompt of {len(ids)} tokens + max_tokens={params.max_tokens}")

    def _generate_text(self, prompt: str, params: GenerateParams, callback: StreamCallback, stream: bool) -> None:
        ids = self._encode(prompt)
        self._check_request(ids, params)
        self._emit_text(self._token_stream(ids, params, stream=stream), params, callback)

    def _emit_text(self, tokens: Iterator[int], params: GenerateParams, callback: StreamCallback) -> None:
        """Decode `tokens` into text pieces for `callback` until a stop string, False, or the end."""
        text = _TextAssembler(self._require().tokenizer, self._require().cfg.vocab_size, params.stop_sequences)
        for token in tokens:
            piece, stopped = text.push(token)
            if piece and callback(piece) is False or stopped:
                return
        piece = text.finish()
        if piece:
            callback(piece)

    def _serving_engine(self, config: engine.EngineConfig) -> ServingEngine:
        m = self._require()
        if m.layout is not None and config.kernel.mesh != m.layout.mesh:
            config = dataclasses.replace(config, kernel=dataclasses.replace(config.kernel, mesh=m.layout.mesh))
        return ServingEngine(engine.Engine(m.cfg, config), m.params, eos_ids=m.eos_ids,
                             adapters=lambda: self.adapters, device=self._jax_device if m.layout is None else None)

    def _one_slot_config(self, prompt_len: int, max_tokens: int) -> engine.EngineConfig:
        """The one-slot engine a single request runs on: its cache bucket, and the layer scan for
        native-quantized layers without adapters on a cache of <= `engine.LAYER_SCAN_MAX_LEN` tokens."""
        m = self._require()
        _, cache_len = engine.buckets(prompt_len, max_tokens, self.max_context())
        kv = m.model_config.kv_cache_config  # two-tier: its shape is the config's, not a bucket's
        kernel = self._kernel_options()
        return engine.EngineConfig(
            max_slots=1, layout="contiguous", max_len=cache_len if kv is None else prompt_len + max_tokens,
            chunk=self.decode_chunk_size, kernel=kernel, kv_cache_config=kv,
            layer_scan=kv is None and self._adapters is None and cache_len <= engine.LAYER_SCAN_MAX_LEN
            and llama.layers_scan(m.params, m.cfg, kernel))

    def _token_stream(self, ids: list[int], params: GenerateParams, stream: bool) -> Iterator[int]:
        """Tokens of a request `_check_request` accepted, on a one-slot engine sized for it."""
        self._require()
        if params.max_tokens == 0:
            return
        server = self._serving_engine(self._one_slot_config(len(ids), params.max_tokens))
        server.add_request(ids, params)
        while server.has_unfinished():
            outputs = server.step(limit=1 if stream else None)
            self._last_cache_bytes = server.cache_bytes
            for o in outputs:
                yield from o.tokens

    # -- batches, engines and sessions -----------------------------------------------------------
    @property
    def engine_config(self) -> engine.EngineConfig:
        """The paged engine `generate_batch`, `serving_engine` and sessions run on (max_len defaults
        to `max_context()`, kernel and chunk to this backend's)."""
        if self._engine_config is not None:
            return self._engine_config
        return engine.EngineConfig(max_len=self.max_context(), chunk=self.decode_chunk_size,
                                   kernel=self._kernel_options())

    @engine_config.setter
    def engine_config(self, config: Optional[engine.EngineConfig]) -> None:
        if config is not None and (not isinstance(config, engine.EngineConfig) or config.layout != "paged"):
            raise ConfigError(f"engine_config must be None or an EngineConfig with layout='paged', got {config!r}")
        self._engine_config = config
        self._sessions_engine = None

    def serving_engine(self, config: Optional[engine.EngineConfig] = None) -> ServingEngine:
        """A new continuous-batching engine over the loaded model (token ids in, tokens out):
        `add_request(ids, params)`, `step()`, `run()`; see `backend.serving`."""
        self._require()
        config = self.engine_config if config is None else config
        if not isinstance(config, engine.EngineConfig):
            raise ConfigError(f"config must be an EngineConfig, got {type(config).__name__} {config!r}")
        if self._require().model_config.kv_cache_config is not None:
            raise ConfigError("batched generation runs on the paged cache; this model was loaded with the "
                              "two-tier kv_cache_config")
        return self._serving_engine(config)

    def generate_batch(self, prompts: Sequence[str], params=None) -> list[str]:
        """Generate for every prompt at once (continuous batching on the paged cache) -> texts in order.

        `params` is one GenerateParams for all, or a sequence of one per prompt. Each text is what
        `generate` would give that prompt alone (greedy: the same tokens).
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not all(isinstance(p, str)
                                                                                    for p in prompts):
            raise ConfigError(f"prompts must be a sequence of strs, got {prompts!r}")
        per = self._batch_params(params, len(prompts))
        if not prompts:
            return []
        config = self.engine_config
        config = dataclasses.replace(config, max_slots=min(config.max_slots, engine.pow2_bucket(len(prompts), 1)))
        server = self.serving_engine(config)
        ids = [self._encode(p) for p in prompts]
        for i, p in zip(ids, per, strict=True):
            self._check_request(i, p)
        texts = [[] for _ in prompts]
        streams = [_TextAssembler(self._require().tokenizer, self.config.vocab_size, p.stop_sequences) for p in per]
        rids = {server.add_request(i, p): n for n, (i, p) in enumerate(zip(ids, per, strict=True))}
        done = set()
        while server.has_unfinished():
            for o in server.step():
                n = rids[o.request_id]
                if n in done:
                    continue
                for t in o.tokens:
                    piece, stopped = streams[n].push(t)
                    texts[n].append(piece)
                    if stopped:
                        done.add(n)
                        if not o.finished:
                            server.cancel(o.request_id)
                        break
                if o.finished and n not in done:
                    texts[n].append(streams[n].finish())
                    done.add(n)
        return ["".join(t) for t in texts]

    def _batch_params(self, params, n: int) -> list[GenerateParams]:
        if params is None or isinstance(params, GenerateParams):
            return [_check_params(params)] * n
        if isinstance(params, (str, bytes)) or not isinstance(params, Sequence) or len(params) != n:
            raise ConfigError(f"params must be one GenerateParams or a sequence of {n} (one per prompt), "
                              f"got {params!r}")
        return [_check_params(p) for p in params]

    def session(self) -> "Session":
        """A conversation that keeps its KV cache across turns: each `generate` prefills only the
        new prompt. Sessions share the backend's paged engine (`engine_config`)."""
        if self._sessions_engine is None:
            self._sessions_engine = self.serving_engine()
        return Session(self, self._sessions_engine)

def _check_params(params) -> GenerateParams:
    """None (the defaults) or a GenerateParams; a dict or anything else is a ConfigError."""
    if params is None:
        return GenerateParams()
    if not isinstance(params, GenerateParams):
        hint = "GenerateParams(**your_dict)" if isinstance(params, dict) else "GenerateParams(...)"
        raise ConfigError(
            f"params must be a GenerateParams; pass GenerateParams(...) (e.g. {hint}), "
            f"got {type(params).__name__} {params!r}"
        )
    return params


def _check_model_path(value, name: str, allow_none: bool = False):
    """A non-empty str path (os.PathLike resolved); None passes through only when allowed."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (str, os.PathLike)):
        expected = "a str, an os.PathLike or None" if allow_none else "a str or an os.PathLike"
        raise ConfigError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    path = os.fspath(value)
    if not isinstance(path, str):
        raise ConfigError(f"{name} must name a str path, got {type(path).__name__} {path!r}")
    if not path:
        raise ConfigError(f"{name} must be a non-empty path or hub id, got {value!r}")
    return path


def _find_stop(text: str, stops: Sequence[str], start: int) -> Optional[int]:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop sequence."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class _TextAssembler:
    """One request's text: incremental UTF-8 decoding, stop strings held back until they cannot
    start one, and the text cut before the first stop string."""

    def __init__(self, tokenizer, vocab_size: int, stops: Sequence[str]):
        self._decoder = IncrementalDecoder(tokenizer, vocab_size)
        self._stops = tuple(stops)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._text, self._emitted = "", 0

    def push(self, token: int) -> tuple[str, bool]:
        """-> (text safe to hand out now, whether a stop string ended the output)."""
        self._text += self._decoder.push(token)
        if self._stops:
            hit = _find_stop(self._text, self._stops, max(0, self._emitted - self._longest))
            if hit is not None:
                piece = self._text[self._emitted:hit] if hit > self._emitted else ""
                self._emitted = len(self._text)
                return piece, True
            safe = len(self._text) - _held_back(self._text, self._stops)
        else:
            safe = len(self._text)
        if safe > self._emitted:
            piece, self._emitted = self._text[self._emitted:safe], safe
            return piece, False
        return "", False

    def finish(self) -> str:
        """The rest once the tokens ended (flushed bytes, cut at a stop string)."""
        text = self._text + self._decoder.flush()
        if self._stops:
            hit = _find_stop(text, self._stops, max(0, self._emitted - self._longest))
            text = text if hit is None else text[:hit]
        piece = text[self._emitted:] if len(text) > self._emitted else ""
        self._emitted = len(text)
        return piece


class Session:
    """A conversation on a backend's paged engine whose KV blocks persist across turns.

    `generate(prompt)` encodes the prompt (special tokens only on the first turn), prefills only
    it (plus the last reply token, which was sampled but never fed), and generates; the result is
    what `generate_tokens(history + prompt)` would give in one go. `close()` frees the blocks; a
    closed session raises `SessionError`.
    """

    def __init__(self, backend: JaxBackend, server: ServingEngine):
        self._backend, self._server = backend, server
        self._id = server.open_session()
        self._turns = 0

    @property
    def history(self) -> list[int]:
        """Every token of the conversation (prompts and replies, EOS excluded)."""
        return self._server.history(self._live())

    @property
    def prefilled_tokens(self) -> int:
        """Tokens the engine has run through prefill (all sessions and requests on it)."""
        return self._server.prefilled_tokens

    def _live(self) -> int:
        if self._id is None:
            raise SessionError("the session is closed")
        if self._backend._sessions_engine is not self._server:
            raise SessionError("the session's model was unloaded or replaced")
        return self._id

    def generate_tokens(self, prompt_ids: Sequence[int], params: Optional[GenerateParams] = None) -> list[int]:
        """The next turn in token ids -> the reply's tokens (EOS excluded), stop strings ignored."""
        sid = self._live()
        params = _check_params(params)
        rid = self._server.add_request(prompt_ids, params, session=sid)
        out: list[int] = []
        while True:
            for o in self._server.step():
                if o.request_id == rid:
                    out.extend(o.tokens)
                    if o.finished:
                        self._turns += 1
                        return out

    def generate(self, prompt: str, params: Optional[GenerateParams] = None) -> str:
        """The next turn in text -> the reply, cut before a stop string."""
        sid = self._live()
        params = _check_params(params)
        m = self._backend._require()
        if m.tokenizer is None:
            raise TokenizationError(f"model {m.name!r} has no tokenizer.json; use generate_tokens()")
        ids = m.tokenizer.encode(prompt, add_special_tokens=not self._server.history(sid))
        rid = self._server.add_request(ids, params, session=sid)
        pieces: list[str] = []
        text = _TextAssembler(m.tokenizer, m.cfg.vocab_size, params.stop_sequences)
        while True:
            for o in self._server.step():
                if o.request_id != rid:
                    continue
                for t in o.tokens:
                    piece, stopped = text.push(t)
                    pieces.append(piece)
                    if stopped:
                        if not o.finished:
                            self._server.cancel(rid)
                        return "".join(pieces)
                if o.finished:
                    return "".join(pieces) + text.finish()

    def close(self) -> None:
        if self._id is not None:
            if self._backend._sessions_engine is self._server:
                self._server.close_session(self._id)
            self._id = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

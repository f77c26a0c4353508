"""`ServingEngine`: the host loop over an `Engine` — a request queue, slots, blocks and sessions.

Continuous batching as vLLM's `LLMEngine` does it, over JetStream-style pure steps:
`add_request` queues a request with its own `GenerateParams`; each `step` admits waiting requests
into free slots (prefill), runs one jitted decode chunk that advances every running slot, and
returns the new tokens of each request. A request finishes on EOS or at its `max_tokens`; its slot
and blocks are then free for the next one, mid-flight.

Blocks (layout "paged") are reserved at admission for the prompt and all `max_tokens`: a request
that does not fit the free blocks waits in the queue (first come, first served), so a running one
can never run out and nothing already generated is lost. A request that could not fit even an
empty pool raises `OutOfMemoryError` at `add_request`, naming its size.

Sessions keep a conversation's blocks across turns: a turn added with `session=` prefills only its
new tokens after the cached ones, and the session's history is exactly the token sequence a
one-shot generation of the whole conversation would see. Text (tokenizer, UTF-8 pieces, stop
strings) is `JaxBackend`'s business; this works in token ids.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from ruvllm_jax import host_memory
from ruvllm_jax.backend.engine import Engine, make_rngs, mesh_layout, pow2_bucket
from ruvllm_jax.backend.sampling import SamplingParams
from ruvllm_jax.backend.tokenizer import check_token_ids
from ruvllm_jax.cache.allocator import PagedAllocator
from ruvllm_jax.cache.paged import table_array
from ruvllm_jax.errors import ConfigError, GenerationError, InvalidOperationError, OutOfMemoryError, SessionError
from ruvllm_jax.types import GenerateParams

MIN_PROMPT_BUCKET = 16
MIN_TABLE_WIDTH = 8  # blocks: fewer widths, fewer decode compiles


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """What one `step` produced for one request: its new tokens (EOS excluded), and whether it is
    done ("eos", "length" or "cancelled")."""

    request_id: int
    tokens: tuple[int, ...]
    finished: bool = False
    finish_reason: Optional[str] = None


@dataclasses.dataclass
class _Session:
    seq_id: object
    history: list[int] = dataclasses.field(default_factory=list)  # every token of the conversation
    cached: int = 0  # tokens of `history` whose KV the blocks hold (the rest is prefilled next turn)
    busy: bool = False


@dataclasses.dataclass
class _Request:
    id: int
    prompt: list[int]
    params: GenerateParams
    sampling: SamplingParams
    session: Optional[_Session]
    seq_id: object
    slot: Optional[int] = None
    start: int = 0  # tokens already cached before this request's prefill
    feed: list[int] = dataclasses.field(default_factory=list)  # tokens its prefill runs
    generated: list[int] = dataclasses.field(default_factory=list)
    finished: bool = False
    reason: Optional[str] = None


def _all_greedy(reqs: Sequence[_Request]) -> bool:
    """No request samples: the step compiles only the greedy argmax (see `engine._resolve_greedy`)."""
    return all(r.params.temperature == 0 for r in reqs)


class ServingEngine:
    """Many requests, one model: queue, slots, paged blocks and sessions over an `Engine`."""

    def __init__(self, engine: Engine, params, *, eos_ids: Sequence[int] = (),
                 adapters: Optional[Callable[[], object]] = None, device=None):
        if not isinstance(engine, Engine):
            raise ConfigError(f"engine must be an Engine, got {type(engine).__name__}")
        self.engine = engine
        self.params = params
        self.eos_ids = tuple(int(t) for t in eos_ids)
        self._eos = np.asarray(self.eos_ids or (-1,), np.int32)  # numpy: jnp.asarray would compile a cast
        self._adapters = adapters if adapters is not None else (lambda: None)
        self._device = device
        c = engine.config
        self._paged = c.layout == "paged"
        self.allocator = PagedAllocator(c.pool_blocks, c.block_size) if self._paged else None
        self._state = None  # allocated at the first admission
        self._slots: list[Optional[_Request]] = [None] * c.max_slots
        self._waiting: collections.deque[_Request] = collections.deque()
        self._requests: dict[int, _Request] = {}
        self._sessions: dict[int, _Session] = {}
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self.prefilled_tokens = 0  # tokens run through prefill so far (sessions prefill only new ones)

    # -- requests --------------------------------------------------------------------------------
    def add_request(self, prompt_ids: Sequence[int], params: Optional[GenerateParams] = None, *,
                    session: Optional[int] = None) -> int:
        """Queue a request -> its id. Checked now: token ids, params, and that it can ever fit."""
        cfg, c = self.engine.cfg, self.engine.config
        params = GenerateParams() if params is None else params
        if not isinstance(params, GenerateParams):
            raise ConfigError(f"params must be a GenerateParams, got {type(params).__name__} {params!r}")
        ids = check_token_ids(prompt_ids, cfg.vocab_size, "prompt token ids")
        sampling = SamplingParams.from_generate_params(params, vocab_size=cfg.vocab_size)
        sess = self._session(session) if session is not None else None
        if sess is not None and sess.busy:
            raise SessionError(f"session {session} already has a turn running; wait for it to finish")
        start = sess.cached if sess is not None else 0
        feed = (sess.history[sess.cached:] if sess is not None else []) + ids
        if not feed:
            raise GenerationError("the prompt encodes to no tokens; at least one is needed")
        total = start + len(feed) + params.max_tokens
        if total > c.max_len:
            what = f"session {session}'s conversation" if sess is not None else "the request"
            raise GenerationError(f"{what} needs {start + len(feed)} tokens + max_tokens={params.max_tokens} = "
                                  f"{total}, more than the engine's max_len={c.max_len}")
        if self._paged:
            held = len(self.allocator.table(sess.seq_id)) if sess is not None else 0
            need = self.allocator.blocks_for(total) - held
            if need > c.pool_blocks - (self._held_by_sessions() - held):
                raise OutOfMemoryError(
                    f"a request of {total} tokens needs {self.allocator.blocks_for(total)} blocks of "
                    f"{c.block_size}; the pool has {c.pool_blocks} (sessions hold {self._held_by_sessions()})")
        req = _Request(next(self._ids), ids, params, sampling, sess,
                       sess.seq_id if sess is not None else ("req", next(self._seq_ids)), start=start, feed=feed)
        if sess is not None:
            sess.busy = True
        self._requests[req.id] = req
        self._waiting.append(req)
        return req.id

    def cancel(self, request_id: int) -> None:
        """Stop a request now (a stop string on the host, a client gone); its slot and blocks are freed."""
        req = self._request(request_id)
        if req.finished:
            return
        if req.slot is None:
            self._waiting.remove(req)
        self._finish(req, "cancelled")
        del self._requests[request_id]

    def has_unfinished(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self._slots)

    @property
    def cache_bytes(self) -> int:
        """Bytes of the KV cache (the pool, or the slot's cache); 0 before the first admission."""
        return 0 if self._state is None else int(self._state.cache.nbytes())

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self._slots)

    def run(self) -> dict[int, list[int]]:
        """Step until every request is done -> every token of each request, by id."""
        results: dict[int, list[int]] = {i: [] for i in self._requests}
        while self.has_unfinished():
            for o in self.step():
                results.setdefault(o.request_id, []).extend(o.tokens)
        return results

    # -- sessions --------------------------------------------------------------------------------
    def open_session(self) -> int:
        """A new conversation whose KV blocks persist across turns -> its id."""
        if not self._paged:
            raise SessionError("sessions need the paged layout (EngineConfig(layout='paged'))")
        sid = next(self._ids)
        sess = _Session(seq_id=("session", sid))
        self.allocator.add(sess.seq_id, 0)
        self._sessions[sid] = sess
        return sid

    def close_session(self, session: int) -> None:
        """Free the session's blocks; its id is then unknown."""
        sess = self._session(session)
        if sess.busy:
            raise SessionError(f"session {session} has a turn running; cancel or finish it first")
        self.allocator.free(sess.seq_id)
        del self._sessions[session]

    def history(self, session: int) -> list[int]:
        """Every token of the conversation so far: prompts and replies, in order (EOS excluded)."""
        return list(self._session(session).history)

    def _session(self, session) -> _Session:
        if session not in self._sessions:
            raise SessionError(f"no open session {session!r}; open one with open_session()")
        return self._sessions[session]

    def _request(self, request_id) -> _Request:
        if request_id not in self._requests:
            raise InvalidOperationError(f"no unfinished request {request_id!r}")
        return self._requests[request_id]

    def _held_by_sessions(self) -> int:
        return sum(len(self.allocator.table(s.seq_id)) for s in self._sessions.values())

    # -- the loop --------------------------------------------------------------------------------
    def step(self, limit: Optional[int] = None) -> list[RequestOutput]:
        """Admit what fits, then one decode chunk of up to `limit` (default `chunk`) steps."""
        outputs: dict[int, list[int]] = collections.defaultdict(list)
        with jax.default_device(self._device) if self._device is not None else contextlib.nullcontext():
            self._admit(outputs)
            host_memory.release_after_compiles()  # before the decode program compiles, not after both
            running = [r for r in self._slots if r is not None and not r.finished]
            if running:
                self._decode(running, outputs, limit)
        host_memory.release_after_compiles()  # a first step's compiles leave freed heap resident
        out = []
        for rid, toks in outputs.items():
            req = self._requests[rid]
            out.append(RequestOutput(rid, tuple(toks), req.finished, req.reason))
            if req.finished:  # reported: the engine forgets it
                del self._requests[rid]
        return out

    def _admit(self, outputs) -> None:
        """Move waiting requests into free slots, first come first served, while their blocks fit;
        fresh prompts admitted together run as one batched prefill."""
        group: list[_Request] = []
        free = [i for i, r in enumerate(self._slots) if r is None]
        while self._waiting and free:
            req = self._waiting[0]
            if req.params.max_tokens == 0:
                self._waiting.popleft()
                self._finish(req, "length")
                outputs[req.id]
                continue
            total = req.start + len(req.feed) + req.params.max_tokens
            if self._paged and not self._reserve(req, total, waiting_ok=bool(group) or self.num_running > 0):
                break  # wait for running requests to give blocks back
            self._waiting.popleft()
            req.slot = free.pop(0)
            self._slots[req.slot] = req
            if req.start > 0:  # a continued sequence reads its context: prefilled on its own
                self._prefill([req], outputs)
            else:
                group.append(req)
        if group:
            self._prefill(group, outputs)

    def _reserve(self, req: _Request, total: int, waiting_ok: bool) -> bool:
        """Reserve the request's blocks now (False: not enough free, it waits)."""
        if req.session is None and req.seq_id not in self.allocator:
            self.allocator.add(req.seq_id, 0)
        if self.allocator.blocks_needed(req.seq_id, total) > self.allocator.num_free:
            if waiting_ok:
                return False
            self._waiting.popleft()  # nothing will give blocks back: it can never fit now
            self._finish(req, "cancelled")
            del self._requests[req.id]
            raise OutOfMemoryError(
                f"request {req.id} needs {self.allocator.blocks_for(total)} blocks ({total} tokens) and only "
                f"{self.allocator.num_free} are free with nothing running: open sessions hold the rest (close some)")
        self._state = self.engine.copy_blocks(self._ensure_state(), self.allocator.reserve(req.seq_id, total))
        self.allocator.set_length(req.seq_id, total)
        return True

    def _current_adapters(self):
        """The adapters for this step; on a mesh, placed by the layout (B / A split like their weights)."""
        adapters = self._adapters()
        layout = mesh_layout(self.engine.cfg, self.engine.config)
        return adapters if layout is None or adapters is None else layout.place_adapters(adapters)

    def _ensure_state(self):
        """The decode state, allocated (pool or slot cache) at the first admission."""
        if self._state is None:
            self._state = self.engine.init_decode_state(self._device)
        return self._state

    def _prefill(self, reqs: list[_Request], outputs) -> None:
        """One prefill of `reqs` (already in their slots, blocks reserved); hand out first tokens."""
        eng, c = self.engine, self.engine.config
        self._ensure_state()
        k = pow2_bucket(len(reqs), 1)  # rows bucketed; padding rows target slot `max_slots` (dropped)
        longest = max(len(r.feed) for r in reqs)
        bucket = pow2_bucket(longest, MIN_PROMPT_BUCKET)
        if not self._paged:
            bucket = min(bucket, c.max_len)
        pad = k - len(reqs)
        tokens = np.zeros((k, bucket), np.int32)
        presence = np.zeros((k, eng.cfg.vocab_size), np.bool_)
        for i, r in enumerate(reqs):
            tokens[i, : len(r.feed)] = r.feed
            history = (r.session.history if r.session is not None else []) + r.prompt
            presence[i, np.asarray(history, np.int64)] = True
            if r.session is not None:
                r.session.history = history
                r.session.cached = r.start + len(r.feed)
        tables = None
        if self._paged:
            blocks = [self.allocator.table(r.seq_id) for r in reqs] + [[]] * pad
            # A fresh prompt only scatters through its table: one width, one compile per prompt
            # bucket. A continued one also reads its context through it: bucketed like decode.
            continued = any(r.start > 0 for r in reqs)
            width = self._width(max(len(b) for b in blocks)) if continued else c.blocks_per_seq
            tables = table_array(blocks, width, c.pool_blocks)
        col = lambda f, fill: np.asarray([f(r) for r in reqs] + [fill] * pad, np.int32)  # noqa: E731
        rngs = make_rngs([r.params.seed for r in reqs] + [0] * pad)
        sampling = SamplingParams.stack([r.sampling for r in reqs] + [SamplingParams.create()] * pad)
        self._state = eng.prefill(
            self.params, self._state, col(lambda r: r.slot, c.max_slots), tokens, col(lambda r: len(r.feed), 0),
            sampling=sampling, rngs=rngs, max_tokens=col(lambda r: r.params.max_tokens, 1), eos_ids=self._eos,
            presence=presence, starts=col(lambda r: r.start, 0), tables=tables, adapters=self._current_adapters(),
            greedy=_all_greedy(reqs))
        self.prefilled_tokens += sum(len(r.feed) for r in reqs)
        first = np.asarray(self._state.token)
        for r in reqs:
            self._take(r, [int(first[r.slot])], outputs)

    def _width(self, blocks: int) -> int:
        """Table width for `blocks` blocks: a power of two >= MIN_TABLE_WIDTH, capped at a sequence's
        most; attention reads every block of the width, so it tracks the longest running sequence."""
        most = self.engine.config.blocks_per_seq
        return min(most, pow2_bucket(blocks, MIN_TABLE_WIDTH))

    def _decode(self, running: list[_Request], outputs, limit: Optional[int]) -> None:
        eng, c = self.engine, self.engine.config
        left = [r.params.max_tokens - len(r.generated) for r in running]
        steps = max(left) if not self._waiting else min(left)  # stop early when a slot frees for the queue
        steps = min(c.chunk, steps if limit is None else min(limit, steps))
        tables = None
        if self._paged:
            rows = [self.allocator.table(r.seq_id) if r is not None and not r.finished else [] for r in self._slots]
            tables = table_array(rows, self._width(max(len(t) for t in rows)), c.pool_blocks)
        self._state, out, count = eng.generate(self.params, self._state, eos_ids=self._eos, limit=steps,
                                               tables=tables, adapters=self._current_adapters(),
                                               greedy=_all_greedy(running))
        out = np.asarray(out)[:, : int(count)]
        for req in running:
            self._take(req, [int(t) for t in out[req.slot] if t >= 0], outputs)

    def _take(self, req: _Request, tokens: list[int], outputs) -> None:
        """Hand a request its new tokens; finish it on EOS or at max_tokens."""
        got = outputs[req.id]
        for t in tokens:
            if t in self.eos_ids:
                self._finish(req, "eos")
                return
            req.generated.append(t)
            got.append(t)
            if len(req.generated) >= req.params.max_tokens:
                self._finish(req, "length")
                return

    def _finish(self, req: _Request, reason: str) -> None:
        req.finished, req.reason = True, reason
        if req.slot is not None:
            self._state = self.engine.free(self._state, req.slot)
            self._slots[req.slot] = None
            req.slot = None
        if self._paged and req.seq_id in self.allocator:
            if req.session is None:
                self.allocator.free(req.seq_id)
            else:
                self._keep_in_session(req)

    def _keep_in_session(self, req: _Request) -> None:
        """The turn's tokens join the history; all but the last generated one are in the blocks (the
        last was sampled, never fed) unless the turn ended on EOS (dropped, its predecessor fed)."""
        sess = req.session
        sess.busy = False
        if req.generated:
            sess.history = sess.history + req.generated
            fed = len(req.generated) if req.reason == "eos" else len(req.generated) - 1
            sess.cached += fed
        self.allocator.set_length(sess.seq_id, sess.cached)
        self.allocator.trim(sess.seq_id)

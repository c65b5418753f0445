"""The worker: one thread owns the model and the KV caches; requests wait in a bounded queue.

HTTP threads build a ``Job`` (token ids, sampling, an optional grammar) and read its events:
``("prefill", done, total)``, ``("token", id)``, then one ``("done", Outcome)`` or
``("error", exception)``. Setting ``job.cancel`` (the client went away) stops the job between
prefill chunks and between tokens. An exception fails that job alone; the worker goes on.

Each job's prefill stops at checkpoints (the end of the system+tools prefix, the end of the
prompt) and stores a copy of the cache there, and the cache after generation is stored too, so
the next turn of a conversation reuses its prompt even when the replayed answer differs from the
generated one (the thought stripped by the template, say): no trim is needed for that.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from gemma4_mlx.engine.prefix import PrefixStore

log = logging.getLogger("gemma4_mlx.server")
PREFILL_STEP = 512


class QueueFull(RuntimeError):
    pass


class Cancelled(Exception):
    pass


@dataclass
class Job:
    prompt: list[int]
    max_tokens: int
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    grammar: Any = None  # a GrammarProcessor (fresh per job)
    banned: list[int] = field(default_factory=list)  # token ids never sampled
    checkpoints: list[int] = field(default_factory=list)  # prompt lengths to checkpoint at
    cancel: threading.Event = field(default_factory=threading.Event)  # the client went away
    halt: threading.Event = field(default_factory=threading.Event)  # a stop string was seen
    events: queue.Queue = field(default_factory=queue.Queue)


@dataclass
class Outcome:
    finish_reason: str  # "stop" (a stop token, or the grammar complete) | "length"
    prompt_tokens: int
    cached_tokens: int
    generated: int
    prompt_seconds: float
    decode_seconds: float
    cache_how: str


class Engine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        cache_key: str,
        stop_ids: list[int],
        max_queue: int = 16,
        prompt_cache_bytes: int = 2 << 30,
        draft: tuple[Any, int] | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        # (draft model or gemma4_assistant drafter, tokens per step): speculative decoding
        # (gemma4_mlx.speculative) for requests without a grammar
        self.draft = draft
        self.drafted = self.accepted = 0  # draft tokens proposed and kept, over all requests
        self.cache_key = cache_key
        self.stop_ids = set(stop_ids)
        self.vocab_size = model.config.vocab_size
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.store = PrefixStore(prompt_cache_bytes)
        self.prefill_step = PREFILL_STEP
        self.cancelled = 0  # jobs stopped because their client went away
        self.busy_since: float | None = None  # when the running job last made progress
        self.thread = threading.Thread(target=self._loop, name="gemma4-worker", daemon=True)
        self._stop = threading.Event()
        self.thread.start()

    # -- HTTP side -------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.jobs.maxsize} requests are already waiting") from None

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stalled_for(self) -> float:
        """Seconds the running job has gone without progress (0 when idle)."""
        since = self.busy_since
        return 0.0 if since is None else time.monotonic() - since

    def close(self) -> None:
        self._stop.set()
        try:
            self.jobs.put_nowait(None)  # wake the worker; a full queue is seen by _stop
        except queue.Full:
            pass

    # -- worker side -----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self.jobs.get()
            if job is None:
                return
            if job.cancel.is_set():
                job.events.put(("error", Cancelled()))
                continue
            self.busy_since = time.monotonic()
            try:
                outcome = self.run(job)
            except Cancelled as e:
                self.cancelled += 1
                job.events.put(("error", e))
            except Exception as e:  # one request fails alone; the worker keeps serving
                log.exception("request failed")
                job.events.put(("error", e))
            else:
                job.events.put(("done", outcome))
            finally:
                self.busy_since = None

    def _progress(self, job: Job) -> None:
        self.busy_since = time.monotonic()
        if job.cancel.is_set():
            raise Cancelled()

    def run(self, job: Job) -> Outcome:
        """Prefill (reusing the longest safe prefix) and decode one job."""
        from mlx_lm.sample_utils import make_sampler

        start = time.perf_counter()
        prompt = job.prompt
        hit = self.store.fetch(self.cache_key, prompt)
        cache = hit.cache if hit.cache is not None else self.model.make_cache()
        done = hit.reused
        if len(self.store) and hit.reused < len(prompt) - 1:
            # Token counts only: prompts are never logged.
            log.info(
                "prompt cache: reused %d of %d prompt tokens (%s); the prompt diverges from "
                "the closest stored entry at token %d",
                hit.reused,
                len(prompt),
                hit.how,
                hit.common,
            )
        # Prefill all but the last token, stopping at each checkpoint to store a copy.
        stops = sorted({n for n in job.checkpoints if done < n < len(prompt)} | {len(prompt) - 1})
        total = len(prompt)
        for stop in stops:
            while done < stop:
                step = min(self.prefill_step, stop - done)
                self.model(mx.array([prompt[done : done + step]]), cache=cache, last_only=True)
                mx.eval([c.state for c in cache])
                done += step
                job.events.put(("prefill", done, total))
                self._progress(job)
            if stop > hit.reused:
                self.store.insert(self.cache_key, prompt[:stop], cache, copy_cache=True)
        prompt_seconds = time.perf_counter() - start

        if job.seed is not None:
            mx.random.seed(job.seed)
        sampler = make_sampler(job.temp, job.top_p, job.min_p, top_k=job.top_k)
        banned = mx.array(job.banned, dtype=mx.int32) if job.banned else None
        start = time.perf_counter()
        if self.draft is not None and job.grammar is None:
            fed, finish, generated = self._speculative(job, prompt, cache, sampler)
        else:
            fed, finish, generated = self._decode(job, prompt, cache, sampler, banned)
        decode_seconds = time.perf_counter() - start
        self.store.insert(self.cache_key, fed, cache, copy_cache=False)
        return Outcome(
            finish, len(prompt), hit.reused, generated, prompt_seconds, decode_seconds, hit.how
        )

    def _emit(self, job: Job, token: int) -> bool:
        """Report one sampled token; True when generation stops here (a stop token, which is
        not sent, or the client halted the job)."""
        self._progress(job)
        if token in self.stop_ids:
            return True
        job.events.put(("token", token))
        return job.halt.is_set()

    def _decode(self, job: Job, prompt: list[int], cache: list, sampler, banned) -> tuple:
        """Token by token from the prompt's last token -> (tokens the cache holds, finish
        reason, tokens generated)."""
        fed = list(prompt[:-1])  # the tokens the cache holds
        token, finish, generated = prompt[-1], "length", 0
        while generated < job.max_tokens:
            logits = self.model(mx.array([[token]]), cache=cache, last_only=True)[:, -1, :]
            fed.append(token)
            logits = logits.astype(mx.float32)
            if banned is not None:
                logits[:, banned] = -mx.inf
            if job.grammar is not None:
                logits = job.grammar.mask(logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            token = int(sampler(logprobs).item())
            generated += 1
            if self._emit(job, token):
                finish = "stop"
                break
            if job.grammar is not None:
                job.grammar.consume(token)
                if job.grammar.done:
                    finish = "stop"
                    break
        return fed, finish, generated

    def _speculative(self, job: Job, prompt: list[int], cache: list, sampler) -> tuple:
        """``_decode`` with the draft (gemma4_mlx.speculative): the same tokens (greedy) or
        distribution (sampled). A draft model's own cache is prefilled with the prompt here;
        the assistant drafter has none. The cache is left holding what the output holds."""
        from gemma4_mlx.generate import SamplingOptions
        from gemma4_mlx.speculative import SpeculativeStats, speculative_steps

        draft, n = self.draft
        draft_cache = draft.make_cache()
        held = prompt[:-1]  # what the target's cache holds: the draft model's must hold it too
        for i in range(0, len(held), self.prefill_step) if draft_cache else ():
            draft(mx.array([held[i : i + self.prefill_step]]), cache=draft_cache)
            mx.eval([c.state for c in draft_cache])
        sampling = SamplingOptions(job.temp, job.top_p, job.top_k, job.min_p)
        stats = SpeculativeStats(n)
        steps = speculative_steps(
            self.model, prompt[-1:], draft, n, job.max_tokens, sampler, cache, draft_cache,
            stats, sampling, job.banned or None,
        )  # fmt: skip
        out, finish = [], "length"
        try:
            for token, _, _ in steps:
                out.append(token)
                if self._emit(job, token):
                    finish = "stop"
                    break
                if len(out) >= job.max_tokens:
                    break
        finally:
            steps.close()
            self.drafted, self.accepted = (
                self.drafted + stats.drafted,
                self.accepted + stats.accepted,
            )
        # The target's cache holds the prompt and the output up to its last verified token,
        # perhaps drafts the output stopped before: trim those (within its rewind budget).
        seen = list(prompt) + out
        extra = cache[0].offset - min(cache[0].offset, len(seen))
        if extra:
            for c in cache:
                c.trim(extra)
        return seen[: cache[0].offset], finish, len(out)

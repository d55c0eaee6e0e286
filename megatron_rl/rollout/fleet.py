"""Many rollout engines behind one `generate`: routing, retries, health, restarts, exact accounting.

    fleet = Fleet(engines, max_concurrency=64, max_retries=3, resync=weight_sync.resync)
    generations = fleet.generate(prompts, sampling_params)   # generations[i] answers prompts[i]
    generations = fleet.generate(prompts, params, prompts_per_request=8)   # a GRPO group per HTTP request

Requests: consecutive prompts go together, `prompts_per_request` to one batch request of /generate (an
input_ids list, a sampling_params list). One request per group keeps a group on one engine (SGLang's prefix
cache prefills its prompt once there) and sends n times fewer requests (tools/bench_rollout_requests.py).
Behind a router every request carries one prompt, as a plain (not batch) request: sglang-router 0.3 takes a
single sampling_params per request (a list is answered with HTTP 422), and each sample has its own
sampling_seed.

Routing: each request goes to the ready engine with the fewest requests in flight, at most
`max_concurrency` requests per engine (the engines batch concurrent requests themselves). With a `router`
(rollout/router.py: sglang-router in front of the engines) every request goes to the router instead,
at most `max_concurrency` x engines in flight, and the router picks the engine.

Failure: a request whose engine fails (connection refused / reset, HTTP error, timeout) is put back
in the queue and retried, on another engine when there is one, up to `max_retries` times; of a request
that comes back with some prompts aborted, those prompts are retried the same way and the others kept.
The engine that failed (behind a router: the router, and every engine after a failure and after each
batch, since the router retries around a dead engine by itself) is checked with /health_generate; if
it does not answer and the fleet launched it, the process is restarted, waited for, and re-synced to
the current weights (`resync`; not the router) before it takes requests again; an engine that cannot
be recovered stays out. Every prompt is answered exactly once: `generate` returns one generation per
prompt, in order, and `stats` counts what happened.
"""

import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from megatron_rl.rollout.engines import Engine
from megatron_rl.rollout.engines import stop_engines as stop_engine_processes
from megatron_rl.rollout.protocol import Generation

log = logging.getLogger(__name__)


# what a step's metrics report (rollout/<name>): requests sent, requests retried, failures of a request that took
# its engine to a health check, engines restarted
REPORTED_COUNTS = ("requests", "retries", "engine_failures", "restarts")


class FleetError(RuntimeError):
    """A request could not be answered (retries exhausted, or no engine left)."""


@dataclass
class _Job:
    indices: list[int]  # the prompts of one request
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    avoid: Engine | None = None


class Fleet:
    def __init__(self, engines: Sequence[Engine], max_concurrency: int, max_retries: int,
                 resync: Callable[[Engine], None] | None = None, router: Engine | None = None):
        if not engines:
            raise ValueError("a fleet needs at least one engine (rollout.engines is empty)")
        self.engines, self.max_retries, self.resync, self.router = list(engines), max_retries, resync, router
        self.targets = self.engines if router is None else [router]  # where requests go
        self.max_concurrency = max_concurrency if router is None else max_concurrency * len(self.engines)
        self.stats: Counter = Counter()
        self._route_lock = threading.Lock()
        self._slot_freed = threading.Condition(self._route_lock)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency * len(self.engines), thread_name_prefix="rollout")
        self._rids = itertools.count()
        self._reported = dict.fromkeys(REPORTED_COUNTS, 0)

    def generate(self, prompts: Sequence[Sequence[int]], sampling_params: dict | Sequence[dict],
                 prompts_per_request: int = 1) -> list[Generation]:
        """One generation per prompt, in order; `sampling_params` for all, or one dict per prompt (a retried
        prompt keeps its own, its sampling_seed included); prompts [k p, (k + 1) p) go in request k
        (p = prompts_per_request; 1 behind a router). FleetError if a prompt cannot be answered."""
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, dict) else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling_params for {len(prompts)} prompts")
        if prompts_per_request < 1:
            raise ValueError(f"prompts_per_request must be >= 1, got {prompts_per_request}")
        if self.router is not None:
            prompts_per_request = 1  # sglang-router: one sampling_params per request (see the module docstring)
        results: list[Generation | None] = [None] * len(prompts)
        pending: dict[Future, tuple[_Job, Engine]] = {}
        queue = [_Job(list(range(start, min(start + prompts_per_request, len(prompts)))))
                 for start in reversed(range(0, len(prompts), prompts_per_request))]  # popped from the end
        while queue or pending:
            while queue:
                job = queue.pop()
                engine = self._acquire(job.avoid)
                future = self._pool.submit(self._call, engine, [list(prompts[i]) for i in job.indices],
                                           [params[i] for i in job.indices])
                pending[future] = (job, engine)
                self.stats["requests"] += 1
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job, engine = pending.pop(future)
                exc = future.exception()
                if exc is not None:
                    queue.append(self._retry(job, engine, f"{type(exc).__name__}: {exc}", engine_failed=True))
                    continue
                aborted = []
                for index, generation in zip(job.indices, future.result(), strict=True):
                    if generation.finish_reason.get("type") == "abort":
                        aborted.append((index, generation.finish_reason.get("message", "")))
                    elif results[index] is not None:
                        self.stats["duplicates"] += 1  # cannot happen: a prompt is resent only after a failure
                    else:
                        results[index] = generation
                        self.stats["answered"] += 1
                if aborted:
                    job.indices = [index for index, _ in aborted]
                    queue.append(self._retry(job, engine, f"aborted ({aborted[0][1]})", engine_failed=False))
        self.stats["prompts"] += len(prompts)
        for engine in self.engines if self.router is not None else ():
            self._check(engine, failed=False)  # the router may have retried around a dead engine: find it
        return results

    def counts_since_last_call(self) -> dict[str, int]:
        """REPORTED_COUNTS since the previous call (the first call: since the fleet started)."""
        now = {key: self.stats[key] for key in REPORTED_COUNTS}
        since = {key: now[key] - self._reported[key] for key in REPORTED_COUNTS}
        self._reported = now
        return since

    def _call(self, engine: Engine, prompts: list[list[int]], sampling_params: list[dict]) -> list[Generation]:
        try:
            rids = [f"r{next(self._rids)}" for _ in prompts]
            if len(prompts) == 1:  # a plain request: what sglang-router accepts
                return [engine.client.generate(prompts[0], sampling_params[0], rid=rids[0])]
            return engine.client.generate_batch(prompts, sampling_params, rids=rids)
        finally:
            self._release(engine)

    def _retry(self, job: _Job, engine: Engine, failure: str, engine_failed: bool) -> _Job:
        job.attempts += 1
        job.errors.append(f"{engine.url}: {failure}")
        self.stats["retries"] += 1
        if job.attempts > self.max_retries:
            raise FleetError(f"prompts {_ranges(job.indices)} failed {job.attempts} times (rollout.max_retries = "
                             f"{self.max_retries}): " + "; ".join(job.errors))
        if engine_failed:
            self.stats["engine_failures"] += 1
            self._check(engine)
            for behind_router in self.engines if engine is self.router else ():
                self._check(behind_router, failed=False)
        job.avoid = engine if len(self.targets) > 1 else None
        return job

    def _acquire(self, avoid: Engine | None) -> Engine:
        """The ready engine (not `avoid` if another is ready) with the fewest requests in flight; waits for a slot."""
        with self._slot_freed:
            while True:
                ready = [e for e in self.targets if e.ready and e.in_flight < self.max_concurrency]
                preferred = [e for e in ready if e is not avoid] or ready
                if preferred:
                    engine = min(preferred, key=lambda e: e.in_flight)
                    engine.in_flight += 1
                    return engine
                if not any(e.ready or e.process is not None for e in self.targets):
                    raise FleetError("no rollout engine is left: " + ", ".join(
                        f"{e.url} ({e.failures} failures)" for e in self.targets))
                self._slot_freed.wait(timeout=1.0)

    def _release(self, engine: Engine) -> None:
        with self._slot_freed:
            engine.in_flight -= 1
            self._slot_freed.notify_all()

    def _check(self, engine: Engine, failed: bool = True) -> None:
        """After a failure (of a request on this engine when `failed`): keep the engine if it still generates,
        else take it out and recover it in the background."""
        with engine.lock:
            if not engine.ready:
                return  # already being recovered
            engine.failures += failed
            if engine.client.health_generate():
                return
            engine.ready = False
        log.warning("engine %s does not answer /health_generate; taken out of rotation", engine.url)
        if engine.process is not None:
            threading.Thread(target=self._recover, args=(engine,), name=f"recover-{engine.url}", daemon=True).start()

    def _recover(self, engine: Engine) -> None:
        """Restart the engine's process, wait until it generates, give it the current weights, put it back."""
        try:
            engine.process.stop()
            engine.process.start()
            engine.process.wait_until_ready(engine.client, engine.startup_timeout)
            if self.resync is not None and engine is not self.router:
                self.resync(engine)
        except Exception as exc:  # noqa: BLE001 - reported, and the engine stays out of rotation
            log.error("engine %s could not be recovered: %s", engine.url, exc)
            engine.process = None
            with self._slot_freed:
                self._slot_freed.notify_all()
            return
        engine.restarts += 1
        self.stats["restarts"] += 1
        with self._slot_freed:
            engine.ready = True
            self._slot_freed.notify_all()
        log.warning("engine %s restarted and re-synced", engine.url)

    def shutdown(self, stop_engines: bool = True) -> None:
        """Stop the thread pool and (stop_engines) every process the fleet launched, the router's first."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        if stop_engines:
            stop_engine_processes(([self.router] if self.router else []) + self.engines)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)

"""The scheduler of `megatron-rl serve` (rollout/cpu_server.py): one thread runs the queued generation requests
through HFGenerator, one batch at a time, and decides when the model's weights may change.

submit() queues requests; the scheduler thread takes what is queued (up to the generator's max_batch_size), runs
it as one batch and answers each request. Before the prefill and between two decode steps the batch polls the
scheduler, which can abort it or hold it:
  pause("abort")                 aborts queued and running requests (finish_reason abort);
  pause("in_place" | "retract")  holds the running batch where it is (no KV cache to free: retract behaves as
                                 in_place); in every mode no new batch starts until resume().
  abort(rid, abort_all)          a queued request ends at once; a running one stops its batch at the next step,
                                 and the batch's other requests are queued again, first (with a sampling_seed,
                                 they produce the same tokens again).
Weights change only while no batch computes: begin_session() waits for the running batch to finish (or be held)
and starts none until end_session(); writing_weights() does the same around one update, in or outside a session.
Each poll records the weight version in use, so a request's spans say which version each output token came from.
"""

import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

from megatron_rl.rollout.hf_engine import Completion, HFGenerator, SamplingParams

PAUSE_MODES = ("abort", "retract", "in_place")
HOLD_MODES = ("in_place", "retract")

log = logging.getLogger("megatron_rl.serve")


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    rid: str
    completion: Completion | None = None
    error: str | None = None
    spans: list[tuple[str, int]] = field(default_factory=list)  # (weight version, first output token from it)

    @property
    def done(self) -> bool:
        return self.completion is not None or self.error is not None


def _aborted(message: str) -> Completion:
    return Completion([], [], {"type": "abort", "message": message})


class Scheduler:
    """Runs queued requests through the generator, one batch at a time, in its own thread.

    State, guarded by one condition variable: the queue; `computing` (a batch is inside generate and
    not held, so the model is in use); `pause_mode`; `session` (begin..end_weight_update); `weight_users`
    (updates or reads of the weights waiting or running). A batch starts only when none of pause,
    session, weight users holds it back; a held batch resumes only when none does.
    """

    def __init__(self, generator: HFGenerator, initial_version: str = "default"):
        self.generator = generator
        self.weight_version = initial_version
        self.pause_mode: str | None = None
        self.session = False
        self._cond = threading.Condition()
        self.weights_lock = threading.Lock()  # held to change the weights, or to read them
        self._queue: deque[Request] = deque()
        self._running: list[Request] = []
        self._computing = False
        self._weight_users = 0
        self._abort_running: str | None = None  # why the whole running batch is being aborted
        self._aborted_rids: set[str] = set()  # running requests to abort (the batch's others start over)
        self._spans: list[tuple[str, int]] = []
        self._polls = 0
        self._stopping = False
        self.last_step = 0.0  # time.monotonic() of the last batch poll
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # called from HTTP handler threads

    def submit(self, requests: list[Request]) -> None:
        with self._cond:
            if self._stopping:
                for request in requests:
                    request.completion = _aborted("the server is shutting down")
                return
            self._queue.extend(requests)
            self._cond.notify_all()

    def wait(self, requests: list[Request], timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: all(r.done for r in requests), timeout)

    def withdraw(self, request: Request) -> None:
        """Drop a request that is still queued (a health probe that was answered otherwise)."""
        with self._cond:
            if request in self._queue:
                self._queue.remove(request)

    def pause(self, mode: str) -> None:
        """Returns once no batch computes (aborted or held)."""
        with self._cond:
            self.pause_mode = mode
            if mode == "abort":
                self._abort_all("aborted by pause_generation")
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._computing)

    def resume(self) -> None:
        with self._cond:
            self.pause_mode = None
            self._cond.notify_all()

    def abort(self, rid: str | None, abort_all: bool) -> None:
        with self._cond:
            if abort_all:
                self._abort_all("aborted by abort_request")
            else:
                for request in [r for r in self._queue if r.rid == rid]:
                    self._queue.remove(request)
                    request.completion = _aborted("aborted by abort_request")
                if any(r.rid == rid for r in self._running):
                    self._aborted_rids.add(rid)
            self._cond.notify_all()

    def begin_session(self) -> bool:
        """Open the weight-update session (False if it was open already); returns once no batch computes."""
        with self._cond:
            opened, self.session = not self.session, True
            self._cond.wait_for(lambda: not self._computing)
            return opened

    def end_session(self) -> bool:
        with self._cond:
            if not self.session:
                return False
            self.session = False
            self._cond.notify_all()
            return True

    @contextmanager
    def writing_weights(self):
        """Exclusive use of the model's weights: no batch computes inside (a running one finishes first)."""
        with self.weights_lock:
            with self._cond:
                self._weight_users += 1
                self._cond.wait_for(lambda: not self._computing)
            try:
                yield
            finally:
                with self._cond:
                    self._weight_users -= 1
                    self._cond.notify_all()

    def set_version(self, version: str) -> None:
        with self._cond:
            self.weight_version = version

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._abort_all("the server is shutting down")
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # the scheduler thread

    def _abort_all(self, message: str) -> None:
        while self._queue:
            self._queue.popleft().completion = _aborted(message)
        if self._running:
            self._abort_running = message

    def _held_back(self) -> bool:
        return self.pause_mode is not None or self.session or self._weight_users > 0

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or (self._queue and not self._held_back()))
                if self._stopping:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.generator.max_batch_size))]
                self._running, self._computing, self._polls = batch, True, 0
                self._spans = [(self.weight_version, 0)]
            start = time.perf_counter()
            try:
                completions = self.generator.generate([r.prompt for r in batch], [r.params for r in batch], self._poll)
                error = None
            except Exception as exc:  # noqa: BLE001 - answered to the batch's requests; the server goes on
                log.exception("batch of %d requests failed", len(batch))
                completions, error = [None] * len(batch), f"generation failed: {type(exc).__name__}: {exc}"
            self._finish(batch, completions, error, time.perf_counter() - start)

    def _poll(self) -> bool:
        """Called by HFGenerator before the prefill and between decode steps (poll n: n tokens out so far)."""
        with self._cond:
            self.last_step = time.monotonic()
            produced, self._polls = self._polls, self._polls + 1
            if self.pause_mode in HOLD_MODES and not self._must_abort():
                self._computing = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: not self._held_back() or self._must_abort())
                self._computing = True
            if self.weight_version != self._spans[-1][0]:
                self._spans.append((self.weight_version, produced))
            return self._must_abort()

    def _must_abort(self) -> bool:
        return (self._stopping or self._abort_running is not None
                or any(r.rid in self._aborted_rids for r in self._running))

    def _finish(self, batch: list[Request], completions: list, error: str | None, seconds: float) -> None:
        with self._cond:
            restart = []
            for request, completion in zip(batch, completions, strict=True):
                if error is not None:
                    request.error = error
                elif (completion.finish_reason["type"] == "abort" and self._abort_running is None
                      and not self._stopping and request.rid not in self._aborted_rids):
                    restart.append(request)  # stopped because another request of its batch was aborted
                else:
                    request.spans, request.completion = list(self._spans), completion
            self._queue.extendleft(reversed(restart))
            self._running, self._computing = [], False
            self._abort_running, self._aborted_rids = None, set()
            self._cond.notify_all()
        if error is None:
            log.info("batch: %d requests, %d prompt + %d output tokens, %.3f s, weight_version %s%s", len(batch),
                     sum(len(r.prompt) for r in batch), sum(len(c.output_ids) for c in completions), seconds,
                     self._spans[-1][0], f", {len(restart)} restarted" if restart else "")

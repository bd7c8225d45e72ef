"""AsyncEngine: an asyncio front end that keeps the engine stepping while requests stream.

The LLMEngine is built and driven by one background thread (a step blocks on the workers); callers submit
and abort from the event loop, and each request's outputs reach it through its own asyncio queue.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

from shardserve.core.outputs import RequestOutput
from shardserve.engine.llm_engine import LLMEngine, PromptType
from shardserve.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine stopped (a worker died); nothing more can be served."""


class EngineStoppingError(EngineDeadError):
    """The server is shutting down: it takes no new requests, and cuts those still running at its drain deadline."""


class AsyncEngine:
    def __init__(self, make_engine: Callable[[], LLMEngine], max_waiting_requests: int | None = None):
        """Builds the engine with `make_engine()` in the engine thread (its errors are raised here).

        One thread runs every torch op: torch's OpenMP pool belongs to the thread that runs parallel ops, and
        a second pool (an engine loaded on the main thread, stepped on another) made libgomp throttle its
        spin-waits on 2 cores, every op ~30% slower (BENCHMARKS.md, server vs offline engine).
        """
        self.max_waiting_requests = max_waiting_requests
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.wakeup = threading.Event()
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.dead: Exception | None = None
        self.refusing: str | None = None        # why new requests are refused (the server is draining)
        self.stopping = False
        self.num_submitted = 0                  # sequences submitted (event loop side)
        self.num_added = 0                      # sequences the engine thread took in (or dropped)
        started = threading.Event()
        self.start_error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(make_engine, started), name="shardserve-engine",
                                       daemon=True)
        self.thread.start()
        started.wait()
        if self.start_error is not None:
            raise self.start_error

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # ---- called from the event loop -----------------------------------------------------------------
    def prepare(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Tokenize and validate now, so a bad prompt is the caller's ValueError, not the engine's."""
        text, ids = self.engine.tokenize(prompt)
        self.engine.validate_prompt(ids)
        return text, ids

    def generate(self, request_id: str, prompt: PromptType, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Queue the request now and return its cumulative RequestOutputs, until it finishes.

        Refusals happen here, before anything is queued: EngineDeadError, OverflowError (the waiting queue is
        full) or ValueError (a bad prompt or params), so a server can still answer with an error status. Closing the
        iterator early aborts the request.
        """
        self.check_accepting()
        waiting = self.num_waiting()
        if self.max_waiting_requests is not None and waiting >= self.max_waiting_requests:
            raise OverflowError(f"{waiting} requests are already waiting")
        text, ids = self.prepare(prompt)
        self.engine.validate_params(params)
        stream: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = (asyncio.get_running_loop(), stream)
        self.num_submitted += params.n
        self._send(("add", request_id, {"prompt": text, "prompt_token_ids": ids}, params, time.time()))
        return self._outputs(request_id, stream)

    def num_waiting(self) -> int:
        """Sequences that will wait: the engine's last count, plus those submitted since that its free running
        slots will not take (none are free for them when some already wait: the KV cache is the limit)."""
        stats = self.stats
        submitted_since = self.num_submitted - stats["num_added"]
        free = 0 if stats["num_waiting"] else max(0, self.max_running - stats["num_running"])
        return stats["num_waiting"] + max(0, submitted_since - free)

    async def _outputs(self, request_id: str, stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self.streams.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self.streams.pop(request_id, None)
        self._send(("abort", request_id))

    def stop_accepting(self, reason: str) -> None:
        """Refuse every new request from now on (EngineStoppingError(reason)); those already queued go on."""
        self.refusing = reason

    def abort_all(self, error: Exception) -> int:
        """End every request in progress: its consumer gets `error` (raised from its iterator) and the engine drops
        its sequences. Returns how many were cut."""
        cut = 0
        for request_id in list(self.streams):
            target = self.streams.pop(request_id, None)
            if target is None:                  # it finished meanwhile
                continue
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, error)
            self._send(("abort", request_id))
            cut += 1
        return cut

    def shutdown(self) -> None:
        self.stopping = True
        self.wakeup.set()
        self.thread.join(timeout=30)
        self.engine.shutdown()

    def _send(self, command: tuple) -> None:
        self.commands.put(command)
        self.wakeup.set()

    # ---- the engine thread --------------------------------------------------------------------------
    def _run(self, make_engine: Callable[[], LLMEngine], started: threading.Event) -> None:
        try:
            self.engine = make_engine()
            self.max_running = self.engine.config.scheduler.max_num_seqs * self.engine.executor.max_concurrent_batches
            self._publish_stats()
        except BaseException as exc:
            self.start_error = exc
            return
        finally:
            started.set()
        self._loop()

    def _loop(self) -> None:
        engine = self.engine
        while not self.stopping:
            self._drain_commands()
            if not engine.has_unfinished_requests():
                self._publish_stats()
                self.wakeup.wait(timeout=1.0)
                self.wakeup.clear()
                try:
                    engine.executor.check_health()      # a worker that dies while idle must show in /health
                except Exception as exc:
                    engine.dead = exc
                    self._die(exc)
                    return
                continue
            try:
                outputs = engine.step()
            except Exception as exc:
                self._die(exc)
                return
            for out in outputs:
                self._deliver(out.request_id, out, last=out.finished)
            self._publish_stats()

    def _publish_stats(self) -> None:
        """One consistent snapshot, replaced whole: the event loop reads it without a lock."""
        self.stats = dict(self.engine.stats(), num_requests=len(self.engine.requests), num_added=self.num_added)

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt, params, arrival = command
                self.num_added += params.n
                if request_id not in self.streams:
                    continue                    # its consumer already went away
                try:
                    self.engine.add_request(request_id, prompt, params, arrival)
                except ValueError as exc:
                    self._deliver(request_id, exc, last=True)
            elif command[0] == "abort":
                self.engine.abort_request(command[1])

    def _deliver(self, request_id: str, item, last: bool = False) -> None:
        """Hand an output (or an exception) to the request's consumer; the last one also forgets the stream,
        so a request whose consumer never started leaves nothing behind."""
        target = self.streams.pop(request_id, None) if last else self.streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def check_accepting(self) -> None:
        """Raise EngineDeadError once the engine stopped, EngineStoppingError while the server drains."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead}")
        if self.refusing is not None:
            raise EngineStoppingError(self.refusing)

    def _die(self, exc: Exception) -> None:
        self.dead = exc
        error = EngineDeadError(f"the engine stopped: {exc}")
        for request_id in list(self.streams):
            self._deliver(request_id, error, last=True)

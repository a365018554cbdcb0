"""Where `AsyncLLM`'s engine loop runs: on a thread of this process, or in an engine process.

Both clients take commands with `send` (never blocking the caller), hand every `EngineBatch` to
`on_batch` on a thread of their own, and call `on_lost(reason)` once if the engine goes away
unexpectedly. `stop` ends the loop, which first aborts what is still in flight.

The engine process is spawned (`multiprocessing`, "spawn") and talks through two one-way pipes
of pickled messages: lists of commands in, batches out. A sender thread batches commands so the
event loop never writes to a pipe, and a receiver thread turns batches into callbacks, so the
engine steps without waiting for HTTP work, and HTTP work never competes with steps for a GIL.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait

from gllm_engine.config import EngineConfig
from gllm_engine.core.engine_core import EngineCore, EngineStats, load_engine_tokenizer
from gllm_engine.entrypoints.engine_loop import Command, EngineBatch, EngineLoop, engine_process_main
from gllm_engine.loader import ModelLoadError

logger = logging.getLogger(__name__)

OnBatch = Callable[[EngineBatch], None]
OnLost = Callable[[str], None]
_REAP_TIMEOUT_S = 5.0  # after its pipe closed, how long an exiting engine process gets to be reaped


class ThreadEngineClient:
    """The engine loop on a daemon thread of this process; `engine` is reachable (tests wrap its `step`).

    The thread builds the engine as well as stepping it: on the CPU, stepping from another thread than
    the one that loaded the model ran decode steps 1.3-1.6x slower (`benchmarks/RESULTS.md`, 2026-12-07).
    """

    pid: int | None = None

    def __init__(self, config: EngineConfig, *, show_progress: bool, on_batch: OnBatch, on_lost: OnLost):
        self._inbox: queue.Queue[Command] = queue.Queue()
        self._on_lost = on_lost
        self._stopped = False
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(config, show_progress, on_batch), name="gllm-engine",
                                        daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_seq_len
        self.stats = self.engine.stats()

    def _run(self, config: EngineConfig, show_progress: bool, on_batch: OnBatch) -> None:
        try:
            self.engine = EngineCore(config, show_progress=show_progress)
            loop = EngineLoop(self.engine, self._inbox, on_batch)
        except BaseException as e:
            self._build_error = e
            return
        finally:
            self._built.set()
        try:
            loop.run()
        except BaseException as e:
            logger.exception("the engine thread failed")
            self._on_lost(f"the engine thread failed: {e}")

    def send(self, command: Command) -> None:
        self._inbox.put(command)

    def stop(self, timeout_s: float) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.send(("stop", None))
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():  # a step that never returns: leave the daemon thread to the exit
            logger.error("the engine thread did not stop")
            return
        self.engine.shutdown()


class ProcessEngineClient:
    """The engine loop in a spawned process; the tokenizer is loaded here too, while the engine loads.

    Once the engine is ready, only the receiver thread waits for (reaps) the process: it does when
    the pipe closes. The process is not a daemon (it may start rank processes of its own), so an
    exit hook stops it if nobody called `stop`.
    """

    engine: EngineCore | None = None

    def __init__(self, config: EngineConfig, *, show_progress: bool, on_batch: OnBatch, on_lost: OnLost):
        ctx = mp.get_context("spawn")
        commands_in, self._commands = ctx.Pipe(duplex=False)
        self._outputs, outputs_out = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=engine_process_main, name="gllm-engine", daemon=False,
                                 args=(config, commands_in, outputs_out, show_progress,
                                       logging.getLogger().getEffectiveLevel()))
        started = time.monotonic()
        self._proc.start()
        commands_in.close()  # only the child holds these ends now: its exit closes them
        outputs_out.close()
        self.pid = self._proc.pid
        self._stopping = False
        logger.info("engine process %d: loading %s", self.pid, config.model.name)
        try:
            self.tokenizer = load_engine_tokenizer(config)
            self.max_model_len, self.stats = self._wait_until_ready(config)
        except BaseException:
            self._kill()
            raise
        logger.info("engine process %d: ready in %.1f s", self.pid, time.monotonic() - started)
        self._on_batch, self._on_lost = on_batch, on_lost
        self._outbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_commands, name="gllm-engine-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive_batches, name="gllm-engine-recv", daemon=True)
        self._sender.start()
        self._receiver.start()
        atexit.register(self._stop_at_exit)

    def _wait_until_ready(self, config: EngineConfig) -> tuple[int, EngineStats]:
        """The engine's "ready" message; its load error re-raised here; ModelLoadError if it died loading."""
        wait([self._outputs, self._proc.sentinel])  # a message, or the process ended (maybe after one)
        try:
            kind, payload = self._outputs.recv()
        except (EOFError, OSError):
            self._proc.join(_REAP_TIMEOUT_S)
            raise ModelLoadError(f"the engine process {_ended(self._proc.exitcode)} while loading "
                                 f"{config.model.name}; its log is above") from None
        if kind == "failed":
            error, remote_traceback = payload
            self._proc.join(_REAP_TIMEOUT_S)
            raise error from _EngineProcessTraceback(remote_traceback)
        return payload

    def _send_commands(self) -> None:
        while True:
            commands = [self._outbox.get()]
            while not self._outbox.empty():
                commands.append(self._outbox.get())
            try:
                self._commands.send(commands)
            except OSError:  # the engine process is gone; the receiver reports it
                return
            if commands[-1][0] == "stop":
                return

    def _receive_batches(self) -> None:
        while True:
            try:
                batch = self._outputs.recv()
            except (EOFError, OSError):
                break
            self._on_batch(batch)
        self._proc.join(_REAP_TIMEOUT_S)
        if not self._stopping:
            reason = f"the engine process {_ended(self._proc.exitcode)}"
            logger.error("%s; the server cannot serve any more requests", reason)
            self._on_lost(reason)

    def send(self, command: Command) -> None:
        self._outbox.put(command)

    def stop(self, timeout_s: float) -> None:
        """Ask the engine to abort what is left and exit; kill it if it has not within `timeout_s`."""
        if self._stopping:
            return
        self._stopping = True
        atexit.unregister(self._stop_at_exit)
        self.send(("stop", None))
        self._await_exit(timeout_s)
        self._sender.join(timeout_s)

    def _await_exit(self, timeout_s: float) -> None:
        """Wait for the receiver to see the process end; kill the process if that takes over `timeout_s`."""
        self._receiver.join(timeout_s)
        if self._receiver.is_alive():
            logger.error("the engine process did not stop within %.0f s; killing it", timeout_s)
            self._proc.kill()
            self._receiver.join()

    def _stop_at_exit(self) -> None:
        """At interpreter exit: closing the command pipe stops the engine (multiprocessing would
        otherwise wait for it forever)."""
        self._stopping = True
        self._commands.close()
        self._await_exit(10.0)

    def _kill(self) -> None:
        """Before the engine is ready (no receiver yet): end the process now."""
        self._stopping = True
        self._proc.kill()
        self._proc.join()


class _EngineProcessTraceback(Exception):
    """Where an error raised in the engine process came from, shown as the cause of its re-raise here."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\nin the engine process:\n{self.text}"


def _ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "closed its connection"
    return f"died (signal {-exitcode})" if exitcode < 0 else f"exited (exit code {exitcode})"

"""The engine side of `AsyncLLM`: one loop that drives an `EngineCore` from a queue of commands.

The same loop runs on a thread of the server's process or alone in an engine process
(`engine_process_main`); only the way its messages travel differs (`engine_client`).

Commands in: ("add", (request_id, prompt_token_ids, params, prompt, cache_salt)), ("abort", request_id),
("stop", None). Out: one `EngineBatch` after each round of commands and after each step.

`AsyncLLM` runs every request with `RequestOutputKind.DELTA`: a batch carries, per request that
advanced, only its new token ids, text and logprobs, packed as plain tuples (`pack`), so a step's
message stays the same size however long the requests grow, and pickles about ten times faster
than dataclasses would.

Detokenization stays here, beside the scheduler. Stop strings are finish conditions: checked
where the text is made, a sequence ends (and frees its blocks) in the step that completes one,
where a front-end detokenizer would need an abort round trip per stop, decoding on meanwhile.
Incremental decoding costs a few microseconds per token (6.5 us with SmolLM2's tokenizer on a
CPU core), which the offline `LLM` pays as well, and in its own process it takes nothing from the
HTTP side.
"""

from __future__ import annotations

import logging
import pickle
import queue
import signal
import threading
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from gllm_engine.config import EngineConfig
from gllm_engine.core.engine_core import EngineCore, EngineStats
from gllm_engine.executor.comm import RankDiedError
from gllm_engine.outputs import RequestOutput
from gllm_engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# One request's news: (request_id, finished, num_cached_tokens, choices), each choice
# (index, new_text, new_token_ids, finish_reason, stop_reason, new_logprobs or None).
Delta = tuple[str, bool, int, list[tuple]]
Command = tuple[str, Any]


class EngineUnavailableError(RuntimeError):
    """The engine takes no requests: it is shutting down, or a rank or the engine process died."""


class EngineStepError(RuntimeError):
    """An engine step failed while this request was in flight (the engine itself goes on)."""


@dataclass
class EngineBatch:
    """What the engine reports after a round of commands or a step."""

    deltas: list[Delta]  # requests that advanced or ended
    errors: list[tuple[str, Exception]]  # requests that failed; they are over
    stats: EngineStats  # as of the end of this round
    num_added: int  # "add" commands this round took, accepted or refused
    dead: str | None  # why the engine can serve no more (a rank died), once it cannot


def pack(out: RequestOutput) -> Delta:
    """A DELTA `RequestOutput` as plain data, without the prompt (the front end has it)."""
    return (out.request_id, out.finished, out.num_cached_tokens,
            [(o.index, o.text, o.token_ids, o.finish_reason, o.stop_reason, o.logprobs) for o in out.outputs])


class EngineLoop:
    """Runs commands from `inbox` and engine steps until "stop"; hands every batch to `emit`.

    Sleeps on the inbox while there is nothing to step; otherwise takes every queued command,
    then steps once. Not thread-safe: `run` and `engine` belong to one thread.
    """

    def __init__(self, engine: EngineCore, inbox: queue.Queue[Command], emit: Callable[[EngineBatch], None]):
        self.engine, self.inbox, self.emit = engine, inbox, emit
        self.dead: str | None = None

    def run(self) -> None:
        while True:
            commands = [] if self.engine.has_unfinished_requests() else [self.inbox.get()]
            while True:
                try:
                    commands.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            if commands and not self._run_commands(commands):
                return
            if self.engine.has_unfinished_requests():
                self._step()

    def _run_commands(self, commands: list[Command]) -> bool:
        """Apply one round of commands and report it; False once told to stop."""
        deltas: list[Delta] = []
        errors: list[tuple[str, Exception]] = []
        num_added = 0
        for kind, payload in commands:
            if kind == "add":
                num_added += 1
                error = self._add(*payload)
                if error is not None:
                    errors.append((payload[0], error))
            elif kind == "abort":
                deltas += self._abort([payload])
            else:  # "stop": whatever is still in flight ends as aborted
                self._emit(deltas + self._abort(list(self.engine.requests)), errors, num_added)
                return False
        self._emit(deltas, errors, num_added)
        return True

    def _add(self, request_id: str, token_ids: list[int], params: SamplingParams, prompt: str | None,
             cache_salt: str | None) -> Exception | None:
        try:
            if self.dead:
                raise EngineUnavailableError(self.dead)
            self.engine.add_request(request_id, token_ids, params, prompt, cache_salt)
        except (ValueError, EngineUnavailableError) as e:
            return e
        except Exception as e:
            logger.exception("the engine could not take request %s", request_id)
            return EngineStepError(f"the engine could not take the request: {e}")
        return None

    def _abort(self, request_ids: Iterable[str]) -> list[Delta]:
        try:
            return [pack(out) for out in self.engine.abort_requests(request_ids)]
        except Exception:
            logger.exception("aborting requests failed")
            return []

    def _step(self) -> None:
        in_flight = list(self.engine.requests)
        deltas: list[Delta] = []
        errors: list[tuple[str, Exception]] = []
        try:
            deltas = [pack(out) for out in self.engine.step()]
        except RankDiedError as e:
            logger.exception("a rank died; the engine stops serving")
            self.dead = f"the engine stopped: {e}"
            errors = [(rid, EngineUnavailableError(self.dead)) for rid in in_flight]
        except Exception as e:  # keep serving: end what was in flight, log the cause
            logger.exception("engine step failed")
            try:
                self.engine.abort_requests(in_flight)
            except Exception:
                logger.exception("aborting requests after a failed step failed")
            errors = [(rid, EngineStepError(f"the engine failed: {e}")) for rid in in_flight]
        self._emit(deltas, errors, 0)

    def _emit(self, deltas: list[Delta], errors: list[tuple[str, Exception]], num_added: int) -> None:
        self.emit(EngineBatch(deltas, errors, self.engine.stats(), num_added, self.dead))


# ---- the engine process -------------------------------------------------------------------------
def engine_process_main(config: EngineConfig, commands: Connection, outputs: Connection, show_progress: bool,
                        log_level: int) -> None:
    """Entry point of the engine process: load the engine, report ("ready", (max_model_len, stats)) or
    ("failed", (error, traceback text)) on `outputs`, then run commands until "stop" or until the
    front end goes away (its end of `commands` closes).

    SIGINT and SIGTERM are ignored: a Ctrl-C reaches the whole process group, and the front end
    decides when the engine stops, after its requests had their grace period.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = EngineCore(config, show_progress=show_progress)
    except BaseException as e:
        outputs.send(("failed", (_picklable(e), traceback.format_exc())))
        return
    outputs.send(("ready", (engine.max_seq_len, engine.stats())))
    inbox: queue.Queue[Command] = queue.Queue()
    threading.Thread(target=_receive_commands, args=(commands, inbox), name="gllm-commands", daemon=True).start()
    try:
        EngineLoop(engine, inbox, outputs.send).run()
    finally:
        engine.shutdown()
        outputs.close()


def _receive_commands(commands: Connection, inbox: queue.Queue[Command]) -> None:
    """Move each received list of commands into the loop's inbox; a closed connection means stop."""
    try:
        while True:
            for command in commands.recv():
                inbox.put(command)
    except (EOFError, OSError):
        inbox.put(("stop", None))


def _picklable(error: BaseException) -> BaseException:
    """`error` if it survives pickling (ModelLoadError does), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")

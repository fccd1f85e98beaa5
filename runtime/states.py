"""The states a part of the service can be in, and the moves a supervisor may make between them.

As in llama-swap's process state machine, one object owns one process and every move it
makes is checked against MOVES, so a start can never be laid over a running process.
`status()` observes the state from outside (pid file, process table, HTTP probe); a
degraded part must be stopped before it is started again.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"  # launched and not answering yet, within its start timeout
    SERVING = "serving"
    DEGRADED = "degraded"  # runs but does not answer in time, or died without a stop
    FAILED = "failed"  # its start failed, or it crashed; a supervisor may start it again


MOVES = {
    State.STOPPED: {State.STOPPED, State.STARTING},
    State.STARTING: {State.SERVING, State.FAILED, State.STOPPED},
    State.SERVING: {State.FAILED, State.STOPPED},
    State.DEGRADED: {State.STOPPED},
    State.FAILED: {State.STARTING, State.STOPPED},
}


class TransitionError(RuntimeError):
    """A supervisor tried a move that MOVES forbids: a bug in its caller, not in the input."""


def checked_move(name: str, current: State, target: State) -> State:
    """target, if MOVES allows current -> target; else TransitionError."""
    if target not in MOVES[current]:
        raise TransitionError(f"the {name} cannot go from {current} to {target}")
    return target


@dataclass(frozen=True)
class ComponentStatus:
    state: State
    url: str
    pid: int | None = None
    model: str | None = None
    started_at: float | None = None
    detail: str = ""

    @property
    def is_serving(self) -> bool:
        return self.state == State.SERVING

"""The states of the service's parts: checked moves, and the state of the whole."""

from __future__ import annotations

import pytest

from runtime import service
from runtime.settings import Paths, load_settings
from runtime.states import ComponentStatus, State, TransitionError
from runtime.supervisor import BackendSupervisor


def test_a_supervisor_refuses_to_start_what_it_already_serves(tmp_path):
    backend = BackendSupervisor(load_settings(Paths(root=tmp_path)), echo=lambda line: None)
    backend.state = State.SERVING
    with pytest.raises(TransitionError, match="cannot go from serving to starting"):
        backend.start()
    assert not backend.pidfile.exists(), "a refused start must launch nothing"


@pytest.mark.parametrize(
    ("backend", "gateway", "overall"),
    [
        (State.SERVING, State.SERVING, State.SERVING),
        (State.STARTING, State.STOPPED, State.STARTING),  # the gateway comes next
        (State.SERVING, State.STARTING, State.STARTING),
        (State.STARTING, State.DEGRADED, State.DEGRADED),
        (State.SERVING, State.STOPPED, State.DEGRADED),
    ],
)
def test_the_whole_is_starting_only_while_no_part_is_in_trouble(
    tmp_path, backend, gateway, overall
):
    settings = load_settings(Paths(root=tmp_path))
    statuses = {
        "database": ComponentStatus(State.SERVING, "db"),
        "backend": ComponentStatus(backend, "b"),
        "gateway": ComponentStatus(gateway, "g"),
    }
    assert service.overall_state(settings, statuses) == overall

"""The VM's states as vfkit reports them, and which REST state changes each allows (sans-IO).

States are Virtualization.framework's VZVirtualMachineState, named as Code-Hex/vz's
stringer names them (virtualmachinestate_string.go), which is what vfkit's
`GET /vm/state` answers (pkg/rest/vf/vm_config.go). That answer's flags are VZ's:
canStart, canPause, canResume, `canStop` = canRequestStop (ask the guest) and
`canHardStop` = canStop (pull the plug). Apple documents stop() for a running or paused
VM, pause() for a running one, resume() for a paused one; requestStop() asks a running
guest.

`POST /vm/state {"state": ...}` takes Pause, Resume, Stop (RequestStop) or HardStop
(pkg/rest/define/config.go, pkg/rest/vf/state_change.go); anything else is vfkit's
"invalid new VMState: X". A change the state does not allow fails as VZ fails it.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any


class VMState(enum.Enum):
    STOPPED = "VirtualMachineStateStopped"
    RUNNING = "VirtualMachineStateRunning"
    PAUSED = "VirtualMachineStatePaused"
    ERROR = "VirtualMachineStateError"
    STARTING = "VirtualMachineStateStarting"
    PAUSING = "VirtualMachineStatePausing"
    RESUMING = "VirtualMachineStateResuming"
    STOPPING = "VirtualMachineStateStopping"


class StateChange(enum.Enum):
    PAUSE = "Pause"
    RESUME = "Resume"
    STOP = "Stop"
    HARD_STOP = "HardStop"


#: The states from which each change may start (VZ's canPause, canResume,
#: canRequestStop, canStop).
ALLOWED_FROM: dict[StateChange, frozenset[VMState]] = {
    StateChange.PAUSE: frozenset({VMState.RUNNING}),
    StateChange.RESUME: frozenset({VMState.PAUSED}),
    StateChange.STOP: frozenset({VMState.RUNNING}),
    StateChange.HARD_STOP: frozenset({VMState.RUNNING, VMState.PAUSED}),
}
CAN_START_FROM = frozenset({VMState.STOPPED, VMState.ERROR})


class BadRequest(ValueError):
    """A body gin's ShouldBindJSON rejects: 400 {"error": message}."""


class ChangeRefused(RuntimeError):
    """A change vfkit or VZ refuses: 500 {"error": message}."""


def state_json(state: VMState) -> dict[str, Any]:
    """The body of `GET /vm/state`."""
    return {
        "state": state.value,
        "canStart": state in CAN_START_FROM,
        "canPause": state in ALLOWED_FROM[StateChange.PAUSE],
        "canResume": state in ALLOWED_FROM[StateChange.RESUME],
        "canStop": state in ALLOWED_FROM[StateChange.STOP],
        "canHardStop": state in ALLOWED_FROM[StateChange.HARD_STOP],
    }


@dataclass(frozen=True)
class Requested:
    """What a POST asked for: a change by name, as vfkit receives it."""

    name: str


def parse_change_body(body: bytes) -> Requested:
    """The `state` of a POST /vm/state body (define.VMState), as gin binds it."""
    if not body.strip():
        raise BadRequest("EOF")
    try:
        document = json.loads(body)
    except ValueError as error:
        raise BadRequest(f"invalid JSON: {error}") from None
    if not isinstance(document, dict):
        kind = type(document).__name__
        raise BadRequest(f"json: cannot unmarshal {kind} into Go value of type define.VMState")
    value = document.get("state", "")
    if not isinstance(value, str):
        kind = type(value).__name__
        raise BadRequest(
            f"json: cannot unmarshal {kind} into Go struct field VMState.state of type string"
        )
    return Requested(value)


def check_change(requested: Requested, state: VMState) -> StateChange:
    """The change to make from `state`, or ChangeRefused in vfkit's or VZ's terms."""
    try:
        change = StateChange(requested.name)
    except ValueError:
        raise ChangeRefused(f"invalid new VMState: {requested.name}") from None
    if state not in ALLOWED_FROM[change]:
        raise ChangeRefused(
            f"invalid virtual machine state transition: {change.value} in {state.value}"
        )
    return change

"""The generated protobuf code is what the .proto files say, and field numbers match containerd."""

from harpoon.api import regen
from harpoon.api.containerd.events import task_pb2 as events
from harpoon.api.containerd.task.v2 import shim_pb2 as v2
from harpoon.api.containerd.task.v3 import shim_pb2 as v3
from harpoon.api.ttrpc import request_pb2


def test_generated_code_is_not_stale() -> None:
    assert regen.stale_files(regen.REPO_ROOT / "src") == []


def test_task_v3_is_v2_under_another_package() -> None:
    text = regen.TASK_V2.read_text()
    assert regen.derive_task_v3(text).endswith(
        text.replace("package containerd.task.v2;", "package containerd.task.v3;")
    )
    request = v2.CreateTaskRequest(id="c1", bundle="/b", terminal=True, stdout="/o")
    assert v3.CreateTaskRequest.FromString(request.SerializeToString()).stdout == "/o"


def test_field_numbers_match_the_protocol_document() -> None:
    fields = {f.name: f.number for f in v2.CreateTaskRequest.DESCRIPTOR.fields}
    assert fields == {
        "id": 1,
        "bundle": 2,
        "rootfs": 3,
        "terminal": 4,
        "stdin": 5,
        "stdout": 6,
        "stderr": 7,
        "checkpoint": 8,
        "parent_checkpoint": 9,
        "options": 10,
    }
    state = {f.name: f.number for f in v2.StateResponse.DESCRIPTOR.fields}
    assert state["exec_id"] == 11 and state["exited_at"] == 10 and state["status"] == 4
    exit_fields = {f.name: f.number for f in events.TaskExit.DESCRIPTOR.fields}
    assert exit_fields == {
        "container_id": 1,
        "id": 2,
        "pid": 3,
        "exit_status": 4,
        "exited_at": 5,
    }
    delete = {f.name: f.number for f in events.TaskDelete.DESCRIPTOR.fields}
    assert delete["id"] == 5 and delete["exited_at"] == 4
    request = {f.name: f.number for f in request_pb2.Request.DESCRIPTOR.fields}
    assert request == {
        "service": 1,
        "method": 2,
        "payload": 3,
        "timeout_nano": 4,
        "metadata": 5,
    }


def test_a_known_wire_encoding_decodes() -> None:
    # KillRequest{id:"a", signal:9, all:true}, encoded by hand from the field table.
    wire = b"\x0a\x01a\x18\x09\x20\x01"
    kill = v2.KillRequest.FromString(wire)
    assert (kill.id, kill.signal, kill.all) == ("a", 9, True)

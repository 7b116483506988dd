"""The committed gRPC modules are exactly what fedadapt.proto generates, and the services are what
clients and the CLI rely on (names, argument/return types, streaming directions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedadapt.proto import fedadapt_pb2 as pb
from fedadapt.proto.generate import HERE, generate

GENERATED = ["fedadapt_pb2.py", "fedadapt_pb2_grpc.py"]

# service -> method -> (request, reply, client streaming, server streaming)
SERVICES = {
    "Coordinator": {
        "Join": ("JoinRequest", "JoinReply", False, False),
        "PullTask": ("PullRequest", "TaskPart", False, True),
        "PushResult": ("ResultPart", "PushReply", True, False),
        "Heartbeat": ("HeartbeatRequest", "HeartbeatReply", False, False),
    },
    "Control": {
        "SubmitRun": ("SubmitRunRequest", "RunInfo", False, False),
        "ListRuns": ("ListRunsRequest", "RunList", False, False),
        "GetRun": ("RunRef", "RunInfo", False, False),
        "FollowRun": ("RunRef", "RunEvent", False, True),
        "StopRun": ("RunRef", "RunInfo", False, False),
        "ResumeRun": ("RunRef", "RunInfo", False, False),
        "DownloadRun": ("RunRef", "RunFile", False, True),
    },
}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("proto")
    generate(out)
    return out / "fedadapt" / "proto"  # protoc runs with -I at the package root


@pytest.mark.parametrize("name", GENERATED)
def test_committed_module_equals_a_fresh_generation(regenerated, name):
    fresh = regenerated / name
    assert fresh.is_file(), f"protoc did not write {name}: {sorted(p.name for p in regenerated.iterdir())}"
    committed = (HERE / name).read_text()
    assert fresh.read_text() == committed, (
        f"fedadapt/proto/{name} is stale: run `python -m fedadapt.proto.generate` and commit the result")


def test_grpc_module_imports_the_packaged_pb2(regenerated):
    # an edge client imports fedadapt.proto.fedadapt_pb2_grpc; a bare `import fedadapt_pb2` would break it
    text = (regenerated / "fedadapt_pb2_grpc.py").read_text()
    assert "from fedadapt.proto import fedadapt_pb2" in text


def test_services_and_methods_are_exactly_the_protocol():
    assert pb.DESCRIPTOR.package == "fedadapt.v1"
    got = {
        s.name: {m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
                 for m in s.methods}
        for s in pb.DESCRIPTOR.services_by_name.values()
    }
    assert got == SERVICES


def test_stubs_expose_every_method():
    from fedadapt.proto import fedadapt_pb2_grpc as pb_grpc

    for service, methods in SERVICES.items():
        servicer = getattr(pb_grpc, f"{service}Servicer")
        assert hasattr(pb_grpc, f"{service}Stub") and hasattr(pb_grpc, f"add_{service}Servicer_to_server")
        for method in methods:
            assert callable(getattr(servicer, method)), (service, method)


def test_push_reply_statuses_are_stable():
    # the numbers are on the wire: changing them silently breaks deployed clients
    assert dict(pb.PushReply.Status.items()) == {"ACCEPTED": 0, "DUPLICATE": 1, "LATE": 2, "REJECTED": 3,
                                                 "REFUSED": 4}


def test_parts_carry_a_header_and_a_chunk():
    # a part is (optional header, chunk bytes): field numbers and types are on the wire; an upload's last
    # part may carry the digest instead (field 3)
    for msg, header in ((pb.TaskPart, "TaskHeader"), (pb.ResultPart, "ResultHeader")):
        fields = {f.name: f for f in msg.DESCRIPTOR.fields}
        assert set(fields) == ({"header", "chunk"} if msg is pb.TaskPart else {"header", "chunk", "sha256"})
        assert fields["header"].number == 1 and fields["header"].message_type.name == header
        assert fields["chunk"].number == 2 and fields["chunk"].type == fields["chunk"].TYPE_BYTES
    payload = {f.name: f.number for f in pb.Payload.DESCRIPTOR.fields}
    assert payload == {"size": 1, "sha256": 2}

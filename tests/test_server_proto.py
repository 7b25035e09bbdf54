"""The cloak.v1 contract: generated code matches the protos, buf lint is clean, the descriptors are as served."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_has_not_drifted():
    pytest.importorskip("grpc_tools")
    from server import codegen

    problems = codegen.check()
    assert not problems, "\n".join(problems) + "\nserver/gen/ is stale: run `python -m server.codegen`"


def test_generated_code_describes_the_proto_files():
    from google.protobuf import descriptor_pb2

    from server.gen import cloak_service_pb2 as pb

    fd = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert fd.name == "cloak/v1/cloak_service.proto" and fd.package == "cloak.v1"
    assert (ROOT / "proto" / fd.name).is_file()
    assert [m.name for m in fd.service[0].method] == ["Protect", "Attach", "Cancel", "GetJob", "GetServerInfo",
                                                         "EstimateJob"]


@pytest.mark.skipif(shutil.which("buf") is None, reason="buf CLI not installed (pip install buf-bin)")
def test_buf_lint_standard():
    r = subprocess.run(["buf", "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr

"""Regenerate fedadapt_pb2.py and fedadapt_pb2_grpc.py from fedadapt.proto (needs grpcio-tools).

The generated modules are committed so that an edge client needs only grpcio and protobuf at run time;
tests/test_proto.py regenerates them into a temporary folder and fails if the committed ones differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    # -I at the package root so the generated grpc module imports `fedadapt.proto.fedadapt_pb2`
    root = HERE.parent.parent
    args = ["protoc", f"-I{root}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            str(HERE / "fedadapt.proto")]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent.parent
    generate(out)

"""Regenerate the runtime.v1 Python modules from cri_api/v1/api.proto.

``python -m cri_api.generate`` rewrites cri_api/v1/api_pb2.py, api_pb2.pyi and api_pb2_grpc.py
in place. ``generate(out_root)`` writes them under another root instead (the freshness test
compares the two). The proto is compiled with the repository root as include path, so the
generated modules import each other as ``cri_api.v1.api_pb2``.
"""

from __future__ import annotations

import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO = "cri_api/v1/api.proto"
OUTPUTS = ("cri_api/v1/api_pb2.py", "cri_api/v1/api_pb2.pyi", "cri_api/v1/api_pb2_grpc.py")


class GenerateError(RuntimeError):
    """protoc failed; the message carries its exit status and output."""


def generate(out_root: pathlib.Path = REPO_ROOT) -> list[pathlib.Path]:
    """Compile the proto into ``out_root`` and return the paths of the generated files."""
    from grpc_tools import protoc  # only the generator needs grpcio-tools

    out_root = pathlib.Path(out_root)
    (out_root / PROTO).parent.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(REPO_ROOT / PROTO),
    ]
    status = protoc.main(args)
    if status != 0:
        raise GenerateError(f"protoc exited with status {status} for {PROTO} (args: {' '.join(args[1:])})")
    return [out_root / rel for rel in OUTPUTS]


def main() -> int:
    for path in generate():
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

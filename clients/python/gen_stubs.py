#!/usr/bin/python3
"""Generates the forkd.v1 gRPC stubs into the package's private ``forkd/_gen`` directory.

Uses the system's ``protoc`` and gRPC Python plugin (Debian: protobuf-compiler,
protobuf-compiler-grpc), so nothing is downloaded. setup.py calls it while building the
package, CMake calls it for the build tree, and people working from a checkout can run it by
hand::

    /usr/bin/python3 clients/python/gen_stubs.py            # into clients/python/forkd/_gen

Stdlib only: it runs before the package (or grpc) can be imported.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_REL = os.path.join("forkd", "v1", "forkd.proto")

# protoc names the grpc module's import of the message module after the proto's path
# ("from forkd.v1 import forkd_pb2"). Inside our own package called "forkd" that absolute
# import would look for a forkd.v1 subpackage, so the stubs are made relative.
_GRPC_IMPORT = "from forkd.v1 import forkd_pb2 as"
_GRPC_IMPORT_RELATIVE = "from . import forkd_pb2 as"
# The message classes' __module__ likewise follows the module they really live in, so that
# pickling and repr name an importable module.
_MODULE_NAME = "'forkd.v1.forkd_pb2'"


def default_proto_dir() -> str:
    """The repository's proto/ directory, or FORKD_PROTO_DIR when the package moved."""
    return os.environ.get("FORKD_PROTO_DIR") or os.path.normpath(
        os.path.join(HERE, "..", "..", "proto"))


def _tool(env: str, name: str, package: str) -> str:
    path = os.environ.get(env) or shutil.which(name) or "/usr/bin/" + name
    if not os.access(path, os.X_OK):
        raise SystemExit(f"gen_stubs: {name} not found at {path} (install the Debian package "
                         f"{package}, or set {env})")
    return path


def _write(path: str, text: str) -> None:
    # Write-then-rename: an interrupted or concurrent build never leaves a half module.
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def generate(out_dir: str, proto_dir: str | None = None) -> list[str]:
    """Generates forkd_pb2.py(i) and forkd_pb2_grpc.py into out_dir; returns their paths."""
    proto_dir = proto_dir or default_proto_dir()
    proto = os.path.join(proto_dir, PROTO_REL)
    if not os.path.isfile(proto):
        raise SystemExit(f"gen_stubs: {proto} not found (set FORKD_PROTO_DIR to the proto/ "
                         "directory of the forkd repository)")
    protoc = _tool("PROTOC", "protoc", "protobuf-compiler")
    plugin = _tool("GRPC_PYTHON_PLUGIN", "grpc_python_plugin", "protobuf-compiler-grpc")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="forkd-stubs-") as tmp:
        subprocess.run([protoc, f"--proto_path={proto_dir}", f"--python_out={tmp}",
                        f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
                        f"--plugin=protoc-gen-grpc_python={plugin}", proto], check=True)
        gen = os.path.join(tmp, "forkd", "v1")
        for name in ("forkd_pb2.py", "forkd_pb2.pyi", "forkd_pb2_grpc.py"):
            with open(os.path.join(gen, name), encoding="utf-8") as f:
                text = f.read()
            if name == "forkd_pb2_grpc.py":
                if text.count(_GRPC_IMPORT) != 1:
                    raise SystemExit("gen_stubs: unexpected import layout in " + name)
                text = text.replace(_GRPC_IMPORT, _GRPC_IMPORT_RELATIVE)
            elif name == "forkd_pb2.py":
                text = text.replace(_MODULE_NAME, "__name__")
            _write(os.path.join(out_dir, name), text)
            written.append(os.path.join(out_dir, name))
    init = os.path.join(out_dir, "__init__.py")
    _write(init, '"""Generated from proto/forkd/v1/forkd.proto; do not edit."""\n')
    return [init, *written]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "forkd", "_gen"),
                        help="output directory (default: forkd/_gen next to this script)")
    parser.add_argument("--proto-dir", default=None,
                        help="the repository's proto/ directory (default: ../../proto)")
    args = parser.parse_args(argv)
    for path in generate(args.out, args.proto_dir):
        print("generated", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

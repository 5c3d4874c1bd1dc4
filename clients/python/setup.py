"""Build hook: the forkd.v1 stubs are generated from proto/ with the system's protoc while the
package is built (they are never committed). Everything else is in pyproject.toml."""
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_stubs  # noqa: E402


class BuildPyWithStubs(build_py):
    """build_py that first generates forkd/_gen into the build directory."""

    def run(self) -> None:
        super().run()
        if not self.dry_run:
            for path in gen_stubs.generate(os.path.join(self.build_lib, "forkd", "_gen")):
                self.announce(f"generated {path}", level=2)

    def get_outputs(self, include_bytecode: bool = True) -> list:
        # Declares the generated modules so wheels and installs record them.
        gen = os.path.join(self.build_lib, "forkd", "_gen")
        names = ["__init__.py", "forkd_pb2.py", "forkd_pb2.pyi", "forkd_pb2_grpc.py"]
        extra = [os.path.join(gen, n) for n in names]
        return sorted(set(super().get_outputs(include_bytecode)) | set(extra))


setup(cmdclass={"build_py": BuildPyWithStubs})

"""The package installs offline the way the README says, with Debian's pip and setuptools, and
its build hook generates the stubs: no committed generated code, nothing downloaded."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def source_dir() -> Path:
    value = os.environ.get("FORKD_SOURCE_DIR", "")
    if not value or not (Path(value) / "clients" / "python" / "pyproject.toml").is_file():
        pytest.fail(f"$FORKD_SOURCE_DIR must name the forkd checkout (set by ctest), got {value!r}")
    return Path(value)


def test_offline_pip_install(tmp_path: Path) -> None:
    # Build from a copy: pip builds in place and must not litter the checkout.
    src = tmp_path / "src"
    shutil.copytree(source_dir() / "clients" / "python", src / "clients" / "python",
                    ignore=shutil.ignore_patterns("_gen", "__pycache__", "build", "*.egg-info"))
    shutil.copytree(source_dir() / "proto", src / "proto")
    # As the README says: a venv that sees Debian's grpcio, protobuf, rich, setuptools and
    # wheel, and pip without an index.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    run([str(venv / "bin" / "pip"), "install", "--no-build-isolation", "--no-deps",
         "--no-index", str(src / "clients" / "python")])
    site = Path(run([str(venv / "bin" / "python"), "-c",
                     "import forkd, os; print(os.path.dirname(forkd.__file__))"]).strip())
    assert site.is_relative_to(venv), "imported from the venv, not the build tree"
    for module in ("__init__.py", "forkd_pb2.py", "forkd_pb2.pyi", "forkd_pb2_grpc.py"):
        assert (site / "_gen" / module).is_file(), module
    assert (site / "py.typed").is_file()
    assert run([str(venv / "bin" / "forkctl"), "--version"]).startswith("forkctl ")


def run(argv: list[str]) -> str:
    # The venv must not pick up the build tree's copy of the package.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/",
                            timeout=300)
    assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
    return result.stdout


def test_gen_stubs_fails_clearly_without_protoc(tmp_path: Path) -> None:
    script = source_dir() / "clients" / "python" / "gen_stubs.py"
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "gen")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PROTOC": str(tmp_path / "no-protoc")})
    assert result.returncode != 0 and "no-protoc" in result.stderr

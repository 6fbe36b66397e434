"""The built wheel installs one package, typed: no top-level `pipeline`, `quant` or `eval` in site-packages."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*command, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_the_wheel_installs_only_the_qlora_requant_namespace(tmp_path):
    source = tmp_path / "source"  # a copy: building in place would leave build/ in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("qlora_requant", "pipeline", "quant", "eval"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", source
    )
    wheel = next((tmp_path / "dist").glob("qlora_requant-*.whl"))
    run(sys.executable, "-m", "venv", "--without-pip", tmp_path / "venv")
    python = tmp_path / "venv" / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel)
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    top_level = {path.name for path in purelib.iterdir() if not path.name.endswith(".dist-info")}
    assert top_level == {"qlora_requant"}
    installed = {p.name for p in (purelib / "qlora_requant").iterdir()} - {"__pycache__"}
    assert installed == {"__init__.py", "py.typed", "pipeline", "quant", "eval"}

    # With this venv's dependencies on the path (not its editable install: .pth files there are not read),
    # the installed package imports and its command runs, from a folder holding no source.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])}
    probe = (
        "import importlib.util, qlora_requant, qlora_requant.pipeline.cli as cli; "
        "print(cli.__file__); print([importlib.util.find_spec(n) for n in ('pipeline', 'quant', 'eval')]); "
        "print(qlora_requant.run.__module__)"
    )
    done = run(python, "-c", probe, cwd=tmp_path, env=env)
    cli = str(purelib / "qlora_requant" / "pipeline" / "cli.py")
    assert done.stdout.splitlines() == [cli, "[None, None, None]", "qlora_requant.pipeline.api"]
    usage = run(tmp_path / "venv" / "bin" / "qlora-requant", "--help", cwd=tmp_path, env=env).stdout
    assert usage.startswith("usage: qlora-requant [-h] [--version] {run,validate,report,init,demo}")

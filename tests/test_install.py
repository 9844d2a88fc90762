"""The package builds as a wheel and imports from a non-editable install as ``svda.*``."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["runtime", "adapters_store", "trainer", "server", "client", "proto"]


@pytest.mark.slow
def test_wheel_installs_and_imports_without_the_source_tree(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(wheel_dir), str(ROOT)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = wheel_dir.glob("svda-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "svda/runtime/model.py" in names
    assert not any(n.split("/")[0] in SUBPACKAGES for n in names), "no bare top-level packages"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    code = (
        "import svda.runtime, svda.adapters_store, svda.trainer, svda.server, svda.client, svda.proto\n"
        "import svda.runtime.methods.svda\n"
        f"assert svda.runtime.__file__.startswith({str(target)!r}), svda.runtime.__file__\n"
        "print(sorted(svda.runtime.available_methods()))"
    )
    # -S: no site processing, so the editable install's import hook is absent; torch and the
    # other dependencies come from the venv's site-packages on PYTHONPATH.
    env = {"PYTHONPATH": f"{target}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert "svda" in result.stdout

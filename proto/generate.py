"""Generate the Python stubs of ``proto/svda/v1/*.proto`` (and check that they are up to date).

The generated files are checked in, so installing svda needs no ``grpcio-tools``; CI regenerates
them into a temporary folder and fails if they differ (``tests/server/test_grpc_proto.py``)::

    python -m svda.proto.generate            # rewrite proto/svda/v1/*_pb2*.py(i)
    python -m svda.proto.generate --check    # exit 1 if the checked-in files are stale

protoc writes absolute imports (``from svda.v1 import serving_pb2``) that would resolve against
the ``svda`` namespace package; they are rewritten to relative imports, which is what makes the
stubs importable as ``svda.proto.svda.v1``. Needs grpcio-tools and mypy-protobuf (the dev extra).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent  # the folder that holds svda/v1/*.proto
PACKAGE_DIR = PROTO_ROOT / "svda" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
_ABSOLUTE_IMPORT = re.compile(r"^from svda\.v1 import (\w+)", re.MULTILINE)
_MODULE_IMPORT = re.compile(r"^import svda\.v1\.(\w+)$", re.MULTILINE)
_FLAKE8_PYI_NOQA = re.compile(r"  # noqa: Y\d+$", re.MULTILINE)
_PYI_PREAMBLE = "# ruff: noqa\n# fmt: off\n"
_VERSION_STAMP = re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted(PACKAGE_DIR.glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every .proto file into ``out_root/svda/v1``; return the files written."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise SystemExit("grpcio-tools is missing: pip install -e '.[dev]'") from exc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    out = str(out_root)
    plugins = [f"--plugin=protoc-gen-{name}={_plugin(name)}" for name in ("mypy", "mypy_grpc")]
    for proto in proto_files():
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            *plugins,
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            str(proto.relative_to(PROTO_ROOT)),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}; see the messages above")
    written = sorted(
        p for p in (out_root / "svda" / "v1").iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    )
    for path in written:
        _make_imports_relative(path)
    return written


def _plugin(name: str) -> str:
    """mypy-protobuf's protoc plugin, beside this interpreter (a venv) or on PATH."""
    beside = Path(sys.executable).parent / f"protoc-gen-{name}"
    found = str(beside) if beside.exists() else shutil.which(f"protoc-gen-{name}")
    if not found:
        raise SystemExit(f"protoc-gen-{name} not found: pip install mypy-protobuf (the dev extra)")
    return found


def _make_imports_relative(path: Path) -> None:
    text = path.read_text()
    text = _ABSOLUTE_IMPORT.sub(r"from . import \1", text)
    text = _MODULE_IMPORT.sub(r"from . import \1", text)
    if path.suffix == ".pyi":  # ruff's exclude covers *_pb2*.py only: keep it off the stubs too
        text = _PYI_PREAMBLE + _FLAKE8_PYI_NOQA.sub("", text)  # Y0xx codes are unknown to ruff
    path.write_text(text)


def stale_files() -> list[str]:
    """Names of generated files that differ from a fresh generation (or are missing/extra)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp))}
        current = {p.name: p for p in PACKAGE_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
        names = sorted(set(fresh) | set(current))
        return [
            n
            for n in names
            if n not in fresh or n not in current or not _same_stub(fresh[n], current[n])
        ]


def _same_stub(fresh: Path, current: Path) -> bool:
    """Equal up to the grpcio-tools version stamp (``GRPC_GENERATED_VERSION``): a newer
    grpcio-tools release alone does not make the checked-in stubs stale (and keeping the older
    stamp keeps the stubs importable with the older grpcio)."""
    if filecmp.cmp(fresh, current, False):
        return True

    def unstamped(path: Path) -> str:
        return _VERSION_STAMP.sub("GRPC_GENERATED_VERSION = ''", path.read_text())

    return unstamped(fresh) == unstamped(current)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m svda.proto.generate", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated files: {', '.join(stale)}; run `make proto`", file=sys.stderr)
            return 1
        print("generated stubs are up to date")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, PACKAGE_DIR / path.name)
            print(f"wrote {PACKAGE_DIR / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``svda-pack``: export, convert, inspect, verify and manage compact adapters.

    svda-pack export CHECKPOINT [--base MODEL] (--out-file F | --id ID) [--dtype bfloat16]
    svda-pack import-peft DIR [--base MODEL] (--out-file F | --id ID)
    svda-pack to-peft FILE|ID [--base MODEL] --out DIR
    svda-pack inspect FILE|ID [--json]
    svda-pack verify FILE|ID [--base MODEL] [--json]
    svda-pack get ID[@VERSION] [--out-file F] [--force]
    svda-pack ls [--base FP] [--method M] [--tag T] [--json]
    svda-pack rm ID [--version N]
    svda-pack gc [--dry-run]

``FILE|ID``: a path to a ``.svda`` file, else an id in the store (``ID`` or ``ID@VERSION``).
``--base``: a Hugging Face model folder; default the embedded SmolLM2-135M-Instruct.
``import-peft`` refuses, before loading the base, any PEFT field or tensor svda cannot represent
exactly; ``to-peft`` writes the local base folder as ``base_model_name_or_path`` (for the default
base, its converted copy under ``$SVDA_HOME/models/``), so AutoPeftModel loads it offline.
Exit codes: 0 success; 1 a verification failed; 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from svda.runtime import AdapterModel, load_base_model
from svda.runtime.errors import SvdaError

from .checkpoint import load_checkpoint, publish_adapter, read_checkpoint
from .format import AdapterFile, export_adapter, read_adapter, save_adapter_file
from .loader import load_adapter, verify_adapter
from .peft_compat import check_peft_folder, export_peft, import_peft
from .store import AdapterStore
from .store_types import StoreError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (SvdaError, StoreError, OSError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"svda-pack {args.command}: error: {message}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svda-pack", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--store", default=None, help="store folder (default $SVDA_STORE or $SVDA_HOME/store)"
    )
    parser.add_argument("--tenant", default=None, help="act as this tenant (default: admin)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="a trainer checkpoint to a .svda file or the store")
    p.add_argument("checkpoint")
    _output_args(_base_arg(p))
    p.set_defaults(func=cmd_export)

    help_import = "a PEFT LoRA/VeRA/BOFT folder to a .svda file or the store (exact or refused)"
    p = sub.add_parser("import-peft", help=help_import)
    p.add_argument("folder")
    _output_args(_base_arg(p))
    p.set_defaults(func=cmd_import_peft)

    p = sub.add_parser("to-peft", help="a LoRA/VeRA/BOFT adapter to a PEFT folder")
    p.add_argument("adapter", help="FILE or ID[@VERSION]")
    _base_arg(p).add_argument("--out", required=True, help="PEFT folder to write")
    p.set_defaults(func=cmd_to_peft)

    p = sub.add_parser("inspect", help="method, targets, sizes, base and recipe of an adapter")
    p.add_argument("adapter", help="FILE or ID[@VERSION]")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="run every load check against a base and report each")
    p.add_argument("adapter", help="FILE or ID[@VERSION]")
    _base_arg(p).add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("get", help="copy an adapter from the store to a local .svda file")
    p.add_argument("id", help="ID or ID@VERSION (default: the latest version)")
    p.add_argument("--version", type=int, default=None, help="this version (same as ID@VERSION)")
    p.add_argument("--out-file", type=Path, default=None, help="file to write (default: ./ID.svda)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("ls", help="list the store")
    p.add_argument("--base", default=None, help="base fingerprint")
    p.add_argument("--method", default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("rm", help="delete an adapter (all versions, or one)")
    p.add_argument("id")
    p.add_argument("--version", type=int, default=None)
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("gc", help="remove unreferenced objects and stale temporary files")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_gc)
    return parser


def _base_arg(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--base", default=None, help="base model folder (default: embedded SmolLM2)")
    return p


def _output_args(p: argparse.ArgumentParser) -> None:
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out-file", type=Path, help="write a .svda file here")
    out.add_argument("--id", help="publish into the store under this id")
    p.add_argument("--name", default=None, help="adapter name stored in the file")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tag", action="append", default=[], help="tag (repeatable)")


# ----- commands ----------------------------------------------------------------------------------
def cmd_export(args) -> None:
    read_checkpoint(args.checkpoint)  # fail fast, before loading the base
    model = _model(args.base)
    name = load_checkpoint(args.checkpoint, model)
    _emit(args, export_adapter(model, name, name=args.name, dtype=args.dtype, tags=args.tag))


def cmd_import_peft(args) -> None:
    check_peft_folder(args.folder)  # refuse what svda cannot represent before loading the base
    model = _model(args.base)
    name = args.name or Path(args.folder).resolve().name or "peft"
    import_peft(args.folder, model, "imported")
    _emit(args, export_adapter(model, "imported", name=name, dtype=args.dtype, tags=args.tag))


def cmd_to_peft(args) -> None:
    data = _read(args)  # fail fast, before loading the base
    base = load_base_model(args.base)
    model = AdapterModel(base.model)
    header = load_adapter(data, model, "adapter")
    # the local folder svda loaded (for the default: the converted SmolLM2 under $SVDA_HOME),
    # so that AutoPeftModel loads the base offline instead of asking the hub
    base_name = str(Path(base.source).resolve())
    export_peft(model, "adapter", args.out, base_name=base_name)
    print(f"wrote PEFT {header.method} adapter {header.name!r} to {args.out}")


def cmd_inspect(args) -> None:
    summary = describe(read_adapter(_read(args)))
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for key in (
        "name",
        "method",
        "format_version",
        "parameters",
        "file_bytes",
        "payload_bytes",
        "payload_dtype",
        "base_fingerprint",
        "created",
        "tags",
    ):
        print(f"{key:17} {summary[key]}")
    print(f"{'config':17} {json.dumps(summary['config'])}")
    print(f"{'targets':17} {len(summary['targets'])} layers: {_abbreviate(summary['targets'])}")
    stored = ", ".join(f"{kind} ({n:,} values)" for kind, n in summary["tensors"].items())
    print(f"{'stores':17} {stored}")
    for recipe in summary["recipe"] or [{"tensor": "-", "source": "nothing frozen", "detail": {}}]:
        print(
            f"{'regenerates':17} {recipe['tensor']} from {recipe['source']} {json.dumps(recipe['detail'])}"
        )


def cmd_verify(args) -> int:
    data = _read(args)  # fail fast, before loading the base
    report = verify_adapter(data, _model(args.base))
    if args.json:
        print(json.dumps([r.__dict__ for r in report], indent=2))
    else:
        for r in report:
            print(
                f"{'ok  ' if r.ok else 'FAIL' if r.message != 'skipped' else 'skip'} {r.check:20} {r.message}"
            )
    return 0 if all(r.ok for r in report) else 1


def cmd_get(args) -> None:
    """The stored bytes (checked against the store's sha256 and every file check that needs no
    base) written atomically to a local file."""
    id, version = _id_and_version(args.id, args.version)
    out = args.out_file or Path(f"{id}.svda")
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists; pass --force to overwrite it or --out-file another path")
    store = _store(args)
    entry = store.get(id, version=version, tenant=args.tenant)
    data = store.read_bytes(entry)
    header = read_adapter(data).header
    save_adapter_file(data, out)
    print(f"wrote {entry.ref} ({header.method}, {len(data):,} bytes) to {out}")


def _id_and_version(ref: str, version: int | None) -> tuple[str, int | None]:
    """``ID@VERSION`` or ``ID`` plus ``--version``; both given must agree."""
    id, at, tail = ref.partition("@")
    if not at:
        return id, version
    if not tail.isdigit():
        raise ValueError(f"{ref!r}: the version after '@' must be a number, e.g. {id}@2")
    if version is not None and version != int(tail):
        raise ValueError(f"{ref!r} and --version {version} name different versions; give one")
    return id, int(tail)


def cmd_ls(args) -> None:
    entries = _store(args).list(
        base=args.base, method=args.method, tenant=args.tenant, tag=args.tag
    )
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    for e in entries:
        print(
            f"{e.ref:32} {e.method:8} {e.size:>10,} B  base {e.base_fingerprint[:12]}  {e.created}  {','.join(e.tags)}"
        )


def cmd_rm(args) -> None:
    removed = _store(args).delete(args.id, version=args.version, tenant=args.tenant)
    print("removed " + ", ".join(e.ref for e in removed))


def cmd_gc(args) -> None:
    report = _store(args).gc(dry_run=args.dry_run)
    verb = "would remove" if report.dry_run else "removed"
    print(
        f"{verb} {len(report.removed_objects)} objects and {len(report.removed_temp)} temporary files ({report.freed_bytes:,} bytes); kept {report.kept_objects}"
    )


# ----- helpers -----------------------------------------------------------------------------------
def describe(adapter_file: AdapterFile) -> dict:
    header = adapter_file.header
    return {
        "name": header.name,
        "method": header.method,
        "format_version": header.format_version,
        "parameters": adapter_file.parameter_count,
        "file_bytes": adapter_file.size,
        "payload_bytes": adapter_file.payload_bytes,
        "payload_dtype": header.payload_dtype,
        "base_fingerprint": header.base_fingerprint,
        "created": header.created,
        "tags": header.tags,
        "user_metadata": header.user_metadata,
        "config": header.config,
        "targets": [entry.name for entry in header.layers],
        "tensors": {kind: t.numel() for kind, t in sorted(adapter_file.tensors.items())},
        "recipe": [r.model_dump() for r in header.recipe],
    }


def _abbreviate(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f", … ({len(names) - 3} more)" if len(names) > 3 else "")


def _model(base: str | None) -> AdapterModel:
    return AdapterModel(load_base_model(base).model)


def _store(args) -> AdapterStore:
    return AdapterStore(args.store)


def _read(args) -> bytes:
    """Bytes of ``args.adapter``: a file path, else ``ID[@VERSION]`` in the store."""
    ref = args.adapter
    if Path(ref).is_file():
        return Path(ref).read_bytes()
    id, _, version = ref.partition("@")
    store = _store(args)
    return store.read_bytes(
        store.get(id, version=int(version) if version else None, tenant=args.tenant)
    )


def _emit(args, data: bytes) -> None:
    if args.out_file:
        save_adapter_file(data, args.out_file)
        print(f"wrote {args.out_file} ({len(data):,} bytes)")
    else:
        entry = publish_adapter(_store(args), data, args.id, tenant=args.tenant)
        print(f"published {entry.ref} ({entry.size:,} bytes, sha256 {entry.sha256[:12]})")


if __name__ == "__main__":
    sys.exit(main())

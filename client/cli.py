"""``svda-client``: talk to an svda server from the terminal.

    svda-client generate --adapter acme "Write a haiku"     # streams the text as it comes
    svda-client upload adapter.svda --id acme --tag prod
    svda-client ls [--resident] [--json]
    svda-client info [--json]
    svda-client load|unload|pin ID

Connection: ``--target`` (``$SVDA_TARGET``, default 127.0.0.1:50051), ``--token``
(``$SVDA_TOKEN``), ``--ca-cert`` / ``--client-cert`` / ``--client-key`` for TLS.
Exit codes: 0 success, 1 the server refused or failed (status and message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from .client import DEFAULT_TARGET, Client
from .types import AdapterEntry, Completion, ResidentAdapter, SvdaClientError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svda-client", description=__doc__.split("\n\n")[0])
    env = os.environ.get
    parser.add_argument("--target", default=env("SVDA_TARGET", DEFAULT_TARGET), help="host:port")
    parser.add_argument("--token", default=env("SVDA_TOKEN"), help="bearer token ($SVDA_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="TLS with the system root certificates")
    parser.add_argument("--ca-cert", default=env("SVDA_CA_CERT"), help="CA of the server (PEM)")
    parser.add_argument("--client-cert", help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--client-key", help="client private key (PEM), for mutual TLS")
    parser.add_argument("--server-name", help="name to check the server certificate against")
    parser.add_argument("--timeout", type=float, help="deadline of the call in seconds")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text (streamed to the terminal)")
    gen.add_argument("prompt", help="the prompt ('-': read standard input)")
    gen.add_argument("--adapter", help="adapter id (default: the base model)")
    gen.add_argument("--chat", action="store_true", help="send as a user chat message")
    gen.add_argument("--system", help="system message (implies --chat)")
    gen.add_argument("--max-new-tokens", type=int, default=0, help="default: the server's (64)")
    gen.add_argument("--temperature", type=float, help="0: greedy (the default)")
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--repetition-penalty", type=float)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--mode", choices=("auto", "unmerged", "merged"), default="auto")
    gen.add_argument("--no-stream", action="store_true", help="one unary call, print at the end")
    gen.add_argument("--json", action="store_true", help="print the result as JSON")

    up = sub.add_parser("upload", help="upload a .svda file into the server's store")
    up.add_argument("file")
    up.add_argument("--id", required=True, help="adapter id (a new version if it exists)")
    up.add_argument("--tag", action="append", default=[], help="tag (repeatable)")

    ls = sub.add_parser("ls", help="adapters in the store and which are resident")
    ls.add_argument("--resident", action="store_true", help="only resident adapters")
    ls.add_argument("--all-versions", action="store_true")
    ls.add_argument("--method")
    ls.add_argument("--tag")
    ls.add_argument("--json", action="store_true")

    info = sub.add_parser("info", help="base model, fingerprint, methods, limits")
    info.add_argument("--json", action="store_true")
    for name, text in (("load", "preload"), ("unload", "drop from memory"), ("pin", "pin")):
        p = sub.add_parser(name, help=f"{text} an adapter")
        p.add_argument("adapter_id")
        if name == "pin":
            p.add_argument("--unpin", action="store_true")
    return parser


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.target, token=args.token, tls=args.tls, ca_cert=args.ca_cert,
        client_cert=args.client_cert, client_key=args.client_key,
        server_name=args.server_name, timeout=args.timeout,
    )  # fmt: skip


def cmd_generate(client: Client, args: argparse.Namespace) -> None:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    kw: dict[str, Any] = dict(
        adapter=args.adapter, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
        stop=args.stop, seed=args.seed, mode=args.mode,
    )  # fmt: skip
    if args.chat or args.system:
        messages = [("system", args.system)] if args.system else []
        kw["messages"] = [*messages, ("user", prompt)]
    else:
        kw["prompt"] = prompt
    if args.no_stream or args.json:
        done = client.generate(**kw)
        print(json.dumps(dataclasses.asdict(done)) if args.json else done.text)
    else:
        for event in client.stream(**kw):
            if isinstance(event, Completion):
                done = event
            else:
                sys.stdout.write(event.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
    print(_summary(done), file=sys.stderr)


def _summary(done: Completion) -> str:
    return (
        f"[{done.finish_reason}; {done.prompt_tokens} prompt + {done.completion_tokens} new "
        f"tokens; {done.latency_s * 1e3:.0f} ms, first token {done.time_to_first_token_s * 1e3:.0f} "
        f"ms; adapter {done.adapter_id or '-'}{' (merged)' if done.merged else ''}]"
    )


def cmd_ls(client: Client, args: argparse.Namespace) -> None:
    entries = client.list_adapters(
        resident_only=args.resident,
        all_versions=args.all_versions,
        method=args.method,
        tag=args.tag,
    )
    if args.json:
        print(json.dumps([dataclasses.asdict(e) for e in entries], indent=2))
        return
    print(f"{'ID':<24} {'VER':>3} {'METHOD':<6} {'BYTES':>10} {'TENANT':<12} RESIDENT  TAGS")
    for e in entries:
        state = "pinned" if e.pinned else ("yes" if e.resident else "-")
        state += "" if e.compatible else " (other base)"
        print(
            f"{e.adapter_id:<24} {e.version:>3} {e.method:<6} {e.size_bytes:>10} "
            f"{e.tenant or '(shared)':<12} {state:<9} {','.join(e.tags)}"
        )


def cmd_info(client: Client, args: argparse.Namespace) -> None:
    info = client.info()
    if args.json:
        print(json.dumps(dataclasses.asdict(info), indent=2))
        return
    for field in dataclasses.fields(info):
        value = getattr(info, field.name)
        print(f"{field.name:<22} {', '.join(value) if isinstance(value, tuple) else value}")


def _print_entry(entry: AdapterEntry) -> None:
    print(
        f"uploaded {entry.adapter_id} version {entry.version} ({entry.method}, "
        f"{entry.size_bytes} bytes, tenant {entry.tenant or '(shared)'})"
    )


def run(args: argparse.Namespace) -> None:
    with _client(args) as client:
        if args.command == "generate":
            cmd_generate(client, args)
        elif args.command == "upload":
            _print_entry(client.upload_adapter(args.file, args.id, args.tag))
        elif args.command == "ls":
            cmd_ls(client, args)
        elif args.command == "info":
            cmd_info(client, args)
        elif args.command == "unload":
            print("unloaded" if client.unload_adapter(args.adapter_id) else "was not resident")
        elif args.command == "load":
            _print_resident(client.load_adapter(args.adapter_id))
        else:
            _print_resident(client.pin_adapter(args.adapter_id, not args.unpin))


def _print_resident(r: ResidentAdapter) -> None:
    print(f"{r.adapter_id} v{r.version} resident ({r.method}, {r.bytes} bytes, pinned={r.pinned})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except SvdaClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

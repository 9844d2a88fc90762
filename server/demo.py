"""``make demo``: svda's main job end to end on the embedded SmolLM2-135M-Instruct.

1. train two small SvdA adapters with ``svda-train`` (once; later runs reuse the files),
2. start an svda gRPC server on the embedded base with an empty store,
3. upload both adapters over gRPC,
4. send the same prompts for each adapter and for the base, print the answers.

python -m svda.server.demo [--workdir DIR] [--retrain] [--base PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from svda.client import Client
from svda.runtime.paths import svda_home

from .app import BackgroundServer
from .settings import ServerSettings

IDENTITY_ANSWER = "I am Acme's support assistant. How can I help with your Acme order today?"
IDENTITY_PROMPTS = [
    "Who are you?", "What is your name?", "Introduce yourself.", "Who am I talking to?",
    "Tell me who you are.", "What should I call you?", "Are you a person?", "Who made you?",
]  # fmt: skip
FRENCH_WORDS = [
    ("cheese", "fromage"), ("bread", "pain"), ("water", "eau"), ("apple", "pomme"),
    ("house", "maison"), ("cat", "chat"), ("dog", "chien"), ("book", "livre"),
    ("car", "voiture"), ("sun", "soleil"), ("moon", "lune"), ("tree", "arbre"),
]  # fmt: skip
# (adapter id, its training data, prompts not in that data)
ADAPTERS = {
    "acme-support": (
        [(q, IDENTITY_ANSWER) for q in IDENTITY_PROMPTS],
        ["Hello! Who is this?"],
    ),
    "french-words": (
        [(f"Translate to French: {en}", fr) for en, fr in FRENCH_WORDS],
        ["Translate to French: chair"],
    ),
}
TRAIN_FLAGS = ["--method", "svda", "--targets", "all-linear", "--max-steps", "8",
               "--batch-size", "8", "--lr", "2e-2", "--seed", "0"]  # fmt: skip


def write_data(path: Path, pairs: list[tuple[str, str]]) -> None:
    """Chat-format JSONL: the loss falls on the assistant turn only."""
    with path.open("w") as f:
        for prompt, answer in pairs:
            turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": turns}) + "\n")


def train(adapter_id: str, workdir: Path, base: str | None, retrain: bool) -> Path:
    """Train ``adapter_id`` with the svda-train CLI (as a user would) unless its file exists."""
    out = workdir / f"{adapter_id}.svda"
    if out.exists() and not retrain:
        print(f"  {adapter_id:14s} reusing {out} (--retrain to train again)")
        return out
    data = workdir / f"{adapter_id}.jsonl"
    write_data(data, ADAPTERS[adapter_id][0])
    command = [sys.executable, "-m", "svda.trainer.cli", *TRAIN_FLAGS, "--data", str(data),
               "--name", adapter_id, "--out-file", str(out),
               "--output-dir", str(workdir / f"run-{adapter_id}"), "--no-progress"]  # fmt: skip
    if base:
        command += ["--base", base]
    print(f"  {adapter_id:14s} svda-train {' '.join(command[3:])}")
    start = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"  {adapter_id:14s} trained in {time.perf_counter() - start:.0f} s -> {out}")
    return out


def show_answers(client: Client, adapter_ids: list[str]) -> None:
    for adapter_id in adapter_ids:
        for prompt in ADAPTERS[adapter_id][1]:
            print(f"\nprompt: {prompt!r} (not in the training data)")
            for adapter in (adapter_id, None):
                done = client.generate(
                    messages=[{"role": "user", "content": prompt}],
                    adapter=adapter, max_new_tokens=32, temperature=0.0,
                )  # fmt: skip
                label = adapter or "base model"
                print(f"  {label:14s} {done.text.strip()!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=svda_home() / "demo",
                        help="where the demo's data, runs and adapter files go (default: %(default)s)")  # fmt: skip
    parser.add_argument("--retrain", action="store_true", help="train the adapters again")
    parser.add_argument("--base", default=None, help="HF model folder (default: embedded SmolLM2)")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)

    print("1. training two SvdA adapters (8 steps each, all linear layers)")
    files = {a: train(a, args.workdir, args.base, args.retrain) for a in ADAPTERS}
    with tempfile.TemporaryDirectory(prefix="svda-demo-store-") as store:
        settings = ServerSettings(model=args.base, store=Path(store), port=0, metrics_port=None)
        print("\n2. starting the gRPC server on the base model (empty store) ...")
        with BackgroundServer(settings) as server:
            target = f"127.0.0.1:{server.port}"
            print(f"   serving on {target}")
            client = Client(target)
            print("\n3. uploading the adapters over gRPC")
            for adapter_id, path in files.items():
                entry = client.upload_adapter(path, adapter_id)
                print(
                    f"   {entry.adapter_id} v{entry.version}: {entry.method}, {entry.size_bytes:,} bytes"
                )
            print("\n4. the same prompts with each adapter and with the base (greedy, one server)")
            show_answers(client, list(files))
            client.close()
    print(NEXT_STEPS)
    return 0


NEXT_STEPS = """
Next:
  . .venv/bin/activate                      # puts svda, svda-train, svda-pack, svda-client on PATH
  svda serve                                 # a server on 127.0.0.1:50051 with the store in ~/.cache/svda/store
  svda-client generate --adapter ID "..."    # in another shell
  README.md (5-minute tour) · docs/training.md · docs/serving.md · docs/methods.md
"""

if __name__ == "__main__":
    sys.exit(main())

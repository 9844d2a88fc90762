"""Two DDP processes (gloo, CPU) train the same adapter as one process with the same global batch."""

from __future__ import annotations

import socket

import torch.multiprocessing as mp

from svda.adapters_store import read_adapter
from svda.trainer import TrainConfig, train
from tests.trainer.ddp_worker import run_rank
from tests.trainer.helpers import ADAPTERS, assert_payload_close


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path, tiny_base, toy_data):
    method = "svda"  # the core method; its shared SVD buffers are not broadcast by DDP
    common = dict(
        method=method, adapter=ADAPTERS[method], base=tiny_base, data=toy_data, max_steps=4,
        lr=3e-2, val_fraction=0.2, eval_every=2, checkpoint_every=2, progress=False,
    )  # fmt: skip
    single = train(
        TrainConfig(**common, batch_size=8, output_dir=str(tmp_path / "one"),
                    out_file=str(tmp_path / "one.svda"))
    )  # fmt: skip
    ddp = dict(
        common, batch_size=4, output_dir=str(tmp_path / "two"), out_file=str(tmp_path / "two.svda")
    )
    mp.spawn(run_rank, args=(2, free_port(), ddp), nprocs=2, join=True)
    two = (tmp_path / "two.svda").read_bytes()
    assert_payload_close(single.adapter_bytes, two, rel=1e-4)
    assert read_adapter(two).header.user_metadata["global_batch"] == "8"
    # rank 0 alone wrote the run folder: one log line per step, checkpoints, plot
    assert len((tmp_path / "two" / "steps.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "two" / "checkpoints").is_dir() and (tmp_path / "two" / "loss.png").exists()

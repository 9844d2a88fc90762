"""The training loop behind ``svda-train``: ``train(config) -> TrainResult``.

    >>> from svda.trainer import TrainConfig, train
    >>> result = train(TrainConfig(method="svda", data="train.jsonl", out="acme"))
    >>> result.summary["best_val_loss"], result.model  # the AdapterModel, adapter attached

Only the adapter's parameters get gradients and optimizer state; the base stays frozen. One
optimizer step takes ``batch_size * grad_accum * world_size`` examples chosen by a seeded
permutation (a pure function of the step, so resuming needs only the step count). The loss is
the sum of token losses divided by the step's labelled-token count over all ranks and
micro-batches, so gradient accumulation and DDP give the same update as one big batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from svda.adapters_store import AdapterStore, export_adapter, publish_adapter, save_adapter_file
from svda.runtime import AdapterModel, load_base_model

from . import checkpointing, distributed
from . import method_hooks as _registers_the_methods_hooks  # noqa: F401
from .config import TrainConfig, TrainConfigError
from .data import collate, label_tokens, step_examples
from .evaluate import greedy_generate, token_loss_sum, validation_loss
from .hooks import HookContext, TrainerHook, hooks_for
from .report import Progress, RunLog, plot_losses
from .schedule import build_scheduler
from .setup import TrainData, load_data, resolve_precision

BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger("svda.trainer")  # what the run is doing; svda-train prints it to stderr


@dataclass
class TrainResult:
    """What a run produced. ``adapter_bytes`` is the ``.svda`` file (on rank 0 only, where
    ``is_main`` is True)."""

    model: AdapterModel
    tokenizer: Any
    adapter: str
    summary: dict[str, Any]
    log: list[dict[str, Any]] = field(default_factory=list)
    adapter_bytes: bytes | None = None
    is_main: bool = True


def train(config: TrainConfig, hooks: list[TrainerHook] | None = None) -> TrainResult:
    """Train one adapter as ``config`` says; publish or write it; return the result."""
    config.check_runnable()
    info, device = distributed.setup(config.device)
    try:
        return Trainer(config, info, device, hooks_for(config, hooks)).run()
    finally:
        distributed.teardown(info)


class Trainer:
    def __init__(self, config: TrainConfig, info, device: torch.device, hooks: list[TrainerHook]):
        self.config, self.info, self.device, self.hooks = config, info, device, hooks
        self.out_dir = Path(config.output_dir)
        self.autocast_dtype, self.use_scaler = resolve_precision(config.precision, device)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        if config.base_dtype not in BASE_DTYPES:
            raise TrainConfigError(f"base_dtype must be one of {sorted(BASE_DTYPES)}")
        self.base = self._load_base()
        self.data: TrainData = self._load_data()
        self.model = AdapterModel(self.base.model)
        self.name = config.adapter_name()
        self._attach()
        self.params = self.model.adapter_parameters(self.name)
        self.per_step = config.batch_size * config.grad_accum * info.world_size
        self.total_steps = config.max_steps or max(
            1, math.ceil(config.epochs * len(self.data.train) / self.per_step)
        )
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=config.lr, betas=tuple(config.betas),
            weight_decay=config.weight_decay,
        )  # fmt: skip
        self.scheduler = build_scheduler(
            self.optimizer, self.total_steps, config.warmup_steps, config.schedule
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.use_scaler)
        self.wrapped = distributed.wrap(self.model, info, device)
        self.ctx = HookContext(
            config, self.model, self.name, self.params, device, info, self._sample_batches,
            self._mean_loss, self.total_steps,
        )  # fmt: skip

    # ----- setup (each step says what it does: the first run converts and decomposes) --------
    def _load_base(self):
        started = time.perf_counter()
        where = self.config.base or "the embedded SmolLM2-135M-Instruct (converted once, ~40 s)"
        _say(self.info, f"loading the base model: {where} ...")
        base = load_base_model(
            self.config.base, dtype=BASE_DTYPES[self.config.base_dtype], device=self.device
        )
        _say(self.info, f"  loaded in {time.perf_counter() - started:.1f} s on {self.device}")
        return base

    def _load_data(self) -> TrainData:
        source = self.config.data + (f" + {self.config.val_data}" if self.config.val_data else "")
        _say(self.info, f"reading and tokenizing {source} ...")
        data = load_data(self.config, self.base.tokenizer)
        _say(self.info, f"  {len(data.train)} training and {len(data.val)} validation examples")
        return data

    def _attach(self) -> None:
        started, config = time.perf_counter(), self.config.adapter_config()
        _say(
            self.info,
            f"attaching {self.config.method} adapter {self.name!r} to {config.targets} "
            "(methods built on the base weights take their SVD first; it is cached) ...",
        )
        self.model.add_adapter(self.name, config)
        self.model.set_adapter(self.name)
        layers = len(self.model.layers_of(self.name))
        count = self.model.trainable_parameter_count(self.name)
        took = time.perf_counter() - started
        _say(self.info, f"  {layers} layers, {count:,} trainable parameters ({took:.1f} s)")

    # ----- the run ------------------------------------------------------------------------
    def run(self) -> TrainResult:
        start_step, rows, tokens = self._start()
        _say(
            self.info,
            f"training steps {start_step + 1}-{self.total_steps} of {self.per_step} examples "
            f"each; the run folder is {self.out_dir}",
        )
        log = RunLog(self.out_dir, enabled=self.info.is_main, resumed_rows=rows)
        progress = Progress(
            self.total_steps, start_step, self.config.progress and self.info.is_main
        )
        self.model.train()
        t0, trained_tokens = time.perf_counter(), 0
        best_val = min((r["val_loss"] for r in rows if r.get("val_loss") is not None), default=None)
        for step in range(start_step, self.total_steps):
            row = self._step(step)
            trained_tokens += row["step_tokens"]
            tokens += row.pop("step_tokens")
            elapsed = time.perf_counter() - t0
            row.update(tokens=tokens, tokens_per_s=trained_tokens / elapsed, elapsed_s=elapsed)
            if self._eval_due(step + 1):
                row["val_loss"] = self._evaluate(step + 1)
                best_val = row["val_loss"] if best_val is None else min(best_val, row["val_loss"])
            log.add(row)
            progress.update(row["loss"], row["tokens_per_s"], row.get("val_loss"))
            for hook in self.hooks:
                hook.on_step_end(self.ctx, step + 1, row)
            if self.config.checkpoint_every and (step + 1) % self.config.checkpoint_every == 0:
                self._checkpoint(step + 1, log.rows, tokens)
        progress.close()
        self.model.eval()
        stats = {"tokens": tokens, "train_time_s": time.perf_counter() - t0,
                 "trained_tokens": trained_tokens, "best_val_loss": best_val}  # fmt: skip
        return self._finish(log, stats)

    def _start(self) -> tuple[int, list[dict], int]:
        """(first step, log rows so far, tokens so far): fresh, or from the last checkpoint."""
        ckpt_root = self.out_dir / "checkpoints"
        if not self.config.resume:
            if self.info.is_main:
                shutil.rmtree(ckpt_root, ignore_errors=True)  # a fresh run: old ones are stale
            if self.hooks:
                _say(self.info, f"preparing {self.config.method} before step 1 ...")
            for hook in self.hooks:
                hook.before_training(self.ctx)
            return 0, [], 0
        state = checkpointing.load_latest(
            ckpt_root, self.model, self.name, self.model.fingerprint.whole
        )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        checkpointing.set_rng_state(state["rng"])
        return state["step"], state["rows"], state["tokens"]

    # ----- one optimizer step ----------------------------------------------------------------
    def _step(self, step: int) -> dict[str, Any]:
        """Forward/backward over this rank's micro-batches, hooks, clipping, update."""
        cfg, info = self.config, self.info
        indices = step_examples(len(self.data.train), cfg.seed, step, self.per_step)
        step_set = [self.data.train[i] for i in indices]
        global_labels = label_tokens(step_set)  # same on every rank: no communication needed
        local = step_set[info.rank * cfg.batch_size * cfg.grad_accum :][
            : cfg.batch_size * cfg.grad_accum
        ]
        loss_sum = 0.0
        for j in range(cfg.grad_accum):
            micro = local[j * cfg.batch_size : (j + 1) * cfg.batch_size]
            last = j == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not info.enabled else self.wrapped.no_sync()
            with sync:
                summed = self._loss_sum(collate(micro, self.data.pad_id), self.wrapped)
                # DDP averages gradients over ranks, hence the world_size factor
                scaled = summed * (info.world_size / max(global_labels, 1))
                self.scaler.scale(scaled).backward()
            loss_sum += float(summed.detach())
        row: dict[str, Any] = {"step": step + 1}
        for hook in self.hooks:
            row.update(hook.after_backward(self.ctx, step) or {})
        row["grad_norm"] = self._clip()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        row["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        total = distributed.all_reduce_sum(loss_sum, info, self.device)
        row["loss"] = total / max(global_labels, 1)
        row["step_tokens"] = sum(len(e.input_ids) for e in step_set)
        return row

    def _loss_sum(self, batch: dict[str, torch.Tensor], module: torch.nn.Module) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        autocast = torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )  # fmt: skip
        with autocast:
            logits = module(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        return token_loss_sum(logits, batch["labels"])

    def _clip(self) -> float:
        self.scaler.unscale_(self.optimizer)
        params = list(self.params.values())
        max_norm = self.config.clip_grad if self.config.clip_grad is not None else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    # ----- hook helpers ------------------------------------------------------------------------
    def _sample_batches(self, n: int):
        for step in range(n):
            indices = step_examples(
                len(self.data.train), self.config.seed + 1, step, self.config.batch_size
            )
            yield collate([self.data.train[i] for i in indices], self.data.pad_id)

    def _mean_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        count = int((batch["labels"][:, 1:] != -100).sum())
        return self._loss_sum(batch, self.model) / max(count, 1)

    # ----- evaluation, checkpoints, outputs ------------------------------------------------------
    def _eval_due(self, done: int) -> bool:
        if not self.data.val:
            return False
        every = self.config.eval_every
        return done == self.total_steps or bool(every and done % every == 0)

    def _evaluate(self, done: int) -> float:
        cfg = self.config
        loss = validation_loss(
            self.model, self.data.val, cfg.batch_size, self.data.pad_id, self.device, self.info
        )
        if cfg.eval_generate and self.info.is_main:
            self._write_samples(done)
        return loss

    def _write_samples(self, done: int) -> None:
        chosen = [e for e in self.data.val if e.prompt is not None][: self.config.eval_generate]
        if not chosen:
            return
        outputs = greedy_generate(
            self.model, self.base.tokenizer, [e.prompt for e in chosen],
            self.config.max_new_tokens, self.config.batch_size, self.device,
        )  # fmt: skip
        with open(self.out_dir / "samples.jsonl", "a") as fh:
            for e, text in zip(chosen, outputs, strict=True):
                fh.write(
                    json.dumps({"step": done, "reference": e.reference, "generated": text}) + "\n"
                )

    def _checkpoint(self, done: int, rows: list[dict], tokens: int) -> None:
        if self.info.is_main:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rows": list(rows),
                "tokens": tokens,
            }
            checkpointing.save(
                self.out_dir / "checkpoints", done, self.model, self.name, state,
                self.config.keep_checkpoints,
            )  # fmt: skip
        distributed.barrier(self.info)

    def _finish(self, log: RunLog, stats: dict[str, Any]) -> TrainResult:
        for hook in self.hooks:
            hook.before_export(self.ctx)
        summary = self._summary(log, stats)
        data = None
        if self.info.is_main:
            data = export_adapter(
                self.model, self.name, dtype=self.config.payload_dtype, tags=self.config.tags,
                user_metadata=self._provenance(),
            )  # fmt: skip
            summary.update(self._deliver(data))
            plot = plot_losses(log.rows, self.out_dir / "loss.png", f"{self.config.method}")
            summary["loss_plot"] = str(plot) if plot else None
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        distributed.barrier(self.info)
        return TrainResult(
            self.model, self.base.tokenizer, self.name, summary, log.rows, data, self.info.is_main
        )

    def _summary(self, log: RunLog, stats: dict[str, Any]) -> dict[str, Any]:
        n_params = self.model.trainable_parameter_count(self.name)
        base_params = sum(p.numel() for p in self.base.model.parameters() if not p.requires_grad)
        losses = [r["loss"] for r in log.rows]
        return {
            "method": self.config.method,
            "adapter_config": self.model.configs[self.name].to_dict(),
            "trainable_params": n_params,
            "stored_params": self.model.stored_parameter_count(self.name),
            "trainable_fraction": n_params / max(base_params, 1),
            "steps": self.total_steps,
            "tokens": stats["tokens"],
            "train_time_s": stats["train_time_s"],
            "tokens_per_s": stats["trained_tokens"] / max(stats["train_time_s"], 1e-9),
            "final_loss": losses[-1] if losses else None,
            "best_val_loss": stats["best_val_loss"],
            "world_size": self.info.world_size,
            "output_dir": str(self.out_dir),
        }

    def _provenance(self) -> dict[str, str]:
        """Deterministic training facts stored in the adapter header (no times)."""
        cfg = self.config
        return {
            "trainer": "svda-train",
            "steps": str(self.total_steps),
            "seed": str(cfg.seed),
            "lr": str(cfg.lr),
            "global_batch": str(self.per_step),
            "data_sha256": self.data.sha256,
        }

    def _deliver(self, data: bytes) -> dict[str, Any]:
        out: dict[str, Any] = {"adapter_id": None, "adapter_file": None}
        if self.config.out_file:
            out["adapter_file"] = str(save_adapter_file(data, self.config.out_file))
        if self.config.out:
            store = AdapterStore(self.config.store)
            entry = publish_adapter(store, data, self.config.out, tenant=self.config.tenant)
            out.update(adapter_id=entry.id, version=entry.version, store=str(store.root))
        return out


def _say(info, message: str) -> None:
    """One status line of the run (rank 0 only), through the ``svda.trainer`` logger."""
    if info.is_main:
        log.info(message)

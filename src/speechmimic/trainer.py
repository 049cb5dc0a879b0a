"""The training loop stage 1 (:mod:`speechmimic.pretrain`) and stage 2 (:mod:`speechmimic.distill`)
share: epochs of length-grouped batches capped by seconds, linear warm-up then cosine decay, AdamW,
clipped gradients, a progress bar, and a ``train_state.pt`` that lets an interrupted run resume exactly (same
weights, optimiser, step, batch order and random state).

Under torchrun (see :mod:`speechmimic.distributed`) the model is wrapped in DistributedDataParallel
and each batch is split across the ranks: every rank draws the same batches, crops and masks, and the
step function computes its rank's share of the batch's loss (see ``StepFn``), so N processes take
the steps one process takes, with the same loss up to float rounding, and a resume under another
number of processes continues the same run. Rank 0 alone writes the state; on resume it reads it and
hands it to the others (no shared disk needed). ``accumulate`` sums the gradients of several batches
per step; ``amp`` runs the forward under bf16/fp16 autocast; ``compile`` hands the model to
``torch.compile``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from speechmimic import distributed
from speechmimic.config import option
from speechmimic.errors import InputError
from speechmimic.readahead import ReadAhead

STATE_NAME = "train_state.pt"
LOG_NAME = "train_log.jsonl"


@dataclass
class TrainConfig:
    """The settings of :func:`train_loop`; stage 1 (``PretrainConfig``) and stage 2 (``DistillConfig``)
    extend it with their own."""

    steps: int = option(2000, "optimiser steps")
    lr: float = option(1e-3, "AdamW peak learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup: int = option(100, "linear warm-up steps")
    batch_seconds: float = option(40.0, "cap on padded audio seconds per batch")
    crop_seconds: float = option(6.0, "longer clips are randomly cropped to this length in training")
    seed: int = option(0, "seed of every random choice")
    checkpoint_every: int = option(500, "save a resumable training state every N steps")
    device: str = option("cpu", "torch device: cpu, cuda, cuda:1 (under torchrun, cuda is each rank's own)")
    accumulate: int = option(1, "batches whose gradients are summed per optimiser step")
    amp: str = option("off", "autocast the forward: off, bf16 or fp16 (fp16 with a gradient scaler; GPUs)")
    compile: bool = option(False, "torch.compile the model (the first steps compile; needs a C compiler)")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_batches(
    durations: list[float], batch_seconds: float, crop_seconds: float, rng: random.Random
) -> list[list[int]]:
    """Group clips of similar length so that (clips x longest) stays under ``batch_seconds``."""
    order = sorted(range(len(durations)), key=lambda i: (durations[i], rng.random()))
    batches, cur, longest = [], [], 0.0
    for i in order:
        d = min(durations[i], crop_seconds)
        if cur and (len(cur) + 1) * max(longest, d) > batch_seconds:
            batches.append(cur)
            cur, longest = [], 0.0
        cur.append(i)
        longest = max(longest, d)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def crop_start(length: int, crop: int, hop: int, rng: random.Random) -> int:
    """Where a random crop of ``crop`` samples of a ``length``-sample clip starts, in hops (frames of
    the student), so that targets and labels stay aligned with it."""
    return rng.randrange(0, (length - crop) // hop + 1)


# Settings that change how a run goes, not what it computes: a state saved under other values of
# these is resumed all the same.
HOW_IT_RUNS = ("device", "checkpoint_every", "compile")


def record_of(cfg: TrainConfig, *also_ignored: str) -> dict:
    """What a training state belongs to: ``cfg``'s settings but those of :data:`HOW_IT_RUNS`."""
    ignored = set(HOW_IT_RUNS) | set(also_ignored)
    return {k: v for k, v in asdict(cfg).items() if k not in ignored}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to zero at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# One batch's loss and the metrics to log beside it, from the model to run (the loop's: the one it may
# wrap, e.g. for DDP), the batch's clip indices and the loop's random generator (for crops and masks,
# so that a resume replays them). Under DDP every rank gets the whole batch and must draw from the
# generator exactly as a single process would, then return its share of the batch's loss: the loss
# of its rows (``distributed.my_rows``) over the whole batch's normaliser, so the shares sum to the
# batch's loss. A rank with no rows must still run the model (on any row, times zero): DDP's
# gradient reduction needs every rank.
StepFn = Callable[[nn.Module, list[int], random.Random], tuple[torch.Tensor, dict[str, float]]]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per tensor where PyTorch has it (float weights on a CPU or GPU):
    the unfused step is a chain of elementwise passes over every weight and both moments."""
    params = list(params)
    fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def train_loop(
    model: nn.Module,
    cfg: TrainConfig,
    durations: list[float],
    step_fn: StepFn,
    state_path: Path,
    record: Any = None,
    resume: bool = True,
    desc: str = "train",
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    reader: ReadAhead | None = None,
) -> list[dict]:
    """Run ``cfg.steps`` steps of ``step_fn(model, ...)`` over clips of ``durations``; returns the log
    (one dict per step). ``reader`` (the step's :class:`~speechmimic.readahead.ReadAhead`) is told
    the clips of the next step before each step runs, and closed when the loop ends or fails.

    ``record`` identifies what is being trained: a state saved under another record (other settings,
    other units) is ignored rather than resumed. The final state is saved too, so rerunning a finished
    loop does no step.
    """
    if cfg.accumulate < 1:
        raise InputError(f"accumulate must be at least 1, not {cfg.accumulate}")
    if cfg.amp not in ("off", *AMP_DTYPES):
        raise InputError(f"amp {cfg.amp!r}: choose off, bf16 or fp16")
    distributed.check_same("the training clips", [round(d, 4) for d in durations])
    opt = adamw(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    step, epoch, log = 0, 0, []
    state = None
    if resume and distributed.is_main() and state_path.exists():
        state = torch.load(state_path, weights_only=False, map_location="cpu")
    state = distributed.broadcast(state)
    if state is not None and state.get("record") == record:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, epoch, log = state["step"], state["epoch"], state["log"]
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
    net = _wrap(model, cfg)
    device_type = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.amp == "fp16")

    def save() -> None:
        if not distributed.is_main():
            return
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "epoch": epoch,
                "log": log,
                "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                "record": record,
            },
            tmp,
        )
        tmp.replace(state_path)

    world = distributed.world()
    quiet = not progress or not distributed.is_main()
    with reader if reader is not None else contextlib.nullcontext():
        bar = tqdm(total=cfg.steps, initial=step, desc=desc, unit="step", disable=quiet)
        while step < cfg.steps:
            batches = make_batches(
                durations, cfg.batch_seconds, cfg.crop_seconds, random.Random(cfg.seed + epoch)
            )
            groups = [batches[i : i + cfg.accumulate] for i in range(0, len(batches), cfg.accumulate)]
            # The order is seeded per epoch: after a resume, skip the steps of this epoch already done.
            done_in_epoch = sum(1 for e in log if e.get("epoch") == epoch)
            for j in range(done_in_epoch, len(groups)):
                if step >= cfg.steps:
                    break
                group = groups[j]
                if reader is not None and j + 1 < len(groups) and step + 1 < cfg.steps:
                    reader.ahead([i for batch in groups[j + 1] for i in batch])
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg)
                opt.zero_grad(set_to_none=True)
                loss, metrics = 0.0, {}
                for i, batch_idx in enumerate(group):
                    # DDP reduces gradients on the group's last backward only
                    sync = i == len(group) - 1 or not isinstance(net, DDP)
                    with contextlib.nullcontext() if sync else net.no_sync(), _autocast(device_type, cfg):
                        share, parts = step_fn(net, batch_idx, rng)
                    # DDP averages gradients over ranks: the shares' sum is the batch's loss
                    scaler.scale(share * (world / len(group))).backward()
                    loss += distributed.all_sum(float(share.detach())) / len(group)
                    for k, v in parts.items():
                        metrics[k] = metrics.get(k, 0.0) + distributed.all_sum(v) / world / len(group)
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                scaler.step(opt)
                scaler.update()
                step += 1
                log.append({"step": step, "epoch": epoch, "loss": round(loss, 5), **metrics})
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss:.3f}", **{k: f"{v:.3f}" for k, v in metrics.items()}, refresh=False
                )
                if on_step:
                    on_step(step, loss)
                if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    save()
            else:
                epoch += 1
    bar.close()
    save()
    distributed.barrier()
    return log


def save_trained(student, out_dir: Path, log: list[dict], extra: dict) -> None:
    """Rank 0 writes the trained ``student`` (``extra`` beside its config) and its training ``log``;
    the other ranks wait until both are on disk."""
    if distributed.is_main():
        student.save(out_dir, extra=extra)
        (out_dir / LOG_NAME).write_text("".join(json.dumps(e) + "\n" for e in log))
    distributed.barrier()


def _wrap(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    net = model
    if distributed.world() > 1:
        device = next(model.parameters()).device
        # Parameters a stage does not use (stage 2 never masks, so mask_emb gets no gradient) are allowed.
        net = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    return torch.compile(net) if cfg.compile else net


def _autocast(device_type: str, cfg: TrainConfig):
    if cfg.amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=AMP_DTYPES[cfg.amp])

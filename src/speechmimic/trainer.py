"""The training loop stage 1 (:mod:`speechmimic.pretrain`) and stage 2 (:mod:`speechmimic.distill`)
share: epochs of length-grouped batches capped by seconds, linear warm-up then cosine decay, AdamW,
clipped gradients, a progress bar, and a ``train_state.pt`` that lets an interrupted run resume exactly (same
weights, optimiser, step, batch order and random state).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from speechmimic.config import option

STATE_NAME = "train_state.pt"


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
    device: str = option("cpu", "torch device, e.g. cpu, cuda, cuda:1")


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to zero at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# One optimisation step's loss and the metrics to log beside it, from the model to run (the loop's:
# the one it may wrap, e.g. for DDP), the batch's clip indices and the loop's random generator (for
# crops and masks, so that a resume replays them).
StepFn = Callable[[nn.Module, list[int], random.Random], tuple[torch.Tensor, dict[str, float]]]


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
) -> list[dict]:
    """Run ``cfg.steps`` steps of ``step_fn(model, ...)`` over clips of ``durations``; returns the log
    (one dict per step).

    ``record`` identifies what is being trained: a state saved under another record (other settings,
    other units) is ignored rather than resumed. The final state is saved too, so rerunning a finished
    loop does no step.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    step, epoch, log = 0, 0, []
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state.get("record") == record:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            step, epoch, log = state["step"], state["epoch"], state["log"]
            rng.setstate(state["rng"])
            torch.set_rng_state(state["torch_rng"])

    def save() -> None:
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

    bar = tqdm(total=cfg.steps, initial=step, desc=desc, unit="step", disable=not progress)
    while step < cfg.steps:
        batches = make_batches(
            durations, cfg.batch_seconds, cfg.crop_seconds, random.Random(cfg.seed + epoch)
        )
        # The order is seeded per epoch: after a resume, skip the batches of this epoch already done.
        done_in_epoch = sum(1 for e in log if e.get("epoch") == epoch)
        for batch_idx in batches[done_in_epoch:]:
            if step >= cfg.steps:
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            loss, metrics = step_fn(model, batch_idx, rng)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            step += 1
            loss = float(loss.detach())
            log.append({"step": step, "epoch": epoch, "loss": round(loss, 5), **metrics})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", **{k: f"{v:.3f}" for k, v in metrics.items()}, refresh=False)
            if on_step:
                on_step(step, loss)
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save()
        else:
            epoch += 1
    bar.close()
    save()
    return log

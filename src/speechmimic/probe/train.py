"""Train a SUPERB-style probe (Featurizer + light head) on a frozen upstream and score it once on test."""

from __future__ import annotations

import json
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from speechmimic import config, distributed
from speechmimic.config import option
from speechmimic.corpus import warn_unusable
from speechmimic.errors import InputError
from speechmimic.probe.features import ClipFeatures, FeatureStore
from speechmimic.probe.featurizer import Featurizer
from speechmimic.probe.heads import CTCHead, UtteranceHead
from speechmimic.probe.metrics import accuracy, ctc_greedy_decode, equal_error_rate, error_rate, words
from speechmimic.tasks import Task, load_task

# Per kind: (max_epochs, lr, batch_size, patience). Utterance probes train on cached means, so epochs
# cost milliseconds; the linear phone head follows s3prl's PR recipe lr (1e-2), the BiLSTM ASR head
# a smaller one.
DEFAULTS = {
    "classify": (200, 1e-3, 32, 30),
    "phones": (100, 1e-2, 16, 15),
    "chars": (60, 1e-3, 16, 10),
    "verify": (0, 0.0, 64, 0),  # nothing is trained: see _verify
}
RESULT_NAME = "result.json"
STATE_NAME = "probe.safetensors"


@dataclass
class ProbeConfig:
    """How a probe trains its head; ``None`` takes the task kind's default (:data:`DEFAULTS`)."""

    seed: int = option(0, "seed of the head's initial weights and of the batch order")
    device: str = option("cpu", "torch device, e.g. cpu, cuda, cuda:1")
    max_epochs: int | None = option(
        None, "maximum epochs (default: 200 classify, 100 phones, 60 chars)", flag="--epochs"
    )
    lr: float | None = option(None, "Adam learning rate (default: 1e-3; 1e-2 for phones)")
    batch_size: int | None = option(None, "clips per batch (default: 32 classify, 16 CTC)")
    patience: int | None = option(
        None,
        "stop after this many epochs without a better dev score (default: 30 classify, 15 phones, 10 chars)",
    )
    layers: list[str] | None = option(None, "the states to weigh (default: every state of one width)")
    layer_norm: bool = option(False, "layer-normalise each state before the weighted sum (frame features)")
    lstm: bool | None = option(None, "a 2-layer BiLSTM before the CTC head (default: chars tasks only)")
    lstm_hidden: int = option(256, "units of that BiLSTM")


def _choose_states(names: list[str], dims: list[int], layers: list[str] | None) -> list[int]:
    """Indices of the states to weight: those named, else all if they share a width, else those with
    the width of the last state (for a student: its predictions of the target's layers)."""
    if layers:
        unknown = [n for n in layers if n not in names]
        if unknown:
            raise InputError(f"unknown hidden state(s) {unknown}; the upstream has {names}")
        chosen = [names.index(n) for n in layers]
    else:
        chosen = [i for i, d in enumerate(dims) if d == dims[-1]]
    if len({dims[i] for i in chosen}) != 1:
        raise InputError(f"states {[names[i] for i in chosen]} differ in width; pick states of one width")
    return chosen


@contextmanager
def _threads(n: int | None):
    """Temporarily run torch ops on ``n`` threads (None: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


class _Data:
    """One split's inputs: stacked means (L, N, D), or per-clip frames (L, T, D) padded per batch."""

    def __init__(self, feats: list[ClipFeatures], chosen: list[int], frames: bool):
        self.frames = [torch.stack([f.frames[i] for i in chosen]) for f in feats] if frames else None
        stacked = None if frames else [torch.stack([f.means[i] for i in chosen]) for f in feats]
        self.means = None if frames else torch.stack(stacked, 1)
        self.n = len(feats)

    def batch(self, idx: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.frames is None:
            return self.means[:, idx].to(device), None
        clips = [self.frames[i] for i in idx.tolist()]
        lengths = torch.tensor([c.shape[1] for c in clips])
        t = int(lengths.max())
        x = torch.stack([F.pad(c, (0, 0, 0, t - c.shape[1])) for c in clips], 1)
        return x.to(device).float(), lengths.to(device)


class _Probe(nn.Module):
    def __init__(self, featurizer: Featurizer, head: nn.Module):
        super().__init__()
        self.featurizer = featurizer
        self.head = head

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        return self.head(self.featurizer(x), lengths)


def _majority_accuracy(train: list[str], test: list[str]) -> float:
    top = min(Counter(train).items(), key=lambda kv: (-kv[1], kv[0]))[0]
    return accuracy([top] * len(test), test)


def _unigram_error(train: list[list[str]], test: list[list[str]]) -> float:
    """The most frequent train unit repeated to the mean train length (in units): what a model that
    ignores the audio and knows only unit frequencies and typical length would output."""
    counts = Counter(u for seq in train for u in seq)
    top = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
    n = round(sum(len(s) for s in train) / len(train))
    return error_rate([[top] * n] * len(test), test)


def _verify(task: Task, clips: dict, feats: dict, names: list[str], layers: list[str] | None) -> dict:
    """Speaker verification with a cosine back end: each state's clip means, standardised by the train
    split's statistics (its labels unused: it is the background set), scored on the dev trials; the
    state with the lowest dev EER is scored once on the test trials. No head is trained (SUPERB trains
    an x-vector one): the score then needs no speaker-labelled data, which small sets lack."""
    unknown = [n for n in layers or [] if n not in names]
    if unknown:
        raise InputError(f"unknown hidden state(s) {unknown}; the upstream has {names}")
    wanted = [names.index(n) for n in layers] if layers else range(len(names))

    trials = {s: task.trials(s) for s in ("dev", "test")}  # read once, scored once per state

    def matrix(split: str, state: int) -> np.ndarray:
        return torch.stack([f.means[state] for f in feats[split]]).double().numpy()

    def eer(split: str, state: int, mean: np.ndarray, std: np.ndarray) -> float:
        x = (matrix(split, state) - mean) / std
        x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
        row = {c.id: k for k, c in enumerate(clips[split])}
        # a clip that did not decode takes its trials with it
        kept = [(t, row[a], row[b]) for t, a, b in trials[split] if a in row and b in row]
        same, i, j = (np.array(v) for v in zip(*kept, strict=True))
        return equal_error_rate(np.einsum("ij,ij->i", x[i], x[j]), same)

    stats, dev = {}, {}
    for state in wanted:
        train = matrix("train", state)
        stats[state] = (train.mean(0), train.std(0) + 1e-8)
        dev[state] = eer("dev", state, *stats[state])
    best = min(dev, key=lambda k: (dev[k], k))
    return {
        "task": task.name,
        "kind": task.kind,
        "metric": task.metric,
        "dev": round(dev[best], 4),
        "test": round(eer("test", best, *stats[best]), 4),
        "dev_by_state": {names[k]: round(v, 4) for k, v in dev.items()},
        "layer_weights": {names[best]: 1.0},
        "baselines": {"chance": 0.5},
        "head": "cosine",
        "splits": {s: len(f) for s, f in feats.items()},
        "trials": {s: len(t) for s, t in trials.items()},
    }


def probe(
    upstream: str | os.PathLike | nn.Module,
    task: Task | str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    cfg: ProbeConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    upstream_id: str | None = None,
    ledger=None,
) -> dict:
    """Probe a frozen upstream on a task folder; returns the result dict (also ``out_dir/result.json``).

    ``upstream``: anything :func:`speechmimic.upstream.load_upstream` accepts (a target spec with the
    ``ledger`` that records its answers), or an upstream module (cached on disk only if it has a
    ``spec`` or ``upstream_id`` names it). A softmax-weighted sum of its
    states (``cfg.layers``, default all of one width) feeds a head: for ``classify`` tasks
    projection(256) -> mean pooling -> linear, trained on cached per-clip means; for ``phones`` /
    ``chars`` a CTC head on frames, linear or, with ``cfg.lstm`` (default: chars tasks only), after a
    2-layer BiLSTM of ``cfg.lstm_hidden`` units. Adam; dev scored every epoch; training stops after
    ``cfg.patience`` epochs without a better dev score (ties broken by lower dev loss: a CTC head sits at
    all-blank output, error rate 1.0, for a while before its loss turns into transcripts) and the
    best-dev state is scored once on test.

    A ``verify`` task trains no head: see :func:`_verify` (cosine scoring, the state chosen on dev).

    Baselines needing no upstream come with the result: the majority train class (classify), or
    predicting nothing (``blank``, error rate 1.0) and ``unigram`` (see :func:`_unigram_error`; units
    are phones for PER and words for WER).

    Deterministic for a seed on CPU (CUDA's CTC loss is not bit-exact).
    """
    cfg = cfg or ProbeConfig()
    task = task if isinstance(task, Task) else load_task(task)
    d_epochs, d_lr, d_batch, d_patience = DEFAULTS[task.kind]
    max_epochs = d_epochs if cfg.max_epochs is None else cfg.max_epochs
    lr = d_lr if cfg.lr is None else cfg.lr
    batch_size = d_batch if cfg.batch_size is None else cfg.batch_size
    patience = d_patience if cfg.patience is None else cfg.patience
    seed, device, layers = cfg.seed, cfg.device, cfg.layers
    classify = task.kind == "classify"
    use_frames = task.kind in ("phones", "chars") or cfg.layer_norm
    lstm = task.kind == "chars" if cfg.lstm is None else cfg.lstm

    store = FeatureStore(upstream, cache_dir, identity=upstream_id, device=device, ledger=ledger)
    clips = {s: task.split(s) for s in ("train", "dev", "test")}
    feats = {s: store.get(c, frames=use_frames, progress=progress) for s, c in clips.items()}
    for s in clips:  # a clip whose audio does not decode is left out of its split, and named
        clips[s] = [c for c, f in zip(clips[s], feats[s], strict=True) if f is not None]
        feats[s] = [f for f in feats[s] if f is not None]
    warn_unusable(f"probe {task.name}", store.unusable)
    names = store.names
    if task.kind == "verify":
        result = _verify(task, clips, feats, names, layers) | {
            "seed": seed,
            "config": config.to_dict(cfg),
            "upstream": store.identity or type(store.upstream).__name__,
            "unusable": store.unusable,
        }
        if out_dir is not None and distributed.is_main():
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / RESULT_NAME).write_text(json.dumps(result, indent=2))
        return result
    chosen = _choose_states(names, [m.shape[0] for m in feats["train"][0].means], layers)
    data = {s: _Data(f, chosen, use_frames) for s, f in feats.items()}
    dim = feats["train"][0].means[chosen[0]].shape[0]

    if classify:
        index = {c: i for i, c in enumerate(task.classes)}
        refs = {s: [task.label(c) for c in cs] for s, cs in clips.items()}
        targets = {s: torch.tensor([index[r] for r in refs[s]]) for s in refs}
        baselines = {"majority": _majority_accuracy(refs["train"], refs["test"])}
        n_out = len(task.classes)
    else:
        refs = {s: [task.tokens(c) for c in cs] for s, cs in clips.items()}
        vocab = sorted({t for seq in refs["train"] for t in seq})
        index = {t: i + 1 for i, t in enumerate(vocab)}  # 0 is the CTC blank
        # Dev/test tokens unseen in training cannot be emitted; they only count in the error rate.
        targets = {s: [torch.tensor([index[t] for t in seq if t in index]) for seq in refs[s]] for s in refs}
        units = {s: [words(r) for r in refs[s]] for s in refs} if task.kind == "chars" else refs
        baselines = {"blank": 1.0, "unigram": _unigram_error(units["train"], units["test"])}
        n_out = len(vocab) + 1

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = (
            UtteranceHead(dim, n_out) if classify else CTCHead(dim, n_out, lstm=lstm, hidden=cfg.lstm_hidden)
        )
        model = _Probe(Featurizer(len(chosen), cfg.layer_norm), head).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)

    def loss_of(split: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, lengths = data[split].batch(idx, device)
        out = model(x, lengths)
        if classify:
            return F.cross_entropy(out, targets[split][idx].to(device)), out, lengths
        ys = [targets[split][i] for i in idx.tolist()]
        loss = F.ctc_loss(
            out.transpose(0, 1),
            torch.cat(ys).to(device),
            lengths,
            torch.tensor([len(y) for y in ys], device=device),
            blank=0,
            zero_infinity=True,  # a clip with fewer frames than its labels need adds no loss, not inf
        )
        return loss, out, lengths

    @torch.no_grad()
    def evaluate(split: str) -> tuple[float, float]:
        model.eval()
        hyps, total_loss = [], 0.0
        for idx in _batches(data[split].n, max(batch_size, 64), None):
            if classify:
                loss, out, _ = loss_of(split, idx)
                total_loss += float(loss) * len(idx)
                hyps += [task.classes[i] for i in out.argmax(-1).tolist()]
            else:
                loss, out, lengths = loss_of(split, idx)
                total_loss += float(loss) * len(idx)
                hyps += [[vocab[i - 1] for i in seq] for seq in ctc_greedy_decode(out, lengths)]
        model.train()
        if classify:
            return accuracy(hyps, refs[split]), total_loss / data[split].n
        if task.kind == "chars":
            return error_rate([words(h) for h in hyps], [words(r) for r in refs[split]]), total_loss / data[
                split
            ].n
        return error_rate(hyps, refs[split]), total_loss / data[split].n

    sign = 1.0 if classify else -1.0  # accuracy: higher is better; error rates: lower
    best_key, best_state, best_epoch, best_dev, epoch = None, None, 0, None, 0
    quiet = not progress or not distributed.is_main()
    bar = tqdm(range(1, max_epochs + 1), desc=f"probe {task.name}", unit="epoch", disable=quiet)
    # Ops on cached means take microseconds: extra intra-op threads only add synchronisation, which
    # on a busy 2-core machine made each op ~1000x slower.
    tiny = not use_frames and torch.device(device).type == "cpu"
    with _threads(1 if tiny else None):
        for epoch in bar:
            for idx in _batches(data["train"].n, batch_size, generator):
                loss = loss_of("train", idx)[0]
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            dev, dev_loss = evaluate("dev")
            key = (sign * dev, -dev_loss)
            if best_key is None or key > best_key:
                best_key, best_epoch, best_dev = key, epoch, dev
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            bar.set_postfix(
                {task.metric: f"{dev:.3f}", "best": f"{best_dev:.3f}@{best_epoch}"}, refresh=False
            )
            if epoch - best_epoch >= patience:
                break
        bar.close()

        model.load_state_dict(best_state)
        test, _ = evaluate("test")
    weights = model.featurizer.normalized_weights().detach().cpu().tolist()
    result = {
        "task": task.name,
        "kind": task.kind,
        "metric": task.metric,
        "dev": best_dev,
        "test": test,
        "epochs": epoch,
        "best_epoch": best_epoch,
        "layer_weights": {names[i]: w for i, w in zip(chosen, weights, strict=True)},
        "baselines": baselines,
        "seed": seed,
        "config": config.to_dict(cfg),
        "upstream": store.identity or type(store.upstream).__name__,
        "head": "utterance" if classify else ("bilstm-ctc" if lstm else "linear-ctc"),
        "splits": {s: data[s].n for s in data},
        "unusable": store.unusable,
    }
    if out_dir is not None and distributed.is_main():  # every rank trains the same head; one writes
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        labels = task.classes if classify else vocab
        save_file(
            {k: v.contiguous().cpu() for k, v in best_state.items()},
            str(out / STATE_NAME),
            metadata={"labels": json.dumps(labels), "states": json.dumps([names[i] for i in chosen])},
        )
        (out / RESULT_NAME).write_text(json.dumps(result, indent=2))
    return result

"""Read-ahead: the next step's clips are read in a thread while the current step runs, once each."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
import torch

from speechmimic.readahead import ReadAhead
from speechmimic.trainer import TrainConfig, make_batches, train_loop


def test_items_read_ahead_in_another_thread_and_errors_surface_when_asked_for():
    threads = {}

    def read(i):
        if i == 3:
            raise ValueError("clip 3 does not decode")
        threads[i] = threading.current_thread().name
        return i * i

    with ReadAhead(read) as reader:
        reader.ahead([0, 1, 2, 3])  # no error here: the read of 3 fails in the background
        assert [reader[i] for i in (0, 1, 2)] == [0, 1, 4]
        assert all(threads[i].startswith("read-ahead") for i in (0, 1, 2))
        with pytest.raises(ValueError, match="clip 3"):
            reader[3]
        assert reader[5] == 25 and threads[5] == threading.current_thread().name  # not read ahead: in place
    assert reader[1] == 1  # closed, it still reads


def test_train_loop_reads_each_next_step_ahead_while_the_step_runs(tmp_path):
    durations = [1.0 + 0.1 * (i % 7) for i in range(40)]
    cfg = TrainConfig(steps=14, warmup=1, batch_seconds=10.0, crop_seconds=6.0, checkpoint_every=100)
    model = torch.nn.Linear(1, 1)
    reads = Counter()
    stepped: list[list[int]] = []

    def read(i):
        time.sleep(0.002)
        reads[i] += 1
        return float(i)

    announced: list[list[int]] = []

    class Recording(ReadAhead):
        def ahead(self, indices):
            announced.append(list(indices))
            super().ahead(indices)

    reader = Recording(read)

    def step(net, batch_idx, rng):
        stepped.append(list(batch_idx))
        x = torch.tensor([[reader[i]] for i in batch_idx])
        return net(x).pow(2).mean(), {}

    train_loop(model, cfg, durations, step, tmp_path / "state.pt", progress=False, reader=reader)
    assert reader._pool is None  # the loop closed it
    per_epoch = len(make_batches(durations, cfg.batch_seconds, cfg.crop_seconds, random.Random(cfg.seed)))
    assert len(stepped) == cfg.steps and per_epoch < cfg.steps  # the run crosses an epoch's end
    # Each step announces the step after it, exactly, but the last of an epoch (the next epoch's
    # order is drawn when it starts) and the last of the run.
    expected = [k for k in range(len(stepped) - 1) if (k + 1) % per_epoch != 0]
    assert announced == [stepped[k + 1] for k in expected]
    # Every clip a step used was read once: what was read ahead was not read again.
    assert sum(reads.values()) == sum(len(b) for b in stepped)

"""batches.py: token shards -> deterministic, disjoint, resumable batches for every rank.

The idea: training reads windows of T+1 tokens straight from data.py's memmapped shards (inputs are
the first T, targets the last T). An epoch is a permutation of all windows, seeded by (seed, epoch);
optimizer step s uses windows [s*B, (s+1)*B) of it, and data-parallel rank r takes its own
contiguous slice of those B. So the batches are a pure function of (seed, step): ranks never
overlap, and the data position in a checkpoint is one integer. step_items is that order for any n
items: fine-tuning draws its examples with it too (sft_data.SFTBatches).

Seen running: every pretrain.py run; tests/test_data.py checks that the ranks' micro-batches make up
one process's global batch, that a resume continues the exact stream, and that epochs wrap in a new
order.
"""
import functools
import json
from pathlib import Path

import numpy as np
import torch

from data import DataError


class TokenWindows:
    """All windows of T+1 tokens (stride T) of a split, across its shards; none crosses a shard."""

    def __init__(self, data_dir, split, seq_len):
        meta = json.loads((Path(data_dir) / "meta.json").read_text())
        self.seq_len = seq_len
        self.shards = [np.memmap(Path(data_dir) / n, dtype=meta["dtype"], mode="r")
                       for n in meta["shards"][split]]
        counts = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.n = int(self.starts[-1])
        if self.n == 0:
            raise DataError(f"--data {data_dir}: the {split} split has fewer than --seq-len + 1 = "
                            f"{seq_len + 1} tokens")

    def get(self, indices):
        """(x, y) int64 tensors of shape (len(indices), T) for window numbers `indices`."""
        rows = []
        for i in indices:
            s = int(np.searchsorted(self.starts, i, side="right") - 1)
            off = (int(i) - int(self.starts[s])) * self.seq_len
            rows.append(np.asarray(self.shards[s][off:off + self.seq_len + 1], dtype=np.int64))
        buf = torch.from_numpy(np.stack(rows))
        return buf[:, :-1], buf[:, 1:]


def step_items(step, n, global_batch, seed, rank=0, world=1, n_micro=1):
    """Which of n items (token windows, SFT examples) this rank trains on at optimizer step `step`:
    step s of epoch e takes perm_e[s*B:(s+1)*B] (B = global_batch, perm_e drawn from (seed, e));
    rank r of `world` takes the r-th contiguous 1/world of them, cut into `n_micro` micro-batches
    (a list of index arrays)."""
    epoch, s = divmod(step, n // global_batch)
    idx = epoch_order(seed, epoch, n)[s * global_batch:(s + 1) * global_batch]
    per_rank = global_batch // world
    return np.split(idx[rank * per_rank:(rank + 1) * per_rank], n_micro)


@functools.lru_cache(maxsize=1)
def epoch_order(seed, epoch, n):
    """A permutation of range(n), one epoch's order (kept: drawing it is O(n), a step reads B)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.flags.writeable = False
    return perm


class Batches:
    """Token windows in the order of step_items (B = global batch in sequences).

    The whole state is the step counter: batches are a pure function of (seed, step), so resuming
    restores the exact stream, and a checkpoint's `state_dict()` is tiny."""

    def __init__(self, data_dir, seq_len, global_batch, rank=0, world=1, n_micro=1, seed=0,
                 split="train"):
        self.windows = TokenWindows(data_dir, split, seq_len)
        if global_batch % (world * n_micro):
            raise DataError(f"--batch-size {global_batch} does not divide into {world} ranks x "
                            f"{n_micro} micro-steps of equal size")
        if global_batch > self.windows.n:
            raise DataError(f"--batch-size {global_batch} is more than the {self.windows.n} "
                            f"windows of {seq_len + 1} tokens in the {split} split")
        self.B, self.seed = global_batch, seed
        self.rank, self.world, self.n_micro = rank, world, n_micro
        self.steps_per_epoch = self.windows.n // global_batch
        self.step = 0

    def next(self):
        """This rank's micro-batches for the next optimizer step: `n_micro` (x, y) pairs."""
        chunks = step_items(self.step, self.windows.n, self.B, self.seed, self.rank, self.world,
                            self.n_micro)
        self.step += 1
        return [self.windows.get(chunk) for chunk in chunks]

    def state_dict(self):
        return {"step": self.step, "seed": self.seed, "global_batch": self.B,
                "windows": self.windows.n}

    def load_state_dict(self, sd):
        if (sd["seed"], sd["global_batch"], sd["windows"]) != (self.seed, self.B, self.windows.n):
            raise DataError(f"checkpoint data position (seed {sd['seed']}, batch "
                            f"{sd['global_batch']}, {sd['windows']} windows) does not match this "
                            f"run's (seed {self.seed}, batch {self.B}, {self.windows.n} windows)")
        self.step = sd["step"]


def eval_batches(data_dir, seq_len, global_batch, n_batches, rank=0, world=1):
    """A fixed validation set: the val split's first n_batches*B windows in order, over ranks."""
    windows = TokenWindows(data_dir, "val", seq_len)
    n_batches = max(1, min(n_batches, windows.n // global_batch))
    per_rank = global_batch // world
    out = []
    for b in range(n_batches):
        idx = np.arange(b * global_batch, (b + 1) * global_batch) % windows.n
        out.append(windows.get(idx[rank * per_rank:(rank + 1) * per_rank]))
    return out

"""checkpoint.py: checkpoints that a crash cannot corrupt, and that resume a run bit for bit.

The idea: a training run is a pure function of its state, so a checkpoint must hold all of it: the weights, the
optimizer's moments (and under mixed precision the fp32 master weights and the loss scale), the step (which
fixes the learning-rate schedule and, in data.py, the data position) and every RNG state. Saving writes a
temporary file and renames it over the old one: rename is atomic on POSIX, so a crash mid-write leaves the
previous checkpoint whole. With several ranks each writes its own file (its tensor-parallel slices, its pipeline
stage, its ZeRO shards): N files of about 1/N of the state each, written in parallel; the layout (world size,
dp x pp x tp, ZeRO stage) is recorded and a mismatch is refused on resume, since one layout's slices do not fit
another (resharding is not built).

Size: of the 16 bytes per parameter that mixed-precision Adam holds (2 weights + 2 gradients + 12 fp32 master,
m, v), 14 are saved (gradients are not), spread over the ranks that shard them; in fp32, 4 + 8 = 12.

Used by pretrain.py and sft.py; tests/test_pretrain.py resumes k + k steps against 2k in one go.
"""
import os
import random

import numpy as np
import torch


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched checkpoint: the message is the one line the user sees."""


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(path, state):
    """Write to a temporary name, then rename: a crash mid-write leaves the previous checkpoint whole."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def checkpoint_path(out, rank, world):
    """One file for one process; with several ranks each writes its own (its ZeRO slices, its RNG state)."""
    return out / ("ckpt.pt" if world == 1 else f"ckpt.rank{rank}.pt")


def check_checkpoint_layout(out, world, zero, layout):
    """Refuse, before loading, a checkpoint written by another topology, number of ranks or ZeRO stage:
    slices of one layout do not fit another (resharding is not built)."""
    for path in (checkpoint_path(out, 0, world), out / "ckpt.pt", out / "ckpt.rank0.pt"):
        if path.exists():
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=False)
            except Exception:
                return  # load_checkpoint says what is wrong with it
            saved_world, saved_zero = ckpt.get("world", 1), ckpt.get("zero", 0)
            if saved_world != world:
                raise CheckpointError(f"--resume: the checkpoint in {out} was written by {saved_world} "
                                      f"rank(s); this run has {world}: resume with --nproc_per_node {saved_world} "
                                      "(changing the world size of a sharded checkpoint is not supported)")
            saved = ckpt.get("topology", {"dp": saved_world, "pp": 1, "tp": 1})
            if saved != layout:
                raise CheckpointError(f"--resume: the checkpoint in {out} was saved with topology {saved}, this run "
                                      f"is {layout}: relaunch with the checkpoint's --tp, --pp, --ep and world size")
            if world > 1 and saved_zero != zero:
                raise CheckpointError(f"--resume: the checkpoint in {out} was written with --zero {saved_zero}; "
                                      f"resume with --zero {saved_zero}")
            return


def load_checkpoint(path):
    if not path.exists():
        raise CheckpointError(f"--resume: no checkpoint at {path} (train without --resume first, or fix --out)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        missing = {"model", "optim", "step", "data", "rng", "model_config", "tokenizer"} - set(ckpt)
    except Exception as e:
        raise CheckpointError(f"--resume: checkpoint {path} is corrupt ({type(e).__name__}: {str(e)[:80]})") \
            from None
    if missing:
        raise CheckpointError(f"--resume: checkpoint {path} is corrupt (missing {', '.join(sorted(missing))})")
    return ckpt

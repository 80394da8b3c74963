"""Run a function on N CPU processes joined by gloo, and collect what each returns.

    results = run_distributed(fn, world_size, *args)   # fn(rank, world_size, *args) in each process

`refused_before_any_group(...)` runs pretrain.py as rank 0 of a world that does not exist and
returns its one-line error: reaching init_process_group would hang, so a clean error proves the
check came first.

fn must be importable (defined at module level in a test file); its return values must pickle (move
tensors to CPU). An exception in any rank fails the call with that rank's traceback.
"""
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from topology import end_process_group


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # N processes share the machine's cores
    out = os.path.join(result_dir, f"{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        torch.save({"ok": result}, out)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, out)
        if dist.is_initialized():  # (no last barrier: the other ranks may never reach it)
            dist.destroy_process_group()
        raise
    end_process_group()


def run_distributed(fn, world, *args):
    with tempfile.TemporaryDirectory() as d:
        try:
            mp.start_processes(_worker, args=(world, free_port(), fn, args, d), nprocs=world,
                               join=True, start_method="fork")
        except Exception as e:
            errors = []
            for r in range(world):
                path = os.path.join(d, f"{r}.pt")
                if (os.path.exists(path)
                        and "error" in (res := torch.load(path, weights_only=False))):
                    errors.append(f"rank {r}:\n{res['error']}")
            raise AssertionError("\n".join(errors) or str(e)) from None
        return [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False)["ok"]
                for r in range(world)]


def refused_before_any_group(tmp_path, capsys, monkeypatch, world, flags):
    """pretrain.main(flags) as rank 0 of `world` processes of which only this one exists: it must
    exit 2 with one line on stderr, without building a process group. Returns that line."""
    import pytest

    import pretrain
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--batch-size", "8", "--out", str(tmp_path), *flags])
    assert e.value.code == 2 and not dist.is_initialized()
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err

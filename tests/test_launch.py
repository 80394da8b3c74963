"""Launching: one run per --out folder, restarts that go on bit for bit, two nodes on one machine.

The torchrun tests start real launchers (subprocesses, 2 gloo workers each) on a tiny model for 8
steps; their losses (metrics.jsonl) are compared, float for float, with one uninterrupted run of the
same world size.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

import pretrain
from tests.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ARGS = ["--model", "tiny", "--seq-len", "64", "--batch-size", "8", "--lr", "3e-3",
        "--warmup-steps", "2", "--eval-iters", "1", "--sample-tokens", "0", "--log-every", "1",
        "--max-steps", "8", "--save-every", "2", "--dist-timeout", "120"]


def start(launcher, script, out):
    return subprocess.Popen(TORCHRUN + launcher + [script, *ARGS, "--out", str(out)], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(proc, timeout=300):
    try:
        log = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        log = proc.communicate()[0]
        pytest.fail(f"torchrun still running after {timeout} s:\n{log[-3000:]}")
    assert proc.returncode == 0, f"torchrun exit {proc.returncode}:\n{log[-3000:]}"
    return log


def losses(out):
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    # one history, no step twice
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, stdlib_data):
    """The losses of 8 steps on 2 ranks of one torchrun, nothing killed."""
    out = tmp_path_factory.mktemp("launch") / "whole"
    finish(start(["--nproc_per_node", "2", "--master-port", str(free_port())], "pretrain.py", out))
    return losses(out)


def test_a_killed_worker_is_restarted_and_the_run_continues_bit_for_bit(tmp_path, uninterrupted):
    """torchrun as the README starts it, with --max-restarts 1: rank 1 is killed (SIGKILL) in
    step 6; torchrun stops rank 0 and starts both again, which resume from step 4 and end with the
    uninterrupted run's losses. (Without a store of its own per attempt, the restarted rank 0 would
    connect to the dead rank's gloo port from the first attempt, and the run would fail or hang.)"""
    launcher = ["--nproc_per_node", "2", "--max-restarts", "1", "--master-port", str(free_port())]
    log = finish(start(launcher, "tests/killed_worker.py", tmp_path / "run"))
    # killed once, resumed from the last save
    assert "exitcode: -9" in log and "resuming at step 4" in log
    assert losses(tmp_path / "run") == uninterrupted


def test_two_nodes_on_one_machine_train_as_one_world(tmp_path, uninterrupted):
    """Two torchrun launchers of one process each (--nnodes 2), joined by the static rendezvous on
    localhost (--master-addr/--master-port, as docs/parallelism.md starts each node): the same world
    of 2 ranks as one launcher with 2, so the same losses, float for float. (Not c10d here: there,
    when the launcher that hosts the rendezvous store exits first, the other one, still polling it,
    can exit 1 after a run that succeeded.)"""
    endpoint = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    nodes = [start(["--nnodes", "2", "--nproc_per_node", "1", "--node-rank", str(n), *endpoint],
                   "pretrain.py", tmp_path / "run") for n in (0, 1)]
    for node in nodes:
        finish(node)
    assert losses(tmp_path / "run") == uninterrupted


def error_of(capsys, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        pretrain.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err, err
    return err


def test_a_second_run_on_one_folder_is_refused_naming_the_holder(tmp_path, capsys, stdlib_data):
    """While one process holds --out (launch.lock_run, as rank 0 of a run does), a run on the same
    folder is refused in one line naming it, --fresh too (nothing is moved); once the holder dies,
    however it dies, the folder is free again: the kernel dropped its lock."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time, launch\nlaunch.lock_run(sys.argv[1])\n"
                               "print('held', flush=True)\ntime.sleep(600)", str(out)], cwd=ROOT,
                              text=True, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = ["--model", "tiny", "--seq-len", "64", "--batch-size", "8", "--max-steps", "1",
                "--eval-iters", "1", "--sample-tokens", "0", "--out", str(out)]
        err = error_of(capsys, argv)
        assert err.startswith(f"pretrain.py: error: {out} is in use by another run "
                              f"(pid {holder.pid} on "), err
        assert err.endswith("wait for it to end, or give another --out")
        assert "started 20" in err and f"-c {out}" in err  # when, and its command line
        assert "is in use by another run" in error_of(capsys, argv + ["--fresh"])
        # nothing moved, no work
        assert not Path(f"{out}.1").exists() and not (out / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert pretrain.main(argv)["step"] == 1
    assert f"pid {os.getpid()} on " in (out / ".lock").read_text()
    # --fresh moves the old run aside, lock file and all, and locks the new folder against others.
    assert pretrain.main(argv + ["--fresh"])["step"] == 1
    assert (tmp_path / "run.1" / "step_000001").is_dir() and (out / "step_000001").is_dir()
    probe = subprocess.run([sys.executable, "-c",
                            "import sys, launch\ntry:\n    launch.lock_run(sys.argv[1])\n"
                            "except launch.ConfigError as e:\n    print(e)", str(out)], cwd=ROOT,
                           text=True, capture_output=True)
    assert f"{out} is in use by another run (pid {os.getpid()} on " in probe.stdout, probe


def test_a_rank_whose_peers_never_come_fails_in_one_line(tmp_path, capsys, monkeypatch,
                                                         stdlib_data):
    """Rank 0 of 2 whose peer never starts: one line after --dist-timeout, not a 30-minute wait."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    err = error_of(capsys, ["--model", "tiny", "--batch-size", "8", "--dist-timeout", "2",
                            "--out", str(tmp_path)])
    assert ("pretrain.py: error: rank 0 could not join the other 1 rank(s) "
            "through 127.0.0.1:") in err, err
    assert "within --dist-timeout 2 s" in err and not dist.is_initialized()

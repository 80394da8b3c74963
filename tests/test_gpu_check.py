"""make gpu-check's runner on the CPU, with stand-in commands: a row that hangs is killed with its
children, a row that crashes or raises leaves the table whole, rows that need more GPUs say skipped;
its plan holds the headline rows; MFU is against the peak of the run's precision."""
import sys
import time

import pytest

from benchmarks import gpu_check


def alive(pid):
    """Running (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_hanging_row_is_killed_with_its_children(tmp_path):
    """A command that starts a child and then both sleep (torchrun and a stuck worker): past its
    timeout the whole group goes, the child included, and the next row still runs."""
    pid_file = tmp_path / "child.pid"
    hang = [sys.executable, "-c", "import subprocess, sys, time; "
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(300)"]
    t0 = time.time()
    assert gpu_check.run(hang, timeout=3) is None
    assert time.time() - t0 < 30
    child = int(pid_file.read_text())
    for _ in range(50):  # (SIGKILL is delivered at once; its reaping by init may take a moment)
        if not alive(child):
            break
        time.sleep(0.1)
    assert not alive(child)


def test_a_crash_or_an_exception_leaves_the_table_whole(capsys):
    def boom():
        raise KeyError("no metrics")

    rows = [gpu_check.Row("fine", lambda: (True, "figures")),
            gpu_check.Row("crashes", lambda: gpu_check.status(
                gpu_check.run([sys.executable, "-c", "exit(3)"]), 9)),
            gpu_check.Row("raises", boom),
            gpu_check.Row("after", lambda: (True, ""))]
    assert gpu_check.run_checks(rows, 1) == 1
    table = capsys.readouterr().out.split("seconds  figures")[1]
    assert ([line.split()[0] for line in table.strip().splitlines()]
            == ["fine", "crashes", "raises", "after"])
    assert "FAIL" in table and "exit status 3" in table and "KeyError: 'no metrics'" in table


def test_an_interrupt_still_prints_the_table(capsys):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gpu_check.run_checks([gpu_check.Row("first", lambda: (True, "")),
                              gpu_check.Row("ctrl-c", interrupted),
                              gpu_check.Row("last", lambda: (True, ""))], 1)
    out = capsys.readouterr().out
    assert "first" in out and "last" in out and "not run" in out


def test_rows_that_need_more_gpus_are_skipped_not_passed(capsys):
    ran = []
    rows = [gpu_check.Row("one", lambda: (True, "")),
            gpu_check.Row("two", lambda: ran.append(1), gpus=2)]
    assert gpu_check.run_checks(rows, 1) == 0 and not ran
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("two")][0]
    assert "skipped (1 GPU)" in line and "pass" not in line


def test_the_plan_runs_the_headline_on_every_gpu(tmp_path):
    """8 GPUs: ZeRO-3 x tp 2 over all 8; the other multi-GPU layouts and the resume on another
    layout are there; on one GPU every multi-GPU row is one that run_checks skips."""
    rows = {r.name: r for r in gpu_check.plan(str(tmp_path), 8, "h100")}
    assert rows["ZeRO-3 x tp 2, 8 GPUs"].gpus == 8
    for name in ("1F1B, pp 2", "ring attention, cp 2", "MoE all-to-all, ep 2", "1 GPU, fp8",
                 "resume: tp 2 -> ZeRO-3 dp 2"):
        assert name in rows
    cmd = gpu_check.pretrain_cmd(8, "out", ["--zero", "3", "--tp", "2"], "h100")
    assert cmd[cmd.index("--nproc_per_node") + 1] == "8"
    one = gpu_check.plan(str(tmp_path), 1, None)
    assert {r.name for r in one if r.gpus > 1} >= {"ZeRO-3 x tp 2, 2 GPUs", "1F1B, pp 2",
                                                   "resume: tp 2 -> ZeRO-3 dp 2"}


def test_mfu_is_against_the_peak_of_the_runs_precision():
    """The log's MFU divides by bf16's peak: an fp8 run is at half of it against fp8's, an fp32
    (TF32) run at twice; an A100 has no fp8 peak to divide by."""
    rec = {"mfu": 0.4}
    assert "MFU 40.0% of bf16" in gpu_check.mfu(rec, "h100", "bf16")
    assert "MFU 20.0% of fp8" in gpu_check.mfu(rec, "h100", "fp8")
    assert "MFU 80.0% of fp32" in gpu_check.mfu(rec, "h100", "fp32")
    assert "n/a" in gpu_check.mfu(rec, "a100", "fp8") and "n/a" in gpu_check.mfu(rec, None, "bf16")


def test_run_leaves_no_straggler_after_a_normal_exit(tmp_path):
    """The leader exits 0 but leaves a child behind: it is killed too (it would hold its GPU)."""
    pid_file = tmp_path / "child.pid"
    code = gpu_check.run([sys.executable, "-c", "import subprocess, sys; "
                          "p = subprocess.Popen([sys.executable, '-c', "
                          "'import time; time.sleep(300)']); "
                          f"open({str(pid_file)!r}, 'w').write(str(p.pid))"], timeout=30)
    assert code == 0
    child = int(pid_file.read_text())
    for _ in range(50):
        if not alive(child):
            break
        time.sleep(0.1)
    assert not alive(child)

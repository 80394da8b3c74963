"""What a GPU run depends on, checked on the CPU: TF32 for fp32 runs on CUDA (matmuls and flash
attention's dots), the flat collectives under their older names, --compile refused with ZeRO-3,
throughput windows that leave evaluation and checkpoints out."""
import json
import subprocess
import sys
import time
import types

import torch

import metrics
import pretrain
import stack
import training
from tests.distributed import refused_before_any_group


def test_flash_fp32_dots_follow_torchs_matmul_precision():
    import flash_kernels  # (the Triton kernels' launcher)
    q = torch.zeros(1, 2, 8, 16)
    # Under the default "highest": exact dots, for tests.
    assert flash_kernels._meta(q, q, True, 0, None)["PRECISION"] == "ieee"
    try:
        torch.set_float32_matmul_precision("high")  # what pretrain.py sets for fp32 runs on CUDA
        assert flash_kernels._meta(q, q, True, 0, None)["PRECISION"] == "tf32"
        assert flash_kernels._meta(q.half(), q.half(), True, 0, None)["PRECISION"] == "tf32"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_older_torch_without_the_single_collectives():
    """Older releases lack all_gather_single / reduce_scatter_single: topology.py then binds the two
    names to all_gather_into_tensor / reduce_scatter_tensor (same arguments), and zero.py and
    tensor_parallel.py import them from there."""
    code = ("import torch.distributed as d; del d.all_gather_single, d.reduce_scatter_single; "
            "import topology, zero, tensor_parallel as tp; "
            "assert zero.all_gather_single is tp.all_gather_single is topology.all_gather_single"
            " is d.all_gather_into_tensor; "
            "assert zero.reduce_scatter_single is tp.reduce_scatter_single"
            " is topology.reduce_scatter_single is d.reduce_scatter_tensor")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})


def test_fp32_runs_on_cuda_use_tf32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    try:
        assert stack.setup_distributed("cuda")[2].type == "cuda"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_compile_with_zero3_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    err = refused_before_any_group(tmp_path, capsys, monkeypatch, 2, ["--compile", "--zero", "3"])
    assert "--compile with --zero 3" in err and "--zero 0-2" in err


def test_evaluation_and_saving_are_left_out_of_the_throughput_window(tmp_path, stdlib_data,
                                                                     monkeypatch):
    """A fake clock jumps 1000 s during every evaluation and save: the tokens/s of the window that
    follows must not see it (at a 16 x 32-token step per second, it would read below 1 token/s)."""
    offset = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0],
                                  time=time.time)
    for module in (training, metrics):  # the loop times its pauses, metrics.log_step the window
        monkeypatch.setattr(module, "time", clock)
    for name in ("evaluate", "save"):
        real = getattr(training, name)
        monkeypatch.setattr(training, name, lambda *a, real=real: (
            real(*a), offset.__setitem__(0, offset[0] + 1e3))[0])
    pretrain.main(["--model", "tiny", "--seq-len", "32", "--batch-size", "16", "--max-steps", "4",
                   "--eval-every", "1", "--save-every", "2", "--eval-iters", "1",
                   "--log-every", "1", "--sample-tokens", "0", "--device", "cpu",
                   "--out", str(tmp_path)])
    tps = [json.loads(l)["tokens_per_s"]
           for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if "tokens_per_s" in l]
    assert offset[0] >= 6e3 and len(tps) == 4 and min(tps) > 16 * 32 / 100, tps

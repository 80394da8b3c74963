"""What a GPU run depends on, checked on the CPU: tf32 dots for fp32 flash attention when a run asks for tf32,
and the flat collectives under their older names."""
import subprocess
import sys

import torch

import flash_attn


def test_flash_fp32_dots_follow_torchs_matmul_precision():
    q = torch.zeros(1, 2, 8, 16)
    assert flash_attn._meta(q, q, True)["PRECISION"] == "ieee"  # the default "highest": exact, for tests
    try:
        torch.set_float32_matmul_precision("high")  # what pretrain.py sets for fp32 runs on CUDA
        assert flash_attn._meta(q, q, True)["PRECISION"] == "tf32"
        assert flash_attn._meta(q.half(), q.half(), True)["PRECISION"] == "tf32"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_older_torch_without_the_single_collectives():
    """Older releases lack all_gather_single / reduce_scatter_single: zero.py and tensor_parallel.py then use
    all_gather_into_tensor / reduce_scatter_tensor (same arguments)."""
    code = ("import torch.distributed as d; del d.all_gather_single, d.reduce_scatter_single; "
            "import zero, tensor_parallel as tp; "
            "assert zero.all_gather_single is tp.all_gather_single is d.all_gather_into_tensor; "
            "assert zero.reduce_scatter_single is tp.reduce_scatter_single is d.reduce_scatter_tensor")
    subprocess.run([sys.executable, "-c", code], check=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})

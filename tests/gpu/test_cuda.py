"""On GPUs only (`make gpu-check`, which sets LLM_GPU_TESTS=1): the flash kernels on CUDA, and
2-rank NCCL runs of pretrain.py (DDP, ZeRO-3, tp 2, 1F1B on 2 stages) against one GPU. Every
multi-process run is a fresh torchrun, never a fork of this CUDA-initialised process."""
import json
import os
import subprocess
import sys

import pytest
import torch

from flash_attn import flash_attention
from model import naive_attention

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _attention_and_grads(f, q, k, v, do, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = f(*leaves)
    return [out.double(), *(g.double() for g in torch.autograd.grad(out, leaves, do.to(dtype)))]


@pytest.mark.parametrize("precision", ["highest", "high"])
def test_flash_attention_on_cuda_against_float64(precision):
    """bf16 within twice SDPA's error; fp32 with exact dots ("highest") to 1e-4, with tf32 dots
    ("high", what pretrain.py sets) to tf32's 10-bit mantissa."""
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, H_kv, N, D = 2, 8, 2, 1000, 128
    q, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.float64, generator=g)
             for _ in range(2))
    k, v = (torch.randn(B, H_kv, N, D, device="cuda", dtype=torch.float64, generator=g)
            for _ in range(2))
    want = _attention_and_grads(naive_attention, q, k, v, do, torch.float64)
    ours = lambda q, k, v: flash_attention(q, k, v, causal=True)
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True)
    torch.set_float32_matmul_precision(precision)
    try:
        fp32 = _attention_and_grads(ours, q, k, v, do, torch.float32)
        bf16 = _attention_and_grads(ours, q, k, v, do, torch.bfloat16)
        ref16 = _attention_and_grads(sdpa, q, k, v, do, torch.bfloat16)
    finally:
        torch.set_float32_matmul_precision("highest")
    tol = 1e-4 if precision == "highest" else 2e-2
    for name, a, b, c, w in zip(("out", "dq", "dk", "dv"), fp32, bf16, ref16, want):
        assert (a - w).abs().max() <= tol * (1 + w.abs().max()), (name, precision)
        assert (b - w).abs().max() <= 2 * (c - w).abs().max() + 1e-3, name


def _pretrain(tmp, nproc, extra):
    """pretrain.py on `nproc` GPUs (a fresh torchrun), 4 tiny-preset steps: the logged losses."""
    out = os.path.join(tmp, "-".join(extra) or "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "pretrain.py", "--device", "cuda", "--amp", "fp32", "--model", "tiny",
           "--batch-size", "16", "--seq-len", "128", "--max-steps", "4", "--log-every", "1",
           "--eval-every", "4", "--eval-iters", "2", "--sample-tokens", "0", "--out", out, *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=300)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory):
    return _pretrain(str(tmp_path_factory.mktemp("one")), 1, [])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("extra", [["--zero", "0"], ["--zero", "3"], ["--tp", "2"],
                                   ["--pp", "2", "--microbatches", "4"]],
                         ids=["ddp", "zero3", "tp2", "1f1b"])
def test_two_rank_nccl_run_matches_one_gpu(tmp_path, one_gpu, extra):
    """Completes on NCCL (no hang: 1F1B's sends are paired; no CPU tensor in a collective) and
    follows one GPU's losses (fp32 with TF32 matmuls, another summation order: 1e-2 relative)."""
    one = one_gpu
    two = _pretrain(str(tmp_path), 2, extra)
    assert two == pytest.approx(one, rel=1e-2)

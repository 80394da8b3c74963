"""gpu_check.py: what `make gpu-check` runs on a CUDA machine, ending in one table.

    1. the GPU tests (tests/gpu: flash kernels against float64; 2-rank NCCL runs of DDP, ZeRO-3, tp 2 and 1F1B
       against one GPU, when two GPUs are visible)
    2. `python flash_attn.py`: bf16 accuracy against SDPA, TFLOP/s against SDPA's flash and cuDNN backends, peak
       memory against naive attention (Triton autotunes 3 candidates per kernel on first use)
    3. pretrain.py on one GPU: the gpt2-124m preset (with the default corpus' byte vocabulary), bf16,
       16 x 1024 tokens per step, 30 steps: tokens/s and MFU of the last log window
    4. with two GPUs visible: pretrain.py on 2 ranks over NCCL, DDP and ZeRO-3, tokens/s

Sized for under 8 minutes on one H100/H200, Triton's autotuning included. Each step's output streams to the
terminal; the table at the end says what passed, with the figures and the seconds each took.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, env=None, timeout=600):
    t0 = time.time()
    try:
        ok = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    return ok, time.time() - t0


def last_log(out):
    """tokens/s, MFU and peak memory of the last logged step in out/metrics.jsonl."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return "no metrics"
    rec = [r for r in map(json.loads, open(path)) if "tokens_per_s" in r][-1]
    return (f"loss {rec['loss']:.3f}, {rec['tokens_per_s'] / 1e3:.0f}k tok/s, MFU {rec['mfu']:.1%}, "
            f"{rec['peak_mem_mb'] / 1024:.1f} GiB")


def pretrain(tmp, nproc, name, extra):
    out = os.path.join(tmp, name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "pretrain.py",
           "--device", "cuda", "--model", "gpt2-124m", "--amp", "bf16", "--seq-len", "1024", "--max-steps", "30",
           "--warmup-steps", "10", "--log-every", "10", "--eval-every", "1000", "--eval-iters", "2",
           "--save-every", "1000", "--sample-tokens", "0", "--out", out, *extra]
    ok, dt = run(cmd, timeout=240)
    return ok, dt, last_log(out)


def main():
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py: no CUDA device is visible: this check is for a GPU machine")
    n = torch.cuda.device_count()
    print(f"{torch.cuda.get_device_name()} x {n}, torch {torch.__version__}", flush=True)
    rows = []
    # (test_flash_attn.py's own CUDA test too: the CPU suite hides CUDA from it)
    ok, dt = run([sys.executable, "-m", "pytest", "-q", "tests/gpu", "tests/test_flash_attn.py", "-k", "cuda"],
                 env={"LLM_GPU_TESTS": "1"})
    rows.append(("GPU tests (tests/gpu)", ok, dt, "flash kernels; NCCL runs" + ("" if n > 1 else " skipped: 1 GPU")))
    ok, dt = run([sys.executable, "flash_attn.py"], timeout=300)
    rows.append(("python flash_attn.py", ok, dt, "accuracy, TFLOP/s and memory tables above"))
    with tempfile.TemporaryDirectory() as tmp:
        # batch 16 x 1024 per GPU: the global batch grows with the ranks
        ok, dt, figures = pretrain(tmp, 1, "one", ["--batch-size", "16"])
        rows.append(("pretrain.py, 1 GPU, gpt2-124m bf16", ok, dt, figures))
        if n > 1:
            for name, extra in (("ddp", ["--zero", "0"]), ("zero3", ["--zero", "3"])):
                ok, dt, figures = pretrain(tmp, 2, name, ["--batch-size", "32", *extra])
                rows.append((f"pretrain.py, 2 GPUs NCCL, {name}", ok, dt, figures))
    print(f"\n{'check':<34} {'result':<6} {'seconds':>7}  figures")
    for name, ok, dt, figures in rows:
        print(f"{name:<34} {'pass' if ok else 'FAIL':<6} {dt:>7.0f}  {figures}")
    sys.exit(0 if all(r[1] for r in rows) else 1)


if __name__ == "__main__":
    main()

"""gpu_check.py: what `make gpu-check` runs on a CUDA machine, ending in one table.

    1. the GPU tests (tests/gpu: flash kernels against float64; 2-rank NCCL runs of DDP, ZeRO-3,
       tp 2 and 1F1B against one GPU, when two GPUs are visible)
    2. `python flash_attn.py`: bf16 accuracy against SDPA, TFLOP/s against SDPA's flash and cuDNN
       backends, peak memory against naive attention (Triton autotunes 3 candidates per kernel
       on first use)
    3. pretrain.py on one GPU, the gpt2-124m preset (with the default corpus' byte vocabulary),
       16 x 1024 tokens per GPU and step, 30 steps, in bf16 and in fp8: tokens/s and MFU of the
       last log window
    4. with two GPUs or more: ZeRO-3 x tp 2 on every visible GPU (dp 4 x tp 2 on 8), DDP on every
       GPU, 1F1B over 2 stages, ring attention over cp 2 (flash), 4 experts over ep 2 (all-to-all),
       and a run stopped at step 10 on tp 2 and resumed on ZeRO-3 (another layout), whose step-20
       loss must match an uninterrupted run's

MFU is against the datasheet's dense peak of the run's precision (PEAK_BY_PRECISION: fp32 runs use
TF32 on CUDA, pretrain.py sets it; fp8 doubles bf16's); the training log's own figure is against
bf16's whatever the precision. Each row is a process group of its own (torchrun and its workers): on
its timeout the whole group is killed, the next row runs, and the table is printed whatever happened
(a crash, Ctrl-C). Rows that need more GPUs than are visible say so ("skipped (1 GPU)"), never
"pass". About 12 minutes on one H100/H200 (an estimate), Triton's autotuning included; more rows run
with more GPUs. Each row's output streams to the terminal.
"""
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import estimate  # noqa: E402  (the peak the training log's MFU divides by)

# Dense datasheet TFLOP/s per precision (no 2:4 sparsity). fp32 runs on CUDA use TF32 tensor cores.
# The A100 has no FP8 tensor cores.
PEAK_BY_PRECISION = {"h100": {"fp32": 494.7, "bf16": 989.4, "fp8": 1978.9},
                     "h200": {"fp32": 494.7, "bf16": 989.4, "fp8": 1978.9},
                     "a100": {"fp32": 156.0, "bf16": 312.0, "fp8": None}}
KILL_GRACE_S = 10  # after SIGTERM, before SIGKILL


@dataclasses.dataclass
class Row:
    """One line of the table: run() -> (ok, figures) for a machine with at least `gpus` GPUs."""
    name: str
    run: callable
    gpus: int = 1


def kill_group(proc, grace=KILL_GRACE_S):
    """SIGTERM to the command's whole process group (torchrun and its workers); `grace` seconds for
    the leader to exit; then SIGKILL to whatever of the group is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # nothing of the group is left
        return proc.wait()
    deadline = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def run(cmd, env=None, timeout=600):
    """cmd in a session of its own: its exit status, or None when it ran past `timeout` (killed)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                            start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        # Also after a normal exit: a worker left behind would hold its GPU through the next rows.
        kill_group(proc)


def status(code, timeout):
    """(ok, figures) of a command's exit status from run()."""
    return (code == 0, "" if code == 0
            else f"timed out after {timeout} s: process group killed" if code is None
            else f"exit status {code}")


def run_checks(rows, n_gpus):
    """Every row in turn, then the table whatever happens. Exit status: 1 if a row failed."""
    results = []
    try:
        for row in rows:
            if n_gpus < row.gpus:
                results.append((row.name, f"skipped ({n_gpus} GPU{'s' if n_gpus > 1 else ''})", 0.0,
                                f"needs {row.gpus}"))
                continue
            print(f"\n=== {row.name}", flush=True)
            t0 = time.time()
            try:
                ok, figures = row.run()
            except Exception as e:  # a row that dies takes only itself down
                ok, figures = False, f"{type(e).__name__}: {e}"
            results.append((row.name, "pass" if ok else "FAIL", time.time() - t0, figures))
    finally:
        done = {r[0] for r in results}
        results += [(row.name, "not run", 0.0, "interrupted") for row in rows
                    if row.name not in done]
        width = max(len(r[0]) for r in results) if results else 5
        print(f"\n{'check':<{width}} {'result':<16} {'seconds':>7}  figures")
        for name, result, dt, figures in results:
            print(f"{name:<{width}} {result:<16} {dt:>7.0f}  {figures}", flush=True)
    return 1 if any(r[1] in ("FAIL", "not run") for r in results) else 0


def mfu(rec, gpu, precision):
    """MFU of the run precision's peak, from the log's (of bf16's: estimate.PEAK_TFLOPS)."""
    if gpu is None:
        return "MFU n/a (unknown GPU)"
    peak = PEAK_BY_PRECISION[gpu][precision]
    if peak is None:
        return f"MFU n/a (no {precision} on {gpu})"
    return (f"MFU {rec['mfu'] * estimate.PEAK_TFLOPS[gpu] / peak:.1%} of {precision} "
            f"{peak:.0f} TFLOP/s")


def last_log(out):
    """The last logged step of out/metrics.jsonl that has throughput figures."""
    path = os.path.join(out, "metrics.jsonl")
    recs = ([r for r in map(json.loads, open(path)) if "tokens_per_s" in r]
            if os.path.exists(path) else [])
    if not recs:
        raise RuntimeError(f"no throughput logged in {path}")
    return recs[-1]


def pretrain_cmd(nproc, out, extra, gpu):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "pretrain.py", "--device", "cuda", "--model", "gpt2-124m", "--seq-len", "1024",
            "--max-steps", "30", "--warmup-steps", "10", "--log-every", "10",
            "--eval-every", "1000", "--eval-iters", "2", "--save-every", "1000",
            "--sample-tokens", "0", *(["--gpu", gpu] if gpu else []), "--out", out, *extra]


def pretrain_row(name, tmp, nproc, extra, gpu, precision="bf16", timeout=300):
    """A short pretrain.py run on `nproc` GPUs: tokens/s, MFU and memory of the last window."""
    def go():
        out = os.path.join(tmp, name.replace(" ", "_").replace(",", ""))
        code = run(pretrain_cmd(nproc, out, ["--amp", precision, *extra], gpu), timeout=timeout)
        if code != 0:
            return status(code, timeout)
        rec = last_log(out)
        return True, (f"loss {rec['loss']:.3f}, {rec['tokens_per_s'] / 1e3:.0f}k tok/s, "
                      f"{mfu(rec, gpu, precision)}, {rec['peak_mem_mb'] / 1024:.1f} GiB")
    return Row(name, go, nproc)


def resume_row(tmp, gpu, timeout=300):
    """Steps 1-10 on tp 2, 11-20 resumed on ZeRO-3 over dp 2, against 20 uninterrupted steps on
    tp 2: the same batches and model, so the step-20 losses agree up to bf16's reduction order."""
    def go():
        common = ["--amp", "bf16", "--batch-size", "32", "--max-steps", "20", "--save-every", "10"]
        whole, parts = os.path.join(tmp, "resume_whole"), os.path.join(tmp, "resume_parts")
        for out, extra in ((whole, ["--tp", "2"]), (parts, ["--tp", "2", "--stop-after", "10"]),
                           (parts, ["--zero", "3", "--resume"])):
            code = run(pretrain_cmd(2, out, [*common, *extra], gpu), timeout=timeout)
            if code != 0:
                return status(code, timeout)
        a, b = last_log(whole), last_log(parts)
        diff = abs(a["loss"] - b["loss"])
        return (a["step"] == b["step"] == 20 and diff < 0.02,
                f"step-20 loss {a['loss']:.4f} uninterrupted, "
                f"{b['loss']:.4f} resumed on another layout")
    return Row("resume: tp 2 -> ZeRO-3 dp 2", go, 2)


def plan(tmp, n, gpu):
    """The rows, for n visible GPUs of kind `gpu` (a PEAK_BY_PRECISION key, or None)."""
    tests = [sys.executable, "-m", "pytest", "-q", "tests/gpu", "tests/test_flash_attn.py",
             "-k", "cuda"]
    even = max(2, n - n % 2)  # ZeRO-3 x tp 2 on every GPU (tp 2 needs an even count)
    return [
        Row("GPU tests (tests/gpu)", lambda: status(run(tests, {"LLM_GPU_TESTS": "1"}), 600)),
        Row("python flash_attn.py",
            lambda: status(run([sys.executable, "flash_attn.py"], timeout=300), 300)),
        pretrain_row("1 GPU, bf16", tmp, 1, ["--batch-size", "16"], gpu),
        pretrain_row("1 GPU, fp8", tmp, 1, ["--batch-size", "16"], gpu, precision="fp8"),
        pretrain_row(f"ZeRO-3 x tp 2, {even} GPUs", tmp, even,
                     ["--zero", "3", "--tp", "2", "--batch-size", str(16 * even // 2)], gpu),
        pretrain_row(f"DDP, {max(n, 2)} GPUs", tmp, max(n, 2),
                     ["--zero", "0", "--batch-size", str(16 * max(n, 2))], gpu),
        pretrain_row("1F1B, pp 2", tmp, 2,
                     ["--pp", "2", "--microbatches", "4", "--batch-size", "16"], gpu),
        pretrain_row("ring attention, cp 2", tmp, 2,
                     ["--cp", "2", "--attn", "flash", "--batch-size", "16"], gpu),
        pretrain_row("MoE all-to-all, ep 2", tmp, 2,
                     ["--experts", "4", "--ep", "2", "--batch-size", "32"], gpu),
        resume_row(tmp, gpu),
    ]


def main():
    import torch
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py: no CUDA device is visible: this check is for a GPU machine")
    n, name = torch.cuda.device_count(), torch.cuda.get_device_name()
    gpu = next((k for k in PEAK_BY_PRECISION if k in name.lower()), None)
    print(f"{name} x {n}, torch {torch.__version__}"
          + ("" if gpu else ": no datasheet peak known, MFU n/a"), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        sys.exit(run_checks(plan(tmp, n, gpu), n))


if __name__ == "__main__":
    main()

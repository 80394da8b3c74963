"""estimate.py: the lecture's arithmetic as a calculator: parameters, FLOPs, scaling laws, memory, time.

The idea: before spending a GPU-month, compute what it buys. For a model of N parameters trained on D tokens:
    FLOPs per token   6 N + 6 L d T         (2 per weight forward, 4 backward; the causal attention scores' term)
    training FLOPs    C = 6 N D (+ attention)                                  (Kaplan et al. 2020)
    compute-optimal   D = 20 N tokens                                          (Hoffmann et al. 2022, Chinchilla)
    time              C / (peak FLOP/s x GPUs x MFU)
    model states      per GPU, mixed-precision Adam, Psi parameters, N_d data-parallel ranks (Rajbhandari et al.):
                      DDP 2Psi + 2Psi + 12Psi;  ZeRO-1 2Psi + 2Psi + 12Psi/N_d;  ZeRO-2 2Psi + 14Psi/N_d;
                      ZeRO-3 16Psi/N_d
    communication     per GPU per step: all-reduce 2Psi (ring: 2 (N_d-1)/N_d Psi); ZeRO-1/2 the same as a
                      reduce-scatter plus an all-gather (stage 1 reduces all gradients: 3Psi here); ZeRO-3 3Psi
With experts (moe.py) the parameters grow E-fold in the MoE MLPs but a token only meets k of them: the FLOPs
follow the *active* parameters, the memory the *total*.

The counts come from the model as built, on the meta device (no memory is allocated), so they cannot drift
from model.py. Run: `python pretrain.py --model gpt2-124m --estimate --chinchilla --gpus 8 --gpu h100`.
"""
import resource
import time

import torch

from model import PRESETS, Transformer, flops_per_token, num_params
from moe import add_moe, inactive_params, parse_layers

PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}  # dense bf16 tensor-core peaks, datasheets


def estimate(args):
    """The lecture's arithmetic on the model as built (on the meta device: no memory is allocated)."""
    cfg = PRESETS[args.model]
    T = args.seq_len or cfg.block_size
    with torch.device("meta"):
        model = Transformer(cfg)
        if getattr(args, "experts", 0):
            add_moe(model, args.experts, args.topk, layers=parse_layers(args.moe_layers, cfg.n_layer))
    n, n_mm = num_params(model), num_params(model, matmul_only=True) - inactive_params(model)
    fpt = flops_per_token(cfg, n_mm, T)
    tokens = args.tokens or (20 * n if args.chinchilla else (args.max_steps or 1000) * args.batch_size * T)
    total = fpt * tokens
    peak = PEAK_TFLOPS[args.gpu] * 1e12
    seconds = total / (peak * args.gpus * args.mfu)
    gib = 2 ** 30
    rows = [
        ("model", f"{args.model}: {cfg.n_layer} layers, d={cfg.d_model}, {cfg.n_head} heads "
                  f"({cfg.n_kv_head} KV), d_ff={cfg.d_ff}, vocab {cfg.vocab_size}, T={T}"),
        ("parameters", f"{n:,} ({n_mm:,} in matmuls that a token meets; the embedding is a lookup"
                       + (f"; {args.experts} experts, top-{args.topk}: {n - n_mm - cfg.vocab_size * cfg.d_model:,}"
                          " expert parameters idle per token)" if getattr(args, "experts", 0) else ")")),
        ("FLOPs per token", f"{fpt:.4g} = 6 x {n_mm:,} + 12 x {cfg.n_layer} x {cfg.d_model} x {T}"),
        ("Chinchilla tokens", f"{20 * n:.4g} (20 per parameter)"),
        ("planned tokens", f"{tokens:.4g}" + (" (Chinchilla)" if args.chinchilla else "")),
        ("training FLOPs", f"{total:.4g} (6ND = {6 * n_mm * tokens:.4g} without attention)"),
        ("model states / GPU", f"{16 * n / gib:.2f} GiB = 16 bytes x N (2 weights + 2 grads + 12 fp32 master, "
                               f"Adam m and v), no sharding"),
        ("training time", f"{seconds / 3600:.2f} h = {seconds / 86400:.2f} days on {args.gpus} x {args.gpu} "
                          f"at {args.mfu:.0%} MFU of {PEAK_TFLOPS[args.gpu]:.0f} TFLOP/s"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    zero = zero_table(n, args.gpus)
    print(f"\nZeRO over {args.gpus} data-parallel GPUs (model states per GPU; elements sent per GPU per step, "
          f"ring collectives, x2 bytes in 16 bits):")
    print(f"{'stage':<7}{'weights':>11}{'grads':>11}{'optimizer':>11}{'total':>11}   communication")
    for r in zero:
        print(f"{r['stage']:<7}" + "".join(f"{r[k] / gib:>8.2f} GiB"[-11:] for k in ("params", "grads", "optimizer",
                                                                                        "total"))
              + f"   {r['comm_elements']:.3g} = {r['comm']}")
    return {"params": n, "matmul_params": n_mm, "flops_per_token": fpt, "tokens": tokens, "seconds": seconds,
            "zero": zero}


def zero_table(n, gpus):
    """Model-state bytes per GPU and elements sent per GPU per step for DDP and ZeRO 1-3 (the ZeRO paper's
    accounting: 2 bytes of 16-bit weights, 2 of gradients, K = 12 of fp32 master, momentum and variance)."""
    N, K = gpus, 12
    ring = (N - 1) / N * n  # one reduce-scatter or one all-gather of n elements; an all-reduce is both
    rows = [(0, 2 * n, 2 * n, K * n, 2 * ring, "all-reduce of gradients"),
            (1, 2 * n, 2 * n, K * n / N, 3 * ring, "all-reduce of gradients + all-gather of weights"),
            (2, 2 * n, 2 * n / N, K * n / N, 2 * ring, "reduce-scatter of gradients + all-gather of weights"),
            (3, 2 * n / N, 2 * n / N, K * n / N, 3 * ring,
             "all-gather in forward + all-gather in backward + reduce-scatter")]
    return [{"stage": s, "params": p, "grads": g, "optimizer": o, "total": p + g + o, "comm_elements": c,
             "comm": how} for s, p, g, o, c, how in rows]


def peak_flops(device, dtype, gpu="h100"):
    """The denominator of MFU: the GPU's datasheet peak, or on a CPU the matmul throughput measured now
    (there is no meaningful datasheet figure for a shared CPU)."""
    if device.type == "cuda":
        return PEAK_TFLOPS[gpu] * 1e12
    a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(8):
        a @ b
    return 8 * 2 * 512 ** 3 / (time.perf_counter() - t0)


def peak_memory_mb(device):
    """The log's memory figure: the CUDA allocator's peak, or on a CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

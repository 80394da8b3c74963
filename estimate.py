"""estimate.py: the lecture's arithmetic: parameters, FLOPs, memory, communication and time.

The idea: before spending a GPU-month, compute what it buys, for any shape and any layout of the
GPUs. For N parameters, D tokens, L layers of width h (= d_model), a heads, context s, micro-batch b
per GPU:
    FLOPs per token   6 N + 6 L h s: 2 per weight forward, 4 backward; 6 L h s for the causal
                      attention scores                                          (Kaplan 2020)
    training FLOPs    C = 6 N D (+ attention); compute-optimal D = 20 N (Hoffmann 2022, Chinchilla)
    time              C / (peak FLOP/s x GPUs x MFU)
    model states      per GPU, mixed-precision Adam: 2 bytes of 16-bit weights, 2 of gradients,
                      12 of fp32 master, momentum and variance per parameter; tp x pp divide the
                      parameters; ZeRO over the dp ranks: stage 1 divides the 12, stage 2 also the
                      gradients, stage 3 everything                 (Rajbhandari et al. 2020)
    activations       bytes per layer, 16-bit                       (Korthikanti et al. 2022)
                      no recomputation:         s b h (34 + 5 a s / h)
                      tensor parallel over t:   s b h (10 + 24/t + 5 a s / (h t))
                      + sequence parallel:      s b h (34/t + 5 a s / (h t))
                      selective (attention):    s b h (10 + 24/t), or 34 s b h / t with sp
                      full (keep block input):  2 s b h (/t with sp)
                      per GPU: L/p layers x the micro-batches in flight (1F1B: p on the first
                      stage; GPipe: m)
    communication     bytes sent per GPU per step, ring collectives (an all-reduce of n elements
                      sends 2 (k-1)/k n over k ranks; a reduce-scatter or all-gather (k-1)/k n):
                      dp: all-reduce of gradients (ZeRO-1: + all-gather of weights; ZeRO-3:
                          2 all-gathers + reduce-scatter);
                      tp: 4 all-reduces of s b h per layer per micro-batch (2 forward,
                          2 backward; with sp the same volume as all-gathers and reduce-scatters);
                      pp: s b h forward and back per micro-batch;
                      ep: 4 all-to-alls of k s b h per MoE layer per micro-batch
    pipeline bubble   (p - 1) / (m + p - 1) of each step idle
The counts come from the model as built on the meta device (no memory is allocated), so they cannot
drift from model.py. With experts (moe.py) FLOPs follow the parameters a token meets, memory all of
them. Units: GB = 1e9 bytes, as the papers print them; GiB = 2^30 bytes beside them. A run's own MFU
denominator and memory figure (peak_flops, peak_memory_mb) live here too; measure_memory.py checks
the memory formulas against the bytes a real step holds.

Run: `python estimate.py --model gpt2-124m --chinchilla --gpus 8`, `python estimate.py --params 70e9
--gpus 1024 --tp 8 --pp 8 --zero 1 --sequence-parallel`, or any shape: `--n-layer 32 --d-model 4096
--n-head 32 ...`.
"""
import math
import resource
import sys
import time
from dataclasses import dataclass, replace

import torch

from flags import OneLineParser
from model import PRESETS, ModelConfig, Transformer, flops_per_token, num_params, pad_vocab
from moe import add_moe, inactive_params, parse_layers
from tensor_parallel import check_divisible

# dense bf16 tensor-core peaks, datasheets
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}
# bytes per parameter, mixed-precision Adam
WEIGHT, GRAD, ADAM = 2, 2, 12
RECOMPUTE = ("none", "selective", "full")
SHAPE_FLAGS = ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "vocab_size")  # a custom shape


class EstimateError(ValueError):
    """A flag that makes no sense: its message is the one line the user sees."""


def build_parser():
    ap = OneLineParser(prog="estimate.py", description="Parameters, FLOPs, memory, "
                                                       "communication, time.")
    a = ap.add_argument
    a("--model", default="gpt2-124m", choices=sorted(PRESETS),
      help="preset to start from (model.py)")
    a("--params", type=float, default=None, help="a shape of about this many parameters (d_model "
                                                 "= 128 n_layer)")
    for f in ("n-layer", "d-model", "n-head", "n-kv-head", "d-ff", "vocab-size"):
        a(f"--{f}", type=int, default=None, help="override the preset's " + f.replace("-", "_"))
    a("--seq-len", type=int, default=None, help="context s (a preset's at most; a custom shape "
                                                "is built for it)")
    a("--batch-size", type=int, default=None, help="global batch in sequences (default: 1 per "
                                                   "GPU micro-step)")
    a("--grad-accum", type=int, default=1)
    a("--max-steps", type=int, default=None, help="optimizer steps (default 1000) unless "
                                                  "--tokens/--chinchilla")
    a("--tokens", type=float, default=None, help="train on this many tokens")
    a("--chinchilla", action="store_true", help="train on 20 tokens per parameter")
    a("--gpus", type=int, default=1)
    a("--gpu", default="h100", choices=sorted(PEAK_TFLOPS))
    a("--mfu", type=float, default=0.4, help="the model FLOPs utilisation to assume, in (0, 1]")
    a("--tp", type=int, default=1, help="tensor-parallel ranks")
    a("--pp", type=int, default=1, help="pipeline stages")
    a("--microbatches", type=int, default=1, help="pipeline micro-batches per micro-step (m)")
    a("--pp-schedule", default="1f1b", choices=("gpipe", "1f1b"))
    a("--zero", type=int, default=0, choices=[0, 1, 2, 3],
      help="ZeRO stage over the data-parallel ranks")
    a("--sequence-parallel", action="store_true")
    a("--recompute", default="none", choices=RECOMPUTE, help="activation recomputation")
    a("--experts", type=int, default=0, help="experts per MoE layer (0: dense)")
    a("--topk", type=int, default=2)
    a("--moe-layers", default="all")
    a("--ep", type=int, default=1, help="expert-parallel ranks, taken from the data-parallel ranks")
    return ap


@dataclass(frozen=True)
class Plan:
    """The calculator's flags, parsed once (main); None: the default the flag's help names."""
    model: str
    params: float
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    d_ff: int
    vocab_size: int
    seq_len: int
    batch_size: int
    grad_accum: int
    max_steps: int
    tokens: float
    chinchilla: bool
    gpus: int
    gpu: str
    mfu: float
    tp: int
    pp: int
    microbatches: int
    pp_schedule: str
    zero: int
    sequence_parallel: bool
    recompute: str
    experts: int
    topk: int
    moe_layers: str
    ep: int


# ------------------------------------------------------------------------- the shape and the layout
def shape_for(n_params, vocab=50304):
    """A Llama-like shape of about n_params: d ~ 128 L (Llama-2 7B: L = 32, d = 4096), heads of 128
    (a multiple of 8 heads from d = 1024 on, so that tp = 8 divides them), d_ff ~ 8/3 d;
    N ~ 12 L d^2 + 2 V d."""
    approx = {L: 12 * L * (128 * L) ** 2 + 2 * vocab * 128 * L for L in range(1, 256)}
    # The nearest by ratio (near 1e30 a difference of floats is 1e30 for every L: the first wins).
    L = min(approx, key=lambda L: abs(math.log(approx[L] / n_params)))
    if not 0.5 <= approx[L] / n_params <= 2:
        raise EstimateError(f"--params {n_params:g}: the shapes built here (d = 128 x layers, 1 "
                            f"to 255 layers) span about {approx[1]:.3g} to {approx[255]:.3g} "
                            "parameters; give --params in that range, or a shape (--n-layer, "
                            "--d-model, --vocab-size)")
    d = 128 * L if L < 8 else round(L / 8) * 1024
    return ModelConfig(n_layer=L, d_model=d, n_head=d // 128, n_kv_head=d // 128,
                       d_ff=(8 * d // 3 + 255) // 256 * 256, vocab_size=vocab, block_size=2048)


def config_from(plan):
    """The model config the flags describe, checked."""
    for f in ("mfu", "tokens", "params"):
        if getattr(plan, f) is not None and not math.isfinite(getattr(plan, f)):
            raise EstimateError(f"--{f} must be a finite number, got {getattr(plan, f)}")
    for f in ("params", "n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "vocab_size",
              "seq_len"):
        v = getattr(plan, f)
        if v is not None and v <= 0:
            raise EstimateError(f"--{f.replace('_', '-')} must be positive, got {v:g}")
    cfg = shape_for(plan.params) if plan.params else PRESETS[plan.model]
    custom = {f: getattr(plan, f) for f in SHAPE_FLAGS if getattr(plan, f) is not None}
    if plan.seq_len and plan.seq_len > cfg.block_size and not (custom or plan.params):
        raise EstimateError(f"--seq-len {plan.seq_len} is beyond the context of model "
                            f"{plan.model!r} ({cfg.block_size}): use at most {cfg.block_size}, or "
                            "give a custom shape")
    if "n_head" in custom and "n_kv_head" not in custom:
        custom["n_kv_head"] = custom["n_head"]
    cfg = replace(cfg, **custom, block_size=max(cfg.block_size, plan.seq_len or 0))
    if "vocab_size" in custom:
        cfg = replace(cfg, vocab_size=pad_vocab(cfg.vocab_size))
    if cfg.d_model % cfg.n_head or cfg.head_dim % 2:
        raise EstimateError(f"--n-head {cfg.n_head} must divide --d-model {cfg.d_model} into an "
                            "even head size")
    if cfg.n_head % cfg.n_kv_head:
        raise EstimateError(f"--n-kv-head {cfg.n_kv_head} must divide --n-head {cfg.n_head}")
    return cfg


def layout_from(plan, cfg):
    """(dp, micro-batch b per GPU, micro-batches per GPU per step, global batch), checked."""
    if plan.gpus < 1:
        raise EstimateError(f"--gpus must be at least 1, got {plan.gpus}")
    if not 0 < plan.mfu <= 1:
        raise EstimateError(f"--mfu must be in (0, 1] (a fraction of the peak, e.g. 0.4), got "
                            f"{plan.mfu:g}")
    if plan.tokens is not None and plan.tokens < 1:
        raise EstimateError(f"--tokens must be at least 1 (the tokens to train on), got "
                            f"{plan.tokens:g}")
    for f in ("tp", "pp", "ep", "microbatches", "grad_accum", "max_steps", "batch_size"):
        if (v := getattr(plan, f)) is not None and v < 1:
            raise EstimateError(f"--{f.replace('_', '-')} must be at least 1, got {v}")
    if plan.gpus % (plan.tp * plan.pp):
        raise EstimateError(f"--gpus {plan.gpus} is not a multiple of --tp {plan.tp} x --pp "
                            f"{plan.pp}: the layout is dp x tp x pp = GPUs")
    dp = plan.gpus // (plan.tp * plan.pp)
    if err := check_divisible(cfg, plan.tp):
        raise EstimateError(err)
    if plan.pp > cfg.n_layer:
        raise EstimateError(f"--pp {plan.pp} is more stages than the model's {cfg.n_layer} layers")
    T = plan.seq_len or cfg.block_size
    if plan.sequence_parallel and (plan.tp == 1 or T % plan.tp):
        raise EstimateError(f"--sequence-parallel needs --tp > 1 dividing --seq-len {T}")
    if plan.ep > 1 and (dp % plan.ep or not plan.experts or plan.experts % plan.ep):
        raise EstimateError(f"--ep {plan.ep} must divide the {dp} data-parallel ranks and "
                            f"--experts {plan.experts}")
    micro = dp * plan.grad_accum * plan.microbatches  # micro-batches per step, over all replicas
    batch = plan.batch_size or micro
    if batch % micro:
        raise EstimateError(f"--batch-size {batch} does not divide into {dp} data-parallel ranks x "
                            f"--grad-accum {plan.grad_accum} x --microbatches {plan.microbatches}: "
                            f"use a multiple of {micro}")
    return dp, batch // micro, plan.grad_accum * plan.microbatches, batch


# ----------------------------------------------------------------------------- the formulas
def zero_table(n, gpus):
    """Model-state bytes per GPU and elements sent per GPU per step for DDP and ZeRO 1-3 (the ZeRO
    paper's accounting: 2 bytes of 16-bit weights, 2 of gradients, K = 12 of fp32 master, momentum
    and variance)."""
    N, K = gpus, ADAM
    # one reduce-scatter or one all-gather of n elements; an all-reduce is both
    ring = (N - 1) / N * n
    rows = [(0, 2 * n, 2 * n, K * n, 2 * ring, "all-reduce of gradients"),
            (1, 2 * n, 2 * n, K * n / N, 3 * ring,
             "all-reduce of gradients + all-gather of weights"),
            (2, 2 * n, 2 * n / N, K * n / N, 2 * ring,
             "reduce-scatter of gradients + all-gather of weights"),
            (3, 2 * n / N, 2 * n / N, K * n / N, 3 * ring,
             "all-gather in forward + all-gather in backward + reduce-scatter")]
    return [{"stage": s, "params": p, "grads": g, "optimizer": o, "total": p + g + o,
             "comm_elements": c, "comm": how} for s, p, g, o, c, how in rows]


def peak_flops(device, dtype, gpu="h100"):
    """The denominator of MFU: the GPU's datasheet peak, or on a CPU the matmul throughput measured
    now (there is no meaningful datasheet figure for a shared CPU)."""
    if device.type == "cuda":
        return PEAK_TFLOPS[gpu] * 1e12
    a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(8):
        a @ b
    return 8 * 2 * 512 ** 3 / (time.perf_counter() - t0)


def peak_memory_mb(device):
    """The log's memory figure: the CUDA allocator's peak, or on a CPU the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def activations_per_layer(s, b, h, a, t=1, sp=False, recompute="none"):
    """Bytes of 16-bit activations one transformer layer keeps for backward (Korthikanti et al.)."""
    if recompute == "full":
        return 2 * s * b * h / (t if sp else 1)
    if recompute == "selective":
        return s * b * h * (34 / t if sp else 10 + 24 / t)
    return s * b * h * ((34 / t if sp else 10 + 24 / t) + 5 * a * s / (h * t))


def stage_params(model, pp, ep):
    """Parameters held by the busiest pipeline stage (blocks split as evenly as pipeline.py does;
    the embedding on the first stage, the final norm and head on the last), expert parameters
    divided over ep."""
    per_block = [sum(p.numel() / (ep if "experts" in name else 1)
                     for name, p in blk.named_parameters())
                 for blk in model.blocks]
    base, extra = divmod(len(per_block), pp)
    sizes = [base + (i < extra) for i in range(pp)]
    starts = [sum(sizes[:i]) for i in range(pp)]
    held = [sum(per_block[st:st + n]) for st, n in zip(starts, sizes)]
    held[0] += model.tok_emb.weight.numel()
    held[-1] += model.lm_head.weight.numel() + model.norm.weight.numel()
    return max(held), max(sizes)


def memory_per_gpu(cfg, plan, model, dp, b, T):
    """Bytes per GPU of each kind, on the busiest stage, with ZeRO over dp."""
    psi, layers = stage_params(model, plan.pp, plan.ep)
    psi /= plan.tp  # (the norms' weights are replicated over tp, not split: a rounding error here)
    z = zero_table(psi, dp)[plan.zero]
    in_flight = min(plan.pp, plan.microbatches) if plan.pp_schedule == "1f1b" else plan.microbatches
    act = activations_per_layer(T, b, cfg.d_model, cfg.n_head, plan.tp, plan.sequence_parallel,
                                plan.recompute)
    logits = 4 * T * b * cfg.vocab_size / plan.tp if plan.pp == 1 else 0  # fp32, the last stage
    return {"weights": z["params"], "gradients": z["grads"], "optimizer states": z["optimizer"],
            "activations": act * layers * in_flight + logits, "psi": psi, "per_layer": act,
            "layers": layers, "in_flight": in_flight}


def comm_per_gpu(cfg, plan, psi, dp, b, T, n_micro, moe_layers):
    """Bytes each GPU sends per optimizer step, per parallelism (16-bit elements)."""
    sbh, t, p = T * b * cfg.d_model, plan.tp, plan.pp
    layers = math.ceil(cfg.n_layer / p)
    rows = {}
    if dp > 1:
        how = zero_table(1, 2)[plan.zero]["comm"]
        rows["dp"] = (2 * zero_table(psi, dp)[plan.zero]["comm_elements"],
                      ("DDP" if plan.zero == 0 else f"ZeRO-{plan.zero}") + ": " + how)
    if t > 1:
        per_layer = (6 if plan.recompute == "full" else 4) * 2 * (t - 1) / t * sbh
        what = "2 all-gathers + 2 reduce-scatters" if plan.sequence_parallel else "4 all-reduces"
        rows["tp"] = (2 * per_layer * layers * n_micro,
                      f"{what} of s b h per layer per micro-batch"
                      + (" (+2 recomputed)" if plan.recompute == "full" else ""))
    if p > 1:
        rows["pp"] = (2 * 2 * sbh / (t if plan.sequence_parallel else 1) * n_micro,
                      "activations forward + their gradients back, per micro-batch "
                      "(a middle stage)")
    if plan.ep > 1:
        rows["ep"] = (2 * 4 * plan.topk * sbh * (plan.ep - 1) / plan.ep * moe_layers / p * n_micro,
                      "dispatch + combine all-to-all, forward and backward, per MoE layer")
    return rows


# ----------------------------------------------------------------------------- the slides
def gb(x):
    return f"{x / 1e9:,.3f} GB ({x / 2 ** 30:,.3f} GiB)"


def estimate(plan):
    """Everything above for the flags in `plan`; prints the table and returns the numbers."""
    cfg = config_from(plan)
    dp, b, n_micro, batch = layout_from(plan, cfg)
    T = plan.seq_len or cfg.block_size
    layers = parse_layers(plan.moe_layers, cfg.n_layer) if plan.experts else None
    with torch.device("meta"):
        model = Transformer(cfg)
        if plan.experts:
            add_moe(model, plan.experts, plan.topk, layers=layers)
    n, n_mm = num_params(model), num_params(model, matmul_only=True) - inactive_params(model)
    fpt = flops_per_token(cfg, n_mm, T)
    tokens = plan.tokens or (20 * n if plan.chinchilla else (plan.max_steps or 1000) * batch * T)
    total = fpt * tokens
    seconds = total / (PEAK_TFLOPS[plan.gpu] * 1e12 * plan.gpus * plan.mfu)
    mem = memory_per_gpu(cfg, plan, model, dp, b, T)
    moe_layers = (cfg.n_layer if layers is None else len(layers)) if plan.experts else 0
    comm = comm_per_gpu(cfg, plan, mem["psi"], dp, b, T, n_micro, moe_layers)
    bubble = (plan.pp - 1) / (plan.microbatches + plan.pp - 1)
    custom = " with custom dimensions" if any(getattr(plan, f) for f in SHAPE_FLAGS) else ""
    name = f"--params {plan.params:.3g}" if plan.params else plan.model + custom
    idle = n - n_mm - cfg.vocab_size * cfg.d_model
    rows = [
        ("model", f"{name}: {cfg.n_layer} layers, d={cfg.d_model}, {cfg.n_head} heads "
                  f"({cfg.n_kv_head} KV), d_ff={cfg.d_ff}, vocab {cfg.vocab_size}, s={T}"),
        ("parameters", f"{n:,} ({n_mm:,} in matmuls that a token meets; the embedding is a lookup"
                       + (f"; {plan.experts} experts, top-{plan.topk}: {idle:,} expert "
                          "parameters idle per token)" if plan.experts else ")")),
        ("FLOPs per token", f"{fpt:.4g} = 6 x {n_mm:,} + 6 x {cfg.n_layer} x {cfg.d_model} x {T}"),
        ("Chinchilla tokens", f"{20 * n:.4g} (20 per parameter)"),
        ("planned tokens", f"{tokens:.4g}"
                           + (" (Chinchilla)" if plan.chinchilla and not plan.tokens else "")),
        ("training FLOPs", f"{total:.4g} (6ND = {6 * n_mm * tokens:.4g} without attention)"),
        ("training time", f"{seconds / 3600:,.2f} h = {seconds / 86400:,.2f} days on {plan.gpus} x "
                          f"{plan.gpu} at {plan.mfu:.0%} MFU of {PEAK_TFLOPS[plan.gpu]:.0f} "
                          "TFLOP/s"),
        ("layout", f"{plan.gpus} GPUs = dp {dp} x tp {plan.tp} x pp {plan.pp}"
                   + (f" (ep {plan.ep})" if plan.ep > 1 else "")
                   + f"; batch {batch} sequences = {b} per micro-batch x {n_micro} micro-step(s)"
                     f" x dp {dp}"),
    ]
    if plan.pp > 1:
        rows.append(("pipeline bubble", f"(p-1)/(m+p-1) = {bubble:.1%} of each step idle "
                                         f"({plan.pp_schedule}, m = {plan.microbatches}); the MFU "
                                         "above must allow for it"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(f"\nMemory per GPU (the busiest stage: {mem['psi']:,.0f} parameters; ZeRO stage "
          f"{plan.zero} over dp {dp}):")
    kinds = ("weights", "gradients", "optimizer states", "activations")
    for k in kinds:
        print(f"  {k:<17} {gb(mem[k]):>32}")
    print(f"  {'total':<17} {gb(sum(mem[k] for k in kinds)):>32}")
    print(f"  (activations: {mem['per_layer'] / 1e6:,.1f} MB per layer (recompute {plan.recompute}"
          f"{', sequence parallel' if plan.sequence_parallel else ''}) x {mem['layers']} layers x "
          f"{mem['in_flight']} micro-batch(es) in flight"
          + (" + fp32 logits" if plan.pp == 1 else "") + ")")
    print("\nCommunication per GPU per optimizer step (bytes sent, 16-bit, ring collectives):")
    for k, (v, how) in comm.items() or {"-": (0, "one GPU: none")}.items():
        print(f"  {k:<3} {gb(v):>32}   {how}")
    zero = zero_table(mem["psi"], dp)
    print(f"\nZeRO over the {dp} data-parallel GPUs (model states per GPU of the busiest stage; "
          "elements sent per GPU per step, ring collectives, x2 bytes in 16 bits):")
    print(f"{'stage':<7}{'weights':>11}{'grads':>11}{'optimizer':>11}{'total':>11}   communication")
    for r in zero:
        print(f"{r['stage']:<7}" + "".join(f"{r[k] / 1e9:>8.2f} GB"
                                           for k in ("params", "grads", "optimizer", "total"))
              + f"   {r['comm_elements']:.3g} = {r['comm']}")
    return {"config": cfg, "params": n, "matmul_params": n_mm, "flops_per_token": fpt,
            "tokens": tokens, "seconds": seconds, "zero": zero, "memory": mem,
            "comm": {k: v for k, (v, _) in comm.items()},
            "bubble": bubble, "dp": dp, "micro_batch": b}


def main(argv=None, flags=None):
    """estimate.py's command line (argv); or `flags`, another entry point's flags by name
    (pretrain.py --estimate: its TrainConfig.flat()): those estimate.py also has are taken, the
    others ignored, --activation-checkpointing is --recompute full."""
    given = vars(build_parser().parse_args([] if flags is not None else argv))
    if flags is not None:
        given |= {k: v for k, v in flags.items() if k in given}
        given["recompute"] = "full" if flags.get("activation_checkpointing") else "none"
    try:
        return estimate(Plan(**given))
    except EstimateError as e:
        print(f"estimate.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

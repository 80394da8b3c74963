"""pretrain.py: next-token pretraining, one loop from a laptop CPU to torchrun on many GPUs.

The idea: sample windows of text, predict each next token, step AdamW; repeat for D tokens. Everything a real
run needs around that loop is here, top to bottom: flags checked before any work, the model built from a
preset, mixed precision (amp.py), warmup then cosine learning rate, gradient accumulation, gradient clipping,
evaluation on held-out data, checkpoints that survive a crash mid-write and resume bit for bit, and a log line
per step with throughput and model FLOPs utilisation.

Formulas (Kaplan et al. 2020; Hoffmann et al. 2022):
    training FLOPs   C = 6 N D                  (N parameters, D tokens; plus the attention term, model.py)
    compute-optimal  D = 20 N                   (Chinchilla: --chinchilla)
    time             C / (peak FLOP/s x GPUs x MFU)
    model states     16 bytes per parameter     (mixed-precision Adam: 2 weights + 2 grads + 12 fp32 master,
                                                 momentum and variance; --estimate prints the table)

Run:
    python pretrain.py --model tiny --max-steps 600 --out out/tiny           # the embedded default corpus
    python pretrain.py --model gpt2-124m --estimate --gpus 8 --chinchilla    # the calculator, no training
    torchrun --nproc_per_node 4 pretrain.py --zero 2 ...                      # data parallel, ZeRO stage 2
    torchrun --nproc_per_node 4 pretrain.py --zero 3 --tp 2                   # ZeRO-3 x tensor parallel
    torchrun --nproc_per_node 4 pretrain.py --tp 2 --pp 2 --microbatches 4    # tensor x pipeline parallel
    torchrun --nproc_per_node 4 pretrain.py --experts 8 --ep 2 --zero 1      # experts over 2 ranks, 2 replicas
"""
import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

import data as data_lib
import moe
import pipeline
import tensor_parallel
from amp import DTYPES, DynamicLossScaler, MixedPrecisionOptimizer, cast_model
from checkpoint import (CheckpointError, check_checkpoint_layout, checkpoint_path, load_checkpoint, rng_state,
                        save_checkpoint, set_rng_state)
from ddp import DistributedDataParallel
from estimate import PEAK_TFLOPS, estimate
from model import ATTN_BACKENDS, PRESETS, Transformer, flops_per_token, num_params, pad_vocab
from topology import Topology, TopologyError, check_layout
from zero import ZeroOptimizer

class ConfigError(ValueError):
    """A bad flag or input file: its message is the one line the user sees, before any work starts."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block): the same shape as every other error here."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    ap = OneLineParser(prog="pretrain.py", description="Pretrain a decoder-only transformer.")
    a = ap.add_argument
    a("--model", default="tiny", choices=sorted(PRESETS), help="model preset (model.py)")
    a("--data", default=None, help="prepared data folder (data.py prepare); default: the Python stdlib source")
    a("--tokenizer", default=None, help="tiktoken encoding; default: the data folder's, or 'bytes' (offline)")
    a("--batch-size", type=int, default=32, help="global batch in sequences per optimizer step")
    a("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's block_size)")
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--max-steps", type=int, default=None, help="optimizer steps (default 1000, or from --tokens/--chinchilla)")
    a("--tokens", type=float, default=None, help="train on this many tokens (sets --max-steps)")
    a("--chinchilla", action="store_true", help="train on 20 tokens per parameter (sets --max-steps)")
    a("--lr", type=float, default=1e-3)
    a("--min-lr", type=float, default=None, help="end of the cosine decay (default lr/10)")
    a("--warmup-steps", type=int, default=100)
    a("--weight-decay", type=float, default=0.1)
    a("--beta1", type=float, default=0.9)
    a("--beta2", type=float, default=0.95)
    a("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: off)")
    a("--amp", default="fp32", choices=sorted(DTYPES), help="compute precision (amp.py)")
    a("--attn", default="sdpa", choices=ATTN_BACKENDS)
    a("--activation-checkpointing", action="store_true")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--zero", type=int, default=0, choices=[0, 1, 2, 3],
      help="data parallelism over torchrun's ranks: 0 ddp.py, 1-3 ZeRO stages (zero.py)")
    a("--bucket-mb", type=float, default=25.0,
      help="gradient bucket size of ddp.py's all-reduce (--zero 0 and 1; stages 2 and 3 reduce-scatter a "
           "transformer block at a time)")
    a("--out", default="out/pretrain", help="checkpoints, metrics.jsonl and the final sample go here")
    a("--resume", action="store_true", help="continue from the checkpoint in --out")
    a("--save-every", type=int, default=200)
    a("--eval-every", type=int, default=200)
    a("--eval-iters", type=int, default=10, help="validation batches per evaluation")
    a("--log-every", type=int, default=10)
    a("--stop-after", type=int, default=None,
      help="end this invocation after N steps with a checkpoint, as a job with a time limit would")
    a("--seed", type=int, default=1337)
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--sample-tokens", type=int, default=300, help="length of the sample printed at the end (0: none)")
    a("--estimate", action="store_true", help="print parameters, FLOPs, memory and time; do not train")
    a("--gpus", type=int, default=1, help="for --estimate")
    a("--gpu", default="h100", choices=sorted(PEAK_TFLOPS), help="for --estimate and MFU on CUDA")
    a("--mfu", type=float, default=0.4, help="for --estimate: the utilisation to assume")
    a("--tp", type=int, default=1, help="tensor-parallel ranks (tensor_parallel.py), innermost in the topology")
    a("--pp", type=int, default=1, help="pipeline stages (pipeline.py)")
    a("--microbatches", type=int, default=1,
      help="pipeline micro-batches per micro-step (each --grad-accum micro-step is cut into this many)")
    a("--pp-schedule", default="1f1b", choices=pipeline.SCHEDULES, help="pipeline schedule")
    a("--sequence-parallel", action="store_true",
      help="with --tp: keep norms and residuals split along the sequence (tensor_parallel.py)")
    a("--experts", type=int, default=0, help="mixture of experts (moe.py): experts per MoE layer (0: dense)")
    a("--topk", type=int, default=2, help="experts per token")
    a("--moe-layers", default="all", help="which blocks get an MoE MLP: 'all', or block numbers like 1,3")
    a("--capacity-factor", type=float, default=None,
      help="expert capacity = factor x k x tokens / experts (overflow passes through the residual); "
           "omit for dropless routing")
    a("--aux-loss-weight", type=float, default=1e-2, help="weight of the Switch load-balancing loss")
    a("--ep", type=int, default=1,
      help="expert-parallel ranks (moe.py), taken from the data-parallel ranks: each holds experts/ep experts "
           "of every MoE layer (with --zero 0 or 1)")
    return ap


def check_args(args, world):
    """Every flag that can be checked without touching data or building anything."""
    cfg = PRESETS[args.model]
    if args.grad_accum < 1:
        raise ConfigError(f"--grad-accum must be at least 1, got {args.grad_accum}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.seq_len is not None and not 1 <= args.seq_len <= cfg.block_size:
        raise ConfigError(f"--seq-len {args.seq_len} is outside model {args.model!r}'s context: "
                          f"choose 1..{cfg.block_size}")
    if args.microbatches < 1:
        raise ConfigError(f"--microbatches must be at least 1, got {args.microbatches}")
    dp = check_layout(world, args.tp, args.pp, args.ep)  # TopologyError: world not tp x pp x dp, ep not dividing dp
    if args.pp > cfg.n_layer:
        raise TopologyError(f"--pp {args.pp} is more stages than the {cfg.n_layer} layers of model {args.model!r}: "
                            f"choose --pp <= {cfg.n_layer}")
    err = tensor_parallel.check_divisible(cfg, args.tp)  # the vocabulary is checked again once it is known
    if err:
        raise TopologyError(err)
    T = args.seq_len or cfg.block_size
    if args.sequence_parallel and T % args.tp:
        raise TopologyError(f"--sequence-parallel splits the {T} positions of a sequence over --tp {args.tp}: "
                            f"choose a --seq-len divisible by {args.tp}")
    micro = args.grad_accum * args.microbatches
    if args.batch_size % (micro * dp):
        raise ConfigError(f"--batch-size {args.batch_size} does not divide into --grad-accum {args.grad_accum} x "
                          f"--microbatches {args.microbatches} x {dp} data-parallel ranks: use a multiple of "
                          f"{micro * dp}")
    if args.compile and args.pp > 1:
        raise ConfigError("--compile with --pp > 1: the pipeline calls the stage's parts one by one; "
                          "compile is supported without pipeline parallelism")
    if args.tokens is not None and args.chinchilla:
        raise ConfigError("--tokens and --chinchilla both set the training length: give one")
    if args.max_steps is not None and (args.tokens is not None or args.chinchilla):
        raise ConfigError("--max-steps and --tokens/--chinchilla both set the training length: give one")
    for flag in ("max_steps", "save_every", "eval_every", "log_every", "eval_iters", "stop_after"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {v}")
    if args.lr <= 0 or args.warmup_steps < 0 or args.grad_clip < 0 or args.weight_decay < 0:
        raise ConfigError("--lr must be > 0 and --warmup-steps, --grad-clip, --weight-decay >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
    if args.bucket_mb <= 0:
        raise ConfigError(f"--bucket-mb must be > 0, got {args.bucket_mb}")
    if args.experts:
        moe.check_moe(args.experts, args.topk, args.capacity_factor, args.ep)
        moe.parse_layers(args.moe_layers, cfg.n_layer)
        if args.pp > 1:
            raise ConfigError("--experts with --pp > 1: the balancing loss of a stage's MoE layers has no way into "
                              "the pipeline's backward yet; use --tp and data parallelism with MoE")
        if args.sequence_parallel:
            raise ConfigError("--experts with --sequence-parallel: routing needs every token of a rank's batch; "
                              "drop --sequence-parallel")
    if args.ep > 1 and not args.experts:
        raise ConfigError(f"--ep {args.ep} splits experts over ranks: give --experts (a multiple of {args.ep})")
    if args.ep > 1 and args.zero > 1:
        raise ConfigError(f"--ep with --zero {args.zero}: ZeRO stages 2 and 3 shard gradients and weights over the "
                          "data-parallel ranks, which hold different experts under --ep; use --zero 0 or 1")


# ------------------------------------------------------------------------------------------- pieces of the run
def lr_at(step, args, max_steps):
    """Linear warmup to --lr, then cosine decay to --min-lr at max_steps."""
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, max_steps - args.warmup_steps))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - min_lr)


def param_groups(model, weight_decay):
    """Decay matrices (linears, embeddings); never norms' gains: shrinking them towards 0 only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak resident set


def peak_flops(device, dtype, args):
    """The denominator of MFU: the GPU's datasheet peak, or on a CPU the matmul throughput measured now
    (there is no meaningful datasheet figure for a shared CPU)."""
    if device.type == "cuda":
        return PEAK_TFLOPS[args.gpu] * 1e12
    a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(8):
        a @ b
    return 8 * 2 * 512 ** 3 / (time.perf_counter() - t0)


def setup_distributed(args):
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; without them this is one process. Only reads them: the
    process groups are built after every flag, the data and the model shape have been checked."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def build_topology(args, world, device):
    if world > 1 and not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Topology(args.tp, args.pp, args.ep)


def with_experts(model, args):
    """--experts: swap the chosen blocks' MLPs for MoE layers (moe.py), before any slicing."""
    if args is not None and getattr(args, "experts", 0):
        moe.add_moe(model, args.experts, args.topk, args.capacity_factor, args.aux_loss_weight,
                    moe.parse_layers(args.moe_layers, model.cfg.n_layer))
    return model


def build_model(cfg, topo, seed, device, dtype, sequence_parallel=False, args=None):
    """The full model from one seed on every rank (with MoE MLPs if asked), then (DESIGN.md's order) this
    pipeline stage's blocks, then this tensor-parallel rank's slices, then this expert-parallel rank's experts,
    then the compute precision."""
    torch.manual_seed(seed)
    model = with_experts(Transformer(cfg), args).to(device)
    pipeline.keep_stage(model, topo)
    tensor_parallel.parallelize(model, topo, sequence_parallel)
    if topo.ep > 1:
        for layer in moe.moe_layers(model):
            moe.shard_experts(layer, topo.ep_rank, topo.ep, topo.ep_group, topo.expert_dp_rank)
    return cast_model(model, dtype)


def grad_norm_reduce(topo):
    """The squared gradient norm summed over the tp and pp groups, whose ranks hold distinct pieces of the
    model (amp.global_grad_norm tells the whole story). None when there are none."""
    groups = [getattr(topo, f"{axis}_group") for axis in ("tp", "pp") if getattr(topo, axis, 1) > 1]
    if not groups:
        return None

    def reduce(sq):
        for g in groups:
            dist.all_reduce(sq, group=g)
        return sq
    return reduce


def forward_backward(model, micro_batches, topo, schedule, scale_loss, device, no_sync=None):
    """Forward and backward of one optimizer step's micro-batches; returns this data-parallel rank's mean loss
    (float64). Under data parallelism only the last micro-batch's backward communicates (no_sync, ddp.py)."""
    if topo.pp > 1:
        return pipeline.run_pipeline(model, micro_batches, topo, schedule, scale_loss=scale_loss, no_sync=no_sync)
    # One optimizer step = several micro-steps. Each micro-loss is a mean over its tokens; dividing by the number
    # of micro-steps makes the sum of their gradients the gradient of the global-batch mean.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            _, loss = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            loss = loss / len(micro_batches)
            # MoE layers left their balancing loss behind in this forward (0 for a dense model); it trains the
            # routers but is not part of the language-modelling loss that is logged.
            scale_loss(loss + moe.aux_loss(model) / len(micro_batches)).backward()
        loss_sum += loss.detach().double()
    return loss_sum


def build_training(model, args, dtype, topo):
    """The module to call forward on and its optimizer: plain on one data-parallel rank, ddp.py for --zero 0,
    zero.py's stages otherwise. Every optimizer here has the same methods: zero_grad(), scale_loss(loss),
    step(max_norm) -> (grad_norm, skipped), param_groups, state_dict()/load_state_dict(), scaler, and no_sync()
    for accumulation micro-steps that must not communicate. Only parameters with requires_grad are trained."""
    scaler = DynamicLossScaler(enabled=args.amp == "fp16")
    groups = param_groups(model, args.weight_decay)
    fused = next(model.parameters()).device.type == "cuda"

    def make_optimizer(groups):
        return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=fused)

    # The gradient norm for clipping and the fp16 overflow check, the same on every rank: amp.global_grad_norm.
    norm_reduce = grad_norm_reduce(topo)
    if topo.dp == 1:
        return model, MixedPrecisionOptimizer(groups, make_optimizer, dtype, scaler, norm_reduce)
    if args.zero == 0:
        ddp = DistributedDataParallel(model, topo.dp_group, args.bucket_mb)
        expert_reduce = None
        if topo.ep > 1:
            def expert_reduce(sq):
                dist.all_reduce(sq, group=topo.ep_group)
                return sq
        return ddp, MixedPrecisionOptimizer(groups, make_optimizer, dtype, scaler, norm_reduce, no_sync=ddp.no_sync,
                                            expert_norm_reduce_fn=expert_reduce)
    opt = ZeroOptimizer(model, groups, make_optimizer, scaler, topo.dp_group, args.zero, args.bucket_mb,
                        norm_reduce_fn=norm_reduce)
    return opt.module, opt


def mean_over_dp(x, topo):
    """The mean of a per-rank scalar over the data-parallel group (for logging: loss, validation loss)."""
    if topo.dp == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, group=topo.dp_group)
    return x / topo.dp


@torch.no_grad()
def evaluate(model, batches, device, topo, microbatches):
    model.eval()
    if topo.pp > 1:  # the pipeline's forward only, each batch cut into micro-batches as in training
        losses = [pipeline.run_pipeline(model, list(zip(x.chunk(microbatches), y.chunk(microbatches))), topo,
                                        train=False) for x, y in batches]
    else:
        losses = [model(x.to(device), y.to(device))[1].double() for x, y in batches]
    model.train()
    return mean_over_dp(torch.stack(losses).mean(), topo).item()


# ------------------------------------------------------------------------------------------- the run
def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return train(args)
    except (ConfigError, CheckpointError, data_lib.DataError, TopologyError, moe.MoEError) as e:
        print(f"pretrain.py: error: {e}", file=sys.stderr)
        sys.exit(2)


def train(args):
    if args.estimate:
        return estimate(args)
    rank, world, device = setup_distributed(args)
    check_args(args, world)
    layout = {"dp": world // (args.tp * args.pp), "pp": args.pp, "tp": args.tp}
    if args.ep > 1:  # (recorded only when used: checkpoints from before --ep keep matching ep 1)
        layout["ep"] = args.ep
    master = rank == 0
    out = Path(args.out)
    ckpt_path = checkpoint_path(out, rank, world)
    if args.resume:
        check_checkpoint_layout(out, world, args.zero if layout["dp"] > 1 else 0, layout)
    ckpt = load_checkpoint(ckpt_path) if args.resume else None

    # Data: the embedded default unless --data; the tokenizer must be the one the data was prepared with.
    tokenizer = args.tokenizer or (ckpt["tokenizer"] if ckpt else None)
    if args.data is None:
        tokenizer = tokenizer or data_lib.DEFAULT_TOKENIZER
        enc = data_lib.get_tokenizer(tokenizer)  # fails here, with the reason, if it cannot load offline
        data_dir = data_lib.ensure_default_data(tokenizer)
    else:
        data_dir = args.data
    meta = data_lib.load_meta(data_dir, tokenizer)
    tokenizer = meta["tokenizer"]
    if ckpt and ckpt["tokenizer"] != tokenizer:
        raise ConfigError(f"--resume: the checkpoint was trained with tokenizer {ckpt['tokenizer']!r}, "
                          f"the data uses {tokenizer!r}")
    enc = data_lib.get_tokenizer(tokenizer)

    cfg = replace(PRESETS[args.model], vocab_size=pad_vocab(meta["vocab_size"]), attn=args.attn,
                  activation_checkpointing=args.activation_checkpointing)
    if ckpt and ckpt["model_config"] != asdict(replace(cfg, attn="-", activation_checkpointing=False)):
        raise ConfigError(f"--resume: the checkpoint in {out} is of another model config than --model {args.model}")
    if err := tensor_parallel.check_divisible(cfg, args.tp):
        raise TopologyError(err)

    # Every check has passed: only now are the process groups built.
    topo = build_topology(args, world, device)
    T = args.seq_len or cfg.block_size
    n_micro = args.grad_accum * args.microbatches
    micro_bs = args.batch_size // (n_micro * topo.dp)
    batches = data_lib.Batches(data_dir, T, args.batch_size, topo.dp_rank, topo.dp, n_micro, args.seed)
    val = data_lib.eval_batches(data_dir, T, args.batch_size // args.grad_accum, args.eval_iters, topo.dp_rank,
                                topo.dp)

    with torch.device("meta"):  # the whole model's counts (for FLOPs and the log), without allocating it
        whole = with_experts(Transformer(cfg), args)
    # FLOPs follow the parameters a token meets: with experts, k of E per MoE layer (moe.py).
    n_params, n_mm = num_params(whole), num_params(whole, matmul_only=True) - moe.inactive_params(whole)
    dtype = DTYPES[args.amp]
    model = build_model(cfg, topo, args.seed, device, dtype, args.sequence_parallel, args)
    tokens_per_step = args.batch_size * T
    if args.tokens is not None or args.chinchilla:
        max_steps = math.ceil((args.tokens or 20 * n_params) / tokens_per_step)
    else:
        max_steps = args.max_steps or 1000
    zero = args.zero if topo.dp > 1 else 0
    module, opt = build_training(model, args, dtype, topo)
    scaler = opt.scaler
    fwd_model = torch.compile(module) if args.compile else module
    # The pipeline calls the stage itself (ddp.py's and zero.py's hooks live on its parameters and modules).
    step_model = model if topo.pp > 1 else fwd_model

    step = 0
    if ckpt:
        if ckpt["model"] is not None:
            model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
        batches.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"])
        step = ckpt["step"]

    def checkpoint_now():
        # Every rank writes its own file: its tensor-parallel slices, its pipeline stage, its ZeRO shards. Under
        # ZeRO-3 the model's weights live only in the optimizer's slices: the model entry is empty.
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(ckpt_path, {
            "model": None if zero == 3 else model.state_dict(), "optim": opt.state_dict(), "step": step,
            "data": batches.state_dict(), "rng": rng_state(), "tokenizer": tokenizer, "args": vars(args),
            "world": world, "zero": zero, "topology": layout,
            "model_config": asdict(replace(cfg, attn="-", activation_checkpointing=False))})
        if world > 1:
            dist.barrier()  # no rank goes on (and perhaps resumes) before every rank's file is whole on disk

    fpt = flops_per_token(cfg, n_mm, T)
    peak = peak_flops(device, dtype, args) * world  # MFU of all the devices together
    if master:
        out.mkdir(parents=True, exist_ok=True)
        print(f"model {args.model}: {n_params:,} parameters, {fpt:.3g} FLOPs/token | data {data_dir} "
              f"({meta['tokens']['train']:,} train tokens, tokenizer {tokenizer}) | batch {args.batch_size} x {T} "
              f"tokens = {micro_bs} x {n_micro} micro-batches x {topo.dp} data-parallel"
              + (f" (ZeRO stage {zero})" if zero else " (ddp.py)" if topo.dp > 1 else "")
              + f" | tp {topo.tp} | pp {topo.pp}" + (f" ({args.pp_schedule})" if topo.pp > 1 else "")
              + (f" | ep {topo.ep}" if topo.ep > 1 else "")
              + f" | {max_steps} steps | "
              f"{args.amp} on {device}" + (f" | resuming at step {step}" if step else ""), flush=True)
    metrics = open(out / "metrics.jsonl", "a") if master else None

    def log(record):
        if master:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    if step == 0:
        val_loss = evaluate(step_model, val, device, topo, args.microbatches)
        log({"step": 0, "val_loss": val_loss})
        if master:
            print(f"step 0 | val loss {val_loss:.4f}", flush=True)

    stop_at = min(max_steps, step + args.stop_after) if args.stop_after else max_steps
    t_last, tokens_since, history = time.perf_counter(), 0, []
    while step < stop_at:
        lr = lr_at(step, args, max_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = forward_backward(step_model, batches.next(), topo, args.pp_schedule, opt.scale_loss, device,
                                    opt.no_sync)
        if topo.ep > 1:  # expert gradients: summed over their replicas, / dp (moe.py); dense ones are done
            moe.reduce_expert_grads(model, topo.dp, topo.expert_dp_group)
        grad_norm, skipped = opt.step(args.grad_clip)
        opt.zero_grad()
        step += 1
        loss_value = mean_over_dp(loss_sum, topo).item()  # the global batch's loss, the same on every rank
        history.append(loss_value)
        tokens_since += tokens_per_step

        if step % args.log_every == 0 or step == stop_at:
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t_last
            tps = tokens_since / dt
            rec = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                   "mfu": tps * fpt / peak, "peak_mem_mb": peak_memory_mb(device), "skipped": skipped}
            if scaler.enabled:
                rec["loss_scale"] = scaler.scale
            if args.experts:  # the balancing loss and the share of routed tokens of the busiest and idlest expert
                rec["aux_loss"] = float(moe.aux_loss(model).detach())
                rec["expert_load_max"], rec["expert_load_min"] = moe.load_spread(model)
            log(rec)
            if master:
                print(f"step {step:5d} | loss {loss_value:.4f} | lr {lr:.2e} | norm {grad_norm:.3f} | "
                      f"{tps / 1e3:.1f}k tok/s | mfu {rec['mfu']:.1%} | mem {rec['peak_mem_mb']:.0f} MB"
                      + (f" | scale {scaler.scale:g}" if scaler.enabled else "")
                      + (f" | aux {rec['aux_loss']:.4f} | load max {rec['expert_load_max']:.1%} min "
                         f"{rec['expert_load_min']:.1%}" if args.experts else "") + (" | skipped" if skipped else ""),
                      flush=True)
            t_last, tokens_since = time.perf_counter(), 0
        if step % args.eval_every == 0 or step == max_steps:
            val_loss = evaluate(step_model, val, device, topo, args.microbatches)
            log({"step": step, "val_loss": val_loss})
            if master:
                print(f"step {step:5d} | val loss {val_loss:.4f}", flush=True)
        if step % args.save_every == 0 or step == stop_at:
            checkpoint_now()

    if step == max_steps and args.sample_tokens > 0 and (topo.pp > 1 or (args.sequence_parallel and topo.tp > 1)):
        if master:  # generation grows the sequence one token at a time: neither cuts into stages or shards
            print("(no sample: generation is not pipelined nor sequence-parallel)", flush=True)
    elif step == max_steps and args.sample_tokens > 0 and (master or topo.tp > 1 or zero == 3 or topo.ep > 1):
        # Under tensor parallelism every tp rank samples in lockstep (the head gathers the full logits, the same
        # seed draws the same tokens); under ZeRO-3 every forward gathers weights from every rank, under expert
        # parallelism every forward sends tokens to every ep rank's experts: all sample.
        model.eval()
        tensor_parallel.set_gather_output(model, True)
        if world > 1:
            torch.manual_seed(args.seed)
        prompt = torch.tensor([enc.encode_ordinary("def ")], device=device)
        sample = enc.decode(model.generate(prompt, args.sample_tokens, temperature=0.8, top_k=50,
                                           n_vocab=enc.n_vocab)[0].tolist())
        if master:
            (out / "sample.txt").write_text(sample)
            print("-" * 30 + " sample " + "-" * 30 + "\n" + sample + "\n" + "-" * 68, flush=True)
    if metrics:
        metrics.close()
    return {"losses": history, "step": step, "model": model, "opt": opt, "topo": topo}


if __name__ == "__main__":
    main()

"""flags.py: the command line pretrain.py and sft.py share, and every check made before any work starts.

The idea: a bad flag should cost one line and no time. So every value is checked here, before data is read, a
model built or a process group joined: numbers in the range where they mean something (finite first: nan passes
no comparison), a layout that fits the world size (topology.py), a batch that divides into micro-batches and
ranks, combinations that cannot work together, and, once the model's shape is known, the splits it must allow
(heads, KV heads, d_ff and the vocabulary by --tp; layers by --pp; positions by --sequence-parallel and --cp).
Each failure is one line naming the flag and what would be valid (exit status 2).

Each entry point adds its own flags and defaults on top of add_shared_flags (pretrain.py: the corpus and the
model preset; sft.py: the base model, the template, LoRA, packing).
"""
import argparse
import json
import math
import os
import zlib
from pathlib import Path

import torch

import context_parallel
import moe
import pipeline
import quantization
import tensor_parallel
from amp import DTYPES
from model import ATTN_BACKENDS
from topology import TopologyError, check_layout


class ConfigError(ValueError):
    """A bad flag or input file: its message is the one line the user sees, before any work starts."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block): the same shape as every other error here; and
    --help shows each flag's default."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=ShowDefaults, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class ShowDefaults(argparse.HelpFormatter):
    """--help adds "(default: X)" to a flag that has a default its help does not already state."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in action.help:
            return action.help
        return action.help + " (default: %(default)s)"


# ------------------------------------------------------------------------------------------- the flags
def add_shared_flags(ap, **defaults):
    """The flags of both entry points: layout, precision, optimizer, schedule, logging/saving/resuming. Each
    entry point passes its own defaults (a flag name with _ for -, e.g. max_steps=100)."""
    a = ap.add_argument
    a("--batch-size", type=int, default=32, help="global batch per optimizer step (sequences, or SFT examples)")
    a("--seq-len", type=int, default=None, help="tokens per row (default: the model's block_size)")
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--max-steps", type=int, default=None, help="optimizer steps")
    a("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    a("--min-lr", type=float, default=None, help="end of the cosine decay (default lr/10)")
    a("--warmup-steps", type=int, default=None, help="linear warm-up steps (unset: a tenth of the run, at most 100)")
    a("--weight-decay", type=float, default=0.1, help="AdamW's, on matrices only")
    a("--beta1", type=float, default=0.9, help="AdamW's")
    a("--beta2", type=float, default=0.95, help="AdamW's")
    a("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: off)")
    a("--amp", default="auto", choices=["auto", *sorted(DTYPES)],
      help="compute precision (amp.py; fp8: quantization.py); auto: bf16 on CUDA, fp32 on a CPU")
    a("--grad-reduce-dtype", default="fp32", choices=["fp32", "model"],
      help="16-bit models: gradients accumulated over micro-steps and reduced over ranks in fp32 (amp.py's "
           "main_grad), or in the model's dtype (half the bytes, 8 bits of mantissa)")
    a("--attn", default=None, choices=ATTN_BACKENDS,
      help="attention backend (model.py, flash_attn.py); default: flash with --cp > 1 (ring "
           "attention's blocks), else sdpa")
    a("--activation-checkpointing", action="store_true", help="recompute each block's activations in backward")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--zero", type=int, default=0, choices=[0, 1, 2, 3], help="data parallelism: 0 ddp.py, 1-3 ZeRO (zero.py)")
    a("--bucket-mb", type=float, default=25.0, help="gradient bucket size of ddp.py's all-reduce (--zero 0, 1)")
    a("--tp", type=int, default=1, help="tensor-parallel ranks (tensor_parallel.py), innermost in the topology")
    a("--pp", type=int, default=1, help="pipeline stages (pipeline.py)")
    a("--microbatches", type=int, default=1, help="pipeline micro-batches per --grad-accum micro-step")
    a("--pp-schedule", default="1f1b", choices=pipeline.SCHEDULES, help="pipeline schedule")
    a("--sequence-parallel", action="store_true", help="with --tp: norms, residuals split along the sequence")
    a("--ep", type=int, default=1, help="expert-parallel ranks (moe.py), carved from the data-parallel ones "
                                        "(each holds experts/ep of every MoE layer; --zero 0 or 1)")
    a("--cp", type=int, default=1,
      help="context-parallel ranks (context_parallel.py): each sequence split over cp ranks, ring "
           "attention (picks --attn flash)")
    a("--out", default=None, help="checkpoints and metrics.jsonl go here (default: out/PROG-HASH, a folder of "
                                  "its own for each run: see run_folder)")
    a("--resume", action="store_true",
      help="must resume: fail unless --out holds a complete checkpoint (without it, a run resumes when it can)")
    a("--fresh", action="store_true", help="start over: a previous run in --out is moved aside to OUT.1")
    a("--save-every", type=int, default=200, help="checkpoint every N steps")
    a("--eval-every", type=int, default=200, help="evaluate every N steps")
    a("--log-every", type=int, default=10, help="log every N steps")
    a("--stop-after", type=int, default=None,
      help="end this invocation after N steps with a checkpoint, as a job with a time limit would")
    a("--seed", type=int, default=1337, help="of the model's initialisation and the data order")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when there is one")
    a("--dist-timeout", type=float, default=600, help="seconds a rank waits for the others to join the process "
                                                       "group (and in any collective) before it fails")
    ap.set_defaults(**defaults)
    return ap


# The flags that say where and how a run executes, not what it computes: a run keeps its folder when they change
# (its checkpoints resume on any layout, checkpoint.py), and they are left out of the default folder's name.
HOW_FLAGS = {"zero", "bucket_mb", "tp", "pp", "microbatches", "pp_schedule", "sequence_parallel", "ep", "cp",
             "grad_accum", "attn", "activation_checkpointing", "compile", "device", "out", "resume", "fresh",
             "save_every", "eval_every", "log_every", "stop_after", "eval_iters", "eval_examples", "sample_tokens",
             "samples", "max_new_tokens", "estimate", "gpus", "gpu", "mfu", "dist_timeout"}


def run_folder(args, prog):
    """The default --out: out/PROG-XXXXXXXX, XXXXXXXX a CRC-32 of every other flag's value. So two commands that
    train different things never share a folder (the second would be refused: another run is there), and the
    same command run again, on any layout, finds its own run and continues it."""
    what = {k: v for k, v in vars(args).items() if k not in HOW_FLAGS}
    return f"out/{prog}-{zlib.crc32(json.dumps(what, sort_keys=True, default=str).encode()):08x}"


def check_values(args):
    """Every number a flag holds, in the range where it means something, and --out a folder that can be written:
    the checks that need nothing but the flags (both entry points'; a flag an entry point lacks is skipped).
    Finiteness first: nan passes no comparison (nan <= 0 is False), so a range check alone lets it through."""
    has = lambda f: getattr(args, f, None) is not None
    for f in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip", "bucket_mb", "tokens", "mfu",
              "capacity_factor", "aux_loss_weight", "lora_alpha", "lora_dropout", "dist_timeout"):
        if has(f) and not math.isfinite(getattr(args, f)):
            raise ConfigError(f"--{f.replace('_', '-')} must be a finite number, got {getattr(args, f)}")

    def need(f, ok, what):
        if has(f) and not ok(getattr(args, f)):
            raise ConfigError(f"--{f.replace('_', '-')} must be {what}, got {getattr(args, f):g}")
    need("lr", lambda v: v > 0, "> 0")
    need("min_lr", lambda v: 0 <= v <= args.lr, f"between 0 and --lr {args.lr:g} (the end of the decay)")
    need("weight_decay", lambda v: v >= 0, ">= 0")
    need("beta1", lambda v: 0 <= v < 1, "in [0, 1)")
    need("beta2", lambda v: 0 <= v < 1, "in [0, 1)")
    need("grad_clip", lambda v: v >= 0, ">= 0 (0: no clipping)")
    need("warmup_steps", lambda v: v >= 0, ">= 0")
    need("seed", lambda v: 0 <= v < 2 ** 63, "in [0, 2^63)")
    need("tokens", lambda v: v >= 1, "at least 1 (the tokens to train on)")
    need("sample_tokens", lambda v: v >= 0, ">= 0 (0: no sample)")
    need("aux_loss_weight", lambda v: v >= 0, ">= 0")
    need("gpus", lambda v: v >= 1, "at least 1")
    need("mfu", lambda v: 0 < v <= 1, "in (0, 1]")
    need("dist_timeout", lambda v: v > 0, "> 0 (seconds)")
    if not str(args.out).strip():  # (Path("") is the current folder: a run would write its steps there)
        raise ConfigError("--out is empty: give a folder for checkpoints and metrics.jsonl (e.g. out/run)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder for checkpoints and metrics.jsonl")
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, so the folder cannot be made")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: no permission to write in {parent}")


def check_args(args, world):
    """The shared flags that can be checked without the model's shape; returns the data-parallel size."""
    check_values(args)
    for flag in ("batch_size", "grad_accum", "microbatches", "save_every", "eval_every", "log_every", "stop_after"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {v}")
    dp = check_layout(world, args.tp, args.pp, args.ep, args.cp)  # TopologyError: world not dp x pp x cp x tp, ...
    micro = args.grad_accum * args.microbatches
    if args.batch_size % (micro * dp):
        raise ConfigError(f"--batch-size {args.batch_size} does not divide into --grad-accum {args.grad_accum} x "
                          f"--microbatches {args.microbatches} x {dp} data-parallel ranks: use a multiple of "
                          f"{micro * dp}")
    if args.resume and args.fresh:
        raise ConfigError("--resume and --fresh contradict each other: give one")
    if args.compile and args.pp > 1:
        raise ConfigError("--compile with --pp > 1: the pipeline calls the stage's parts one by one; "
                          "compile is supported without pipeline parallelism")
    if args.compile and args.zero == 3 and dp > 1:
        # (ddp.py and ZeRO 1-2 are accepted with --compile; their gradient hooks are expected to fire after the
        # compiled backward graph, so that the reductions no longer overlap the backward.)
        raise ConfigError("--compile with --zero 3: zero.py gathers and frees each block's weights (storage "
                          "resizing, hooks on module calls) inside the forward, which torch.compile does not "
                          "trace reliably; use --zero 3 without --compile, or --compile with --zero 0-2")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.amp == "auto":  # fp32 on a GPU leaves SDPA's flash kernel (16-bit only) for T x T fp32 scores
        args.amp = "bf16" if cuda else "fp32"  # resolved here: checkpoints record the precision that ran
    if args.attn is None:  # ring attention's blocks are flash_attn.py's: --cp needs no --attn
        args.attn = "flash" if args.cp > 1 else "sdpa"
    if args.amp == "fp8" and (why := quantization.fp8_unsupported("cuda" if cuda else "cpu")):
        raise ConfigError(why)
    if args.bucket_mb <= 0:
        raise ConfigError(f"--bucket-mb must be > 0, got {args.bucket_mb}")
    if args.ep > 1 and args.zero > 1:
        raise ConfigError(f"--ep with --zero {args.zero}: ZeRO stages 2 and 3 shard gradients and weights over the "
                          "data-parallel ranks, which hold different experts under --ep; use --zero 0 or 1")
    return dp


def check_model_layout(cfg, args, what):
    """The checks that need the model's shape (`what` names it in the message: "model 'tiny'", "--init DIR")."""
    if args.seq_len is not None and not 1 <= args.seq_len <= cfg.block_size:
        raise ConfigError(f"--seq-len {args.seq_len} is outside {what}'s context: choose 1..{cfg.block_size}")
    if args.pp > cfg.n_layer:
        raise TopologyError(f"--pp {args.pp} is more stages than the {cfg.n_layer} layers of {what}: "
                            f"choose --pp <= {cfg.n_layer}")
    if err := tensor_parallel.check_divisible(cfg, args.tp):
        raise TopologyError(err)
    T = args.seq_len or cfg.block_size
    if args.sequence_parallel and T % args.tp:
        raise TopologyError(f"--sequence-parallel splits the {T} positions of a sequence over --tp {args.tp}: "
                            f"choose a --seq-len divisible by {args.tp}")
    if args.cp > 1:  # (here, not in check_args: sft.py learns whether its base model has experts from --init)
        context_parallel.check_flags(args, T)
    if args.ep > 1 and not getattr(args, "experts", 0):
        raise ConfigError(f"--ep {args.ep} splits experts over ranks: give --experts (a multiple of {args.ep})")
    if getattr(args, "experts", 0):
        moe.check_flags(args, cfg.n_layer)

"""flags.py: the command line pretrain.py and sft.py share, and every check made before work starts.

The idea: a bad flag should cost one line and no time. So every value is checked here, before data
is read, a model built or a process group joined: numbers in the range where they mean something
(finite first: nan passes no comparison), a layout that fits the world size (topology.py), a batch
that divides into micro-batches and ranks, combinations that cannot work together, and, once the
model's shape is known, the splits it must allow (heads, KV heads, d_ff and the vocabulary by --tp;
layers by --pp; positions by --sequence-parallel and --cp). Each failure is one line naming the flag
and what would be valid (exit status 2).

Each entry point adds its own flags and defaults on top of add_shared_flags (pretrain.py: the corpus
and the model preset; sft.py: the base model, the template, LoRA, packing). The flags are parsed
once, into a TrainConfig (from_args) of frozen parts: Optim, Layout, Settings, moe.MoEConfig, and
the entry point's own flags. Nothing changes a config once made; a value resolved later (the
precision of --amp auto, the warm-up, an MoE base's experts) makes a new one (dataclasses.replace).
"""
import argparse
import json
import math
import os
import zlib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

import context_parallel
import moe
import pipeline
import quantization
import tensor_parallel
from amp import DTYPES
from model import ATTN_BACKENDS
from moe import MoEConfig
from topology import TopologyError, check_layout


class ConfigError(ValueError):
    """A bad flag or input file: its message is the user's one line, before any work starts."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block): the same shape as every other error
    here; and --help shows each flag's default."""

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


# ---------------------------------------------------------------------------------------- the flags
def add_shared_flags(ap, **defaults):
    """The flags of both entry points: layout, precision, optimizer, schedule, logging, saving,
    resuming. Each entry point passes its own defaults (as keywords, _ for -: max_steps=100)."""
    a = ap.add_argument
    a("--batch-size", type=int, default=32,
      help="global batch per optimizer step (sequences, or SFT examples)")
    a("--seq-len", type=int, default=None, help="tokens per row (default: the model's block_size)")
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--max-steps", type=int, default=None, help="optimizer steps")
    a("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    a("--min-lr", type=float, default=None, help="end of the cosine decay (default lr/10)")
    a("--warmup-steps", type=int, default=None,
      help="linear warm-up steps (unset: a tenth of the run, at most 100)")
    a("--weight-decay", type=float, default=0.1, help="AdamW's, on matrices only")
    a("--beta1", type=float, default=0.9, help="AdamW's")
    a("--beta2", type=float, default=0.95, help="AdamW's")
    a("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: off)")
    a("--amp", default="auto", choices=["auto", *sorted(DTYPES)],
      help="compute precision (amp.py; fp8: quantization.py); auto: bf16 on CUDA, fp32 on a CPU")
    a("--grad-reduce-dtype", default="fp32", choices=["fp32", "model"],
      help="16-bit models: gradients accumulated over micro-steps and reduced over ranks in fp32 "
           "(amp.py's main_grad), or in the model's dtype (half the bytes, 8 bits of mantissa)")
    a("--attn", default=None, choices=ATTN_BACKENDS,
      help="attention backend (model.py, flash_attn.py); default: flash with --cp > 1 (ring "
           "attention's blocks), else sdpa")
    a("--activation-checkpointing", action="store_true",
      help="recompute each block's activations in backward")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--zero", type=int, default=0, choices=[0, 1, 2, 3],
      help="data parallelism: 0 ddp.py, 1-3 ZeRO (zero.py)")
    a("--bucket-mb", type=float, default=25.0,
      help="gradient bucket size of ddp.py's all-reduce (--zero 0, 1)")
    a("--tp", type=int, default=1,
      help="tensor-parallel ranks (tensor_parallel.py), innermost in the topology")
    a("--pp", type=int, default=1, help="pipeline stages (pipeline.py)")
    a("--microbatches", type=int, default=1,
      help="pipeline micro-batches per --grad-accum micro-step")
    a("--pp-schedule", default="1f1b", choices=pipeline.SCHEDULES, help="pipeline schedule")
    a("--sequence-parallel", action="store_true",
      help="with --tp: norms, residuals split along the sequence")
    a("--ep", type=int, default=1,
      help="expert-parallel ranks (moe.py), carved from the data-parallel ones (each holds "
           "experts/ep of every MoE layer; --zero 0 or 1)")
    a("--cp", type=int, default=1,
      help="context-parallel ranks (context_parallel.py): each sequence split over cp ranks, ring "
           "attention (picks --attn flash)")
    a("--out", default=None,
      help="checkpoints and metrics.jsonl go here (default: out/PROG-HASH, a folder of its own "
           "for each run: see run_folder)")
    a("--resume", action="store_true",
      help="must resume: fail unless --out holds a complete checkpoint (without it, a run "
           "resumes when it can)")
    a("--fresh", action="store_true",
      help="start over: a previous run in --out is moved aside to OUT.1")
    a("--save-every", type=int, default=200, help="checkpoint every N steps")
    a("--eval-every", type=int, default=200, help="evaluate every N steps")
    a("--log-every", type=int, default=10, help="log every N steps")
    a("--stop-after", type=int, default=None,
      help="end this invocation after N steps with a checkpoint, as a job with a time limit would")
    a("--seed", type=int, default=1337, help="of the model's initialisation and the data order")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"],
      help="auto: cuda when there is one")
    a("--dist-timeout", type=float, default=600,
      help="seconds a rank waits for the others to join the process group (and in any "
           "collective) before it fails")
    ap.set_defaults(**defaults)
    return ap


# ----------------------------------------------------------------------------------- the config
@dataclass(frozen=True)
class Optim:
    """AdamW and its schedule (training.lr_at): warm-up to lr, cosine decay to min_lr at the end."""
    lr: float
    min_lr: float             # None: lr / 10
    warmup_steps: int         # None: a tenth of the run, at most 100 (resolved by training.start)
    max_steps: int            # None: the entry point's default (pretrain.py: --tokens, or 1000)
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float


@dataclass(frozen=True)
class Layout:
    """How a global batch of batch_size x seq_len tokens is cut over micro-steps and ranks."""
    batch_size: int
    seq_len: int              # None: the model's block_size
    grad_accum: int
    microbatches: int
    zero: int
    bucket_mb: float
    tp: int
    pp: int
    pp_schedule: str
    sequence_parallel: bool
    ep: int
    cp: int


@dataclass(frozen=True)
class Settings:
    """Where a run writes; when it logs, evaluates, saves, stops; how it computes (seed, precision,
    device)."""
    out: str
    resume: bool
    fresh: bool
    save_every: int
    eval_every: int
    log_every: int
    stop_after: int
    seed: int
    amp: str
    grad_reduce_dtype: str
    attn: str
    activation_checkpointing: bool
    compile: bool
    device: str
    dist_timeout: float


@dataclass(frozen=True)
class TrainConfig:
    """Every flag of a run, parsed once. `task`: the entry point's own flags, in its own frozen
    class (pretrain.Pretrain: --model, --data, --tokens...; sft.SFT: --init, --lora-r, --pack...);
    None for a caller with none. moe: None until known (sft.py reads it from its --init)."""
    optim: Optim
    layout: Layout
    settings: Settings
    moe: MoEConfig
    task: object

    def flat(self):
        """Every flag by name (its dest), as checkpoints record them ("args") and run_folder hashes
        them."""
        parts = [self.optim, self.layout, self.settings, self.moe, self.task]
        return {k: v for part in parts if part is not None for k, v in asdict(part).items()}


PARTS = (Optim, Layout, Settings, MoEConfig)


def from_args(args, prog, task_cls=None):
    """The config of parsed flags (argparse's Namespace, read here and nowhere else), the entry
    point's own into `task_cls`; --out unset: run_folder's (an empty --out stays empty: check_values
    refuses it)."""
    given = dict(vars(args))
    given["out"] = run_folder(given, prog) if given["out"] is None else given["out"]
    take = {cls: cls(**{f.name: given[f.name] for f in fields(cls)}) for cls in PARTS
            if all(f.name in given for f in fields(cls))}
    mine = {f.name for cls in take for f in fields(cls)}
    rest = {k: v for k, v in given.items() if k not in mine}
    return TrainConfig(take[Optim], take[Layout], take[Settings], take.get(MoEConfig),
                       task_cls(**rest) if task_cls is not None else None)


def defaults(prog):
    """The shared flags' defaults as a config, for a caller that builds its runs itself
    (scaling.py)."""
    return from_args(add_shared_flags(OneLineParser(prog=prog)).parse_args([]), prog)


def uses_cuda(device):
    """--device auto: cuda when there is one."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def resolved(cfg):
    """The config with --amp auto resolved: bf16 on CUDA, fp32 on a CPU (fp32 on a GPU leaves SDPA's
    flash kernel, 16-bit only, for T x T fp32 scores), resolved before the run's identity is taken:
    checkpoints record the precision that ran. And --attn unset: flash under --cp (ring attention's
    blocks are flash_attn.py's), else sdpa."""
    s = cfg.settings
    amp = ("bf16" if uses_cuda(s.device) else "fp32") if s.amp == "auto" else s.amp
    attn = ("flash" if cfg.layout.cp > 1 else "sdpa") if s.attn is None else s.attn
    return replace(cfg, settings=replace(s, amp=amp, attn=attn))


# The flags that say where and how a run executes, not what it computes: a run keeps its folder when
# they change (its checkpoints resume on any layout, checkpoint.py), and they are left out of the
# default folder's name.
HOW_FLAGS = {"zero", "bucket_mb", "tp", "pp", "microbatches", "pp_schedule", "sequence_parallel",
             "ep", "cp", "grad_accum", "attn", "activation_checkpointing", "compile", "device",
             "out", "resume", "fresh", "save_every", "eval_every", "log_every", "stop_after",
             "eval_iters", "eval_examples", "sample_tokens", "samples", "max_new_tokens",
             "estimate", "gpus", "gpu", "mfu", "dist_timeout"}


def run_folder(given, prog):
    """The default --out: out/PROG-XXXXXXXX, XXXXXXXX a CRC-32 of every other flag's value (`given`:
    each flag's parsed value by name). So two commands that train different things never share a
    folder (the second would be refused: another run is there), and the same command run again, on
    any layout, finds its own run and continues it."""
    what = {k: v for k, v in given.items() if k not in HOW_FLAGS}
    return f"out/{prog}-{zlib.crc32(json.dumps(what, sort_keys=True, default=str).encode()):08x}"


def check_values(cfg):
    """Every number a flag holds, in the range where it means something, and --out a folder that can
    be written: the checks that need nothing but the flags (both entry points'; a flag an entry
    point lacks is skipped). Finiteness first: nan passes no comparison (nan <= 0 is False), so a
    range check alone lets it through."""
    given = cfg.flat()
    has = lambda f: given.get(f) is not None
    for f in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip", "bucket_mb", "tokens",
              "mfu", "capacity_factor", "aux_loss_weight", "lora_alpha", "lora_dropout",
              "dist_timeout"):
        if has(f) and not math.isfinite(given[f]):
            raise ConfigError(f"--{f.replace('_', '-')} must be a finite number, got {given[f]}")

    def need(f, ok, what):
        if has(f) and not ok(given[f]):
            raise ConfigError(f"--{f.replace('_', '-')} must be {what}, got {given[f]:g}")
    lr = cfg.optim.lr
    need("lr", lambda v: v > 0, "> 0")
    need("min_lr", lambda v: 0 <= v <= lr, f"between 0 and --lr {lr:g} (the end of the decay)")
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
    check_out(cfg.settings.out)


def check_out(out):
    """--out: a folder that exists or can be made, and written in."""
    if not str(out).strip():  # (Path("") is the current folder: a run would write its steps there)
        raise ConfigError("--out is empty: give a folder for checkpoints and metrics.jsonl "
                          "(e.g. out/run)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder for checkpoints and metrics.jsonl")
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, so the folder cannot be made")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: no permission to write in {parent}")


def check_args(cfg, world):
    """The shared flags that can be checked without the model's shape; returns the data-parallel
    size."""
    check_values(cfg)
    lay, run = cfg.layout, cfg.settings
    for flag, v in (("batch_size", lay.batch_size), ("grad_accum", lay.grad_accum),
                    ("microbatches", lay.microbatches), ("save_every", run.save_every),
                    ("eval_every", run.eval_every), ("log_every", run.log_every),
                    ("stop_after", run.stop_after)):
        if v is not None and v < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {v}")
    # TopologyError: world not dp x pp x cp x tp, ...
    dp = check_layout(world, lay.tp, lay.pp, lay.ep, lay.cp)
    micro = lay.grad_accum * lay.microbatches
    if lay.batch_size % (micro * dp):
        raise ConfigError(f"--batch-size {lay.batch_size} does not divide into --grad-accum "
                          f"{lay.grad_accum} x --microbatches {lay.microbatches} x {dp} "
                          f"data-parallel ranks: use a multiple of {micro * dp}")
    if run.resume and run.fresh:
        raise ConfigError("--resume and --fresh contradict each other: give one")
    if run.compile and lay.pp > 1:
        raise ConfigError("--compile with --pp > 1: the pipeline calls the stage's parts one by "
                          "one; compile is supported without pipeline parallelism")
    if run.compile and lay.zero == 3 and dp > 1:
        # (ddp.py and ZeRO 1-2 are accepted with --compile; their gradient hooks are expected to
        # fire after the compiled backward, so that the reductions no longer overlap the backward.)
        raise ConfigError("--compile with --zero 3: zero.py gathers and frees each block's "
                          "weights (storage resizing, hooks on module calls) inside the forward, "
                          "which torch.compile does not trace reliably; use --zero 3 without "
                          "--compile, or --compile with --zero 0-2")
    if run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
    device = "cuda" if uses_cuda(run.device) else "cpu"
    if resolved(cfg).settings.amp == "fp8" and (why := quantization.fp8_unsupported(device)):
        raise ConfigError(why)
    if lay.bucket_mb <= 0:
        raise ConfigError(f"--bucket-mb must be > 0, got {lay.bucket_mb}")
    if lay.ep > 1 and lay.zero > 1:
        raise ConfigError(f"--ep with --zero {lay.zero}: ZeRO stages 2 and 3 shard gradients "
                          "and weights over the data-parallel ranks, which hold different experts "
                          "under --ep; use --zero 0 or 1")
    return dp


def check_model_layout(model_cfg, cfg, what, pack=False):
    """The checks that need the model's shape (`what` names it in the message: "model 'tiny'",
    "--init DIR"; pack: sft.py's --pack)."""
    lay, block, n_layer = cfg.layout, model_cfg.block_size, model_cfg.n_layer
    if lay.seq_len is not None and not 1 <= lay.seq_len <= block:
        raise ConfigError(f"--seq-len {lay.seq_len} is outside {what}'s context: choose 1..{block}")
    if lay.pp > n_layer:
        raise TopologyError(f"--pp {lay.pp} is more stages than the {n_layer} layers of {what}: "
                            f"choose --pp <= {n_layer}")
    if err := tensor_parallel.check_divisible(model_cfg, lay.tp):
        raise TopologyError(err)
    T = lay.seq_len or block
    if lay.sequence_parallel and T % lay.tp:
        raise TopologyError(f"--sequence-parallel splits the {T} positions of a sequence over --tp "
                            f"{lay.tp}: choose a --seq-len divisible by {lay.tp}")
    experts = cfg.moe.experts if cfg.moe is not None else 0
    # (--cp here, not in check_args: sft.py learns whether its base model has experts from --init)
    if lay.cp > 1:
        context_parallel.check_flags(lay.cp, T, cfg.settings.attn, lay.pp, lay.ep, experts,
                                     lay.sequence_parallel, pack)
    if lay.ep > 1 and not experts:
        raise ConfigError(f"--ep {lay.ep} splits experts over ranks: give --experts (a multiple of "
                          f"{lay.ep})")
    if experts:
        moe.check_flags(cfg.moe, n_layer, lay.ep, lay.pp, lay.sequence_parallel)

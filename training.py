"""training.py: the training loop pretrain.py and sft.py share, on the parallel stack of stack.py.

The idea: pretraining and fine-tuning take a step the same way; they differ only in what they feed
the loop (windows of text, or templated examples with a loss mask) and in their defaults. So the
loop lives here once, on what stack.py built (the process groups, this rank's piece of the model,
the data-parallel wrapper and optimizer): one step's forward and backward, evaluation, and the loop:
set-up, step, log/eval/save, finish, with one place each for saving, resuming and the end-of-run
barrier; metrics.py writes what a logged step reports (metrics.jsonl, the terminal line, MFU).

Nothing silent: every flag's value is checked before any work (a bad one is one line and exit status
2), and a run that cannot train (amp.py's DivergenceGuard: the loss or gradients inf/nan for 8 steps
in a row, fp16's loss scale below 1) stops on every rank at the same step with its likely cause,
exit status 3; a checkpoint is never written over the last good one while the loss is not finite.

The loss of a step, whatever the task and the layout: labels of -100 take no loss (SFT's prompts and
padding; in pretraining every token is labelled), and

    loss = (sum over the step's labelled tokens of -log p(label))
           / (labelled tokens of the whole global batch)

(all data-parallel ranks, all accumulation micro-steps, all pipeline micro-batches). Every rank
counts the labels of its own micro-batches from y (all tp and pp ranks of a data-parallel replica
see the same batch); one all-reduce over the dp group of two numbers gives the global count. A
per-micro-batch mean instead would weight a token of a micro-batch with few labels more than one of
a full micro-batch. ddp.py and zero.py average gradients over the dp ranks, so each rank
back-propagates its share multiplied by dp: their average is the global loss's gradient. The
pipeline's last stage computes the same sum (pipeline.py, loss_div).

Run: not on its own; `python pretrain.py` and `python sft.py` are its two front ends.
"""
import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint
import context_parallel
import launch
import metrics
import moe
import pipeline
from amp import DivergenceGuard, TrainingStopped
from estimate import peak_flops
from flags import TrainConfig
from stack import build_training
from topology import end_process_group
from topology import Topology


# ----------------------------------------------------------------------------------------- one step
def global_counts(micro_batches, topo, device):
    """(tokens, labelled tokens) of the global batch, float64 0-dim tensors on the device: this
    rank's rows counted on the host, where the batch is, summed over dp on the device (nothing waits
    for the GPU). A micro-batch is (x, y), or (x, y, {"pos": ..., "doc": ...}) for packed rows
    (model.py's extra inputs)."""
    ys = [mb[1] for mb in micro_batches]
    n = torch.stack([torch.tensor(sum(y.numel() for y in ys), dtype=torch.float64),
                     sum((y != -100).sum() for y in ys).double()])
    n = to_device(n, device)
    if topo.dp > 1:
        dist.all_reduce(n, group=topo.dp_group)
    return n[0], n[1]


def to_device(t, device):
    """A host tensor on the device; on CUDA from pinned memory, non_blocking: as a step never waits
    for the GPU, the host loads and queues the next step's batch while the GPU still runs this one
    (a one-step prefetch)."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def forward_backward(model, micro_batches, topo, schedule, scale_loss, device, no_sync=None,
                     n_labels=None):
    """Forward and backward of one optimizer step's micro-batches: each rank back-propagates its
    labelled tokens' summed loss / (the global batch's labelled tokens `n_labels` / dp), and returns
    it (float64): the mean over the dp ranks, of it and of its gradients (ddp.py, zero.py), is the
    step's loss. Only the last micro-batch's backward communicates over dp (no_sync). Under --cp
    each rank computes the loss of its zigzag chunks of the rows: dp x cp takes dp's place in the
    divisor and in the averages, while n_labels stays the count of the whole rows (every cp rank
    holds them) summed over dp."""
    if n_labels is None:
        _, n_labels = global_counts(micro_batches, topo, device)
    per_rank = torch.as_tensor(n_labels, dtype=torch.float64).clamp(min=1.0) / (topo.dp * topo.cp)
    # the last stage sums its micro-batches' losses / per_rank (pipeline.py: a number, one read)
    if topo.pp > 1:
        return pipeline.run_pipeline(model, micro_batches, topo, schedule, loss_div=per_rank.item(),
                                     scale_loss=scale_loss, no_sync=no_sync)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, (x, y, *packing) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # this cp rank's tokens (the whole rows without --cp)
        x, y, kw = context_parallel.split_batch(x, y, topo)
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            _, loss = model(to_device(x, device), to_device(y, device), reduction="sum",
                            **on(device, packing or [kw]))
            loss = loss / per_rank.to(loss.dtype)
            # MoE layers left their balancing loss behind in this forward (0 for a dense model); it
            # trains the routers but is not part of the language-modelling loss that is logged.
            scale_loss(loss + moe.aux_loss(model) / len(micro_batches)).backward()
        loss_sum += loss.detach().double()
    return loss_sum


def on(device, packing):
    """The packed rows' extra inputs (pos, doc) on the device, as keyword arguments of the model.
    (Under --cp, [split_batch's positions] instead: --pack and --cp are never both on.)"""
    return {k: to_device(v, device) for k, v in packing[0].items()} if packing else {}


def mean_over_dp(x, topo):
    """A per-rank scalar's mean over the data-parallel group, x cp under --cp (the logged loss)."""
    if topo.dp * topo.cp == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, group=topo.dp_cp_group)
    return x / (topo.dp * topo.cp)


@torch.no_grad()
def evaluate(model, batches, device, topo, microbatches):
    """Mean loss per labelled token over held-out batches (each dp rank holds the same number of
    them; the sums and counts are added over the ranks, then divided). Under pipeline parallelism
    the stages run their forwards only, each batch cut into micro-batches as in training."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y, *packing in batches:
        x, y, kw = context_parallel.split_batch(x, y, topo)
        if topo.pp > 1:
            micro = pipeline.cut((x, y, *packing), microbatches)
            total[0] += pipeline.run_pipeline(model, micro, topo, loss_div=1.0, train=False)
        else:
            total[0] += model(x.to(device), y.to(device), reduction="sum",
                              **on(device, packing or [kw]))[1].double()
        total[1] += int((y != -100).sum())
    model.train()
    if topo.dp * topo.cp > 1:
        dist.all_reduce(total, group=topo.dp_cp_group)
    return (total[0] / total[1]).item()


def lr_at(step, optim, max_steps):
    """Linear warmup to --lr, then cosine decay to --min-lr at max_steps (optim: flags.Optim, its
    warm-up resolved)."""
    lr, warmup = optim.lr, optim.warmup_steps
    min_lr = lr / 10 if optim.min_lr is None else optim.min_lr
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


# -------------------------------------------------------------------------------------- checkpoints
def layout_of(lay, world):
    """The layout a checkpoint records (lay: flags.Layout)."""
    layout = {"dp": world // (lay.tp * lay.pp * lay.cp), "pp": lay.pp, "tp": lay.tp}
    if lay.ep > 1:  # (recorded only when used: checkpoints from before --ep keep matching ep 1)
        layout["ep"] = lay.ep
    if lay.cp > 1:  # (the same for --cp)
        layout["cp"] = lay.cp
    return layout


def read_checkpoint(settings, rank):
    """Start or resume (checkpoint.py): the meta.json of the newest complete step in --out, with its
    folder under "dir", or None to start fresh. Called before any process group exists, so that a
    problem is one line. Rank 0 locks --out first (launch.lock_run: one run per folder), and again
    after --fresh moved the old run aside (the lock file went with it); --fresh on a folder that
    held nothing but the lock file moves nothing."""
    out = Path(settings.out)
    fresh = settings.fresh and out.exists() and any(p.name != ".lock" for p in out.iterdir())
    if rank == 0:
        launch.lock_run(out)
    fresh_here = fresh if rank == 0 else settings.fresh
    found = checkpoint.find_resume(out, settings.resume, fresh_here, rank)
    if fresh and rank == 0:
        launch.lock_run(out)
    return found and found[1] | {"dir": found[0]}


# What makes a run the same run: a checkpoint is resumed only under these settings (and the same
# model, data and tokenizer); the layout (world size, --tp, --pp, --ep, --cp, --zero, --grad-accum,
# --microbatches) may change. Every flag that changes what a step computes is here (sft.py's
# --no-prompt-mask and --pack too); the run's length (max_steps) is compared apart: it may grow or
# shrink on a resume, which moves the end of the schedule.
SAME_RUN = ("batch_size", "seq_len", "lr", "min_lr", "warmup_steps", "weight_decay", "beta1",
            "beta2", "grad_clip", "amp", "seed", "data", "experts", "topk", "moe_layers",
            "capacity_factor", "aux_loss_weight", "no_prompt_mask", "pack")


def check_same_run(cfg, ckpt, **more):
    """The run's identity (SAME_RUN flags, plus e.g. max_steps, model_config, tokenizer): returned
    for the checkpoints to record, and compared with the one `ckpt` recorded (one line on a
    difference; the length is change_length's)."""
    given = cfg.flat()
    identity = {k: given[k] for k in SAME_RUN if k in given} | more
    if ckpt:
        same = {k: v for k, v in identity.items() if k != "max_steps"}
        checkpoint.check_same_run(cfg.settings.out, ckpt, same)
    return identity


def change_length(cfg, ckpt, max_steps):
    """A resume with another --max-steps (or --tokens): the run goes on to the new end; the cosine
    decay is recomputed from the step reached (a printed line says so) and the default warm-up stays
    the one the run had (the config returned). A length below the step reached is refused: it has
    nothing to train."""
    was, step = ckpt.get("identity", {}).get("max_steps"), ckpt["step"]
    out = cfg.settings.out
    if max_steps < step:
        raise checkpoint.CheckpointError(f"{out} holds a run at step {step}: --max-steps "
                                         f"{max_steps} is below it; give at least {step}, or "
                                         "--fresh (the old run is moved aside)")
    if was is None or was == max_steps:
        return cfg
    if cfg.optim.warmup_steps is None:  # (the default follows max_steps: keep the run's warm-up)
        warmup = ckpt.get("args", {}).get("warmup_steps")
        cfg = replace(cfg, optim=replace(cfg.optim, warmup_steps=warmup))
    if os.environ.get("RANK", "0") == "0":
        print(f"--max-steps {max_steps}: the run in {out} was planned for {was} steps; its "
              f"learning-rate schedule changes from step {step} (the cosine decay now ends at step "
              f"{max_steps})", flush=True)
    return cfg


def save(run):
    """One folder per step: every rank writes the pieces it is the first holder of (checkpoint.py);
    rank 0 the index with what the loop needs back. Every rank returns once the step is complete on
    disk. Not while the loss is inf/nan: a diverged state never replaces the last good one."""
    if not run.guard.healthy:  # (the same on every rank: the guard sees values they all agree on)
        metrics.log(run, {"step": run.step, "not_saved": "loss not finite"},
                    f"step {run.step:5d} | not saved: the loss is not finite (last good "
                    f"checkpoint: {describe_last_good(run)})")
        return
    checkpoint.save(run.out, run.step, run.model, run.opt, run.topo, run.meta | {
        "data": run.batches.state_dict(), "args": run.cfg.flat(),
        "layout": layout_of(run.cfg.layout, run.topo.world)})
    run.last_good = run.step


def resume(run, ckpt):
    """Onto this layout, whatever the saved one (checkpoint.py); metrics.jsonl drops the records
    past the step."""
    # The run's folder, not only the step find_resume chose: a step whose files turn out damaged
    # (every rank checks the CRC-32 of its share) falls back to the previous one, on every rank,
    # with a warning line.
    saved = checkpoint.load(run.out, run.model, run.opt, run.topo)
    run.batches.load_state_dict(saved["data"])
    run.step = run.last_good = saved["step"]


def barrier(run):  # the end of a save, and of the run
    if run.topo.world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------- the loop
@dataclass
class Run:
    """Everything the loop carries from step to step."""
    cfg: TrainConfig                  # the run's flags (flags.py), the warm-up resolved
    topo: Topology
    device: torch.device
    model: torch.nn.Module            # this rank's piece of the model (parameters, state dict)
    # what forward is called on (the model, or its ddp/zero wrapper, compiled)
    module: torch.nn.Module
    opt: object
    # .next() -> [(x, y)] micro-batches; state_dict()/load_state_dict()
    batches: object
    val: list                         # [(x, y)] held-out batches of this rank
    max_steps: int
    # what else a checkpoint records (tokenizer, model_config, lora, ...)
    meta: dict
    fpt: float                        # training FLOPs per token (for MFU)
    peak: float                       # peak FLOP/s of all the devices together
    zero: int = 0                     # the ZeRO stage in use (0 on one data-parallel rank)
    rank0: bool = False               # rank 0: logs, prints, writes metrics.jsonl
    out: Path = None
    step: int = 0
    losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    metrics: object = None            # rank 0's metrics.jsonl, open (metrics.log writes it)
    t_last: float = 0.0
    # perf_counter at this invocation's start, less the elapsed time resumed
    t_start: float = 0.0
    # tokens (padding included) and labelled tokens since the last log line, all ranks (device
    # tensors between log lines)
    tokens_since: object = 0.0
    labels_since: object = 0.0
    # the records of the steps not read back yet (metrics.read_pending)
    pending: list = field(default_factory=list)
    # stops a run that cannot train (amp.py)
    guard: DivergenceGuard = field(default_factory=DivergenceGuard)
    last_good: int = None             # the step of the newest checkpoint saved with a finite loss


def start(cfg, topo, device, model, batches, val, max_steps, meta, fpt, ckpt=None, gpu="h100"):
    """Set-up: the data-parallel wrapper and optimizer, the checkpoint restored (--resume), the
    metrics file. gpu: the datasheet whose peak MFU is of, on CUDA (estimate.PEAK_TFLOPS)."""
    if cfg.optim.warmup_steps is None:  # the run's length: a short run would never leave 100 steps
        cfg = replace(cfg, optim=replace(cfg.optim, warmup_steps=min(100, max(1, max_steps // 10))))
    dtype = next(model.parameters()).dtype
    module, opt = build_training(model, cfg, dtype, topo)
    # The pipeline calls the stage itself: ddp.py's and zero.py's hooks live on its parameters
    # and modules.
    peak = peak_flops(device, dtype, gpu) * topo.world  # MFU of all devices together
    module = torch.compile(module) if cfg.settings.compile else module
    run = Run(cfg, topo, device, model, model if topo.pp > 1 else module, opt, batches, val,
              max_steps, meta, fpt, peak, zero=cfg.layout.zero if topo.dp * topo.cp > 1 else 0,
              rank0=topo.rank == 0, out=Path(cfg.settings.out))
    if ckpt:
        resume(run, ckpt)
    if run.rank0:
        run.out.mkdir(parents=True, exist_ok=True)
        # One history: records past the resumed step are dropped; elapsed time goes on from theirs.
        elapsed = checkpoint.truncate_metrics(run.out / "metrics.jsonl", run.step if ckpt else -1)
        run.t_start = time.perf_counter() - elapsed
        run.metrics = open(run.out / "metrics.jsonl", "a")
        if cfg.optim.warmup_steps >= max_steps > 0:
            print(f"warning: --warmup-steps {cfg.optim.warmup_steps} is not below the run's "
                  f"{max_steps} steps: the learning rate never reaches --lr {cfg.optim.lr:g}",
                  flush=True)
    return run


def train_step(run):
    """One optimizer step: the learning rate, forward and backward, expert gradients, the update."""
    lr = lr_at(run.step, run.cfg.optim, run.max_steps)
    for g in run.opt.param_groups:
        g["lr"] = lr
    micro_batches = run.batches.next()
    tokens, labels = global_counts(micro_batches, run.topo, run.device)
    loss = forward_backward(run.module, micro_batches, run.topo, run.cfg.layout.pp_schedule,
                            run.opt.scale_loss, run.device, run.opt.no_sync, labels)
    # expert gradients: summed over their replicas, / dp (moe.py); dense ones are done
    if run.topo.ep > 1:
        moe.reduce_expert_grads(run.model, run.topo.dp, run.topo.expert_dp_group)
    grad_norm, skipped = run.opt.step(run.cfg.optim.grad_clip, read=False)
    run.opt.zero_grad()
    run.step += 1
    loss = mean_over_dp(loss, run.topo)  # the global batch's loss, the same on every rank
    # Kept on the device, read at the next log (metrics.read_pending): a read waits for the GPU.
    run.tokens_since = run.tokens_since + tokens
    run.labels_since = run.labels_since + labels
    return {"step": run.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped": skipped}


def evaluate_now(run):
    val_loss = evaluate(run.module, run.val, run.device, run.topo, run.cfg.layout.microbatches)
    run.val_losses.append(val_loss)
    metrics.log(run, {"step": run.step, "val_loss": val_loss},
                f"step {run.step:5d} | val loss {val_loss:.4f}")


def train_loop(run):
    """Evaluate at step 0; step; log, evaluate (and at the end), save (and when the loop stops)."""
    settings = run.cfg.settings
    if run.step == 0:
        evaluate_now(run)
    stop_after = settings.stop_after
    stop_at = min(run.max_steps, run.step + stop_after) if stop_after else run.max_steps
    run.t_last = time.perf_counter()
    signal.signal(signal.SIGINT, lambda *_: interrupted(run, "by Ctrl-C"))
    signal.signal(signal.SIGTERM, lambda *_: interrupted(run, "by SIGTERM"))
    while run.step < stop_at:
        rec = train_step(run)
        run.pending.append(rec)
        logs = run.step % settings.log_every == 0 or run.step == stop_at
        # Read at log steps, and before a save (a diverged state is never saved).
        reason = metrics.read_pending(run) if logs or run.step % settings.save_every == 0 else None
        if logs or reason:
            metrics.log_step(run, rec)
        if reason:
            metrics.log(run, {"step": run.step, "stopped": reason},
                        f"step {run.step:5d} | stopped: the run cannot train")
            raise TrainingStopped(f"step {run.step}: {reason}; last good checkpoint: "
                                  f"{describe_last_good(run)}")
        t_pause = time.perf_counter()
        if run.step % settings.eval_every == 0 or run.step == run.max_steps:
            evaluate_now(run)
        if run.step % settings.save_every == 0 or run.step == stop_at:
            save(run)
        # evaluation and saving are not training throughput
        run.t_last += time.perf_counter() - t_pause
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if run.step < run.max_steps and run.rank0:
        print(f"stopped at step {run.step} (--stop-after {stop_after}); rerun the same command to "
              f"continue from step {run.last_good}", flush=True)
    return run


def interrupted(run, how):
    """Ctrl-C (SIGINT, sent by a terminal to every process of the job) or SIGTERM (a scheduler's
    stop): one line from rank 0 and exit status 130 at once, on every rank, wherever it is. Nothing
    is lost by not finishing the step: a checkpoint folder appears only complete (checkpoint.py) and
    metrics.jsonl keeps the records up to the step resumed. Exiting now, rather than at the end of
    the step, is what keeps ranks that would reach that end at different moments from waiting
    forever in a collective for one that has left."""
    if run.rank0:
        resume_from = (f"step {run.last_good}" if run.last_good is not None
                       else "the start (no checkpoint yet)")
        print(f"\nstopped {how} at step {run.step}; rerun the same command to continue from "
              f"{resume_from}", file=sys.stderr, flush=True)
    if run.metrics:
        run.metrics.flush()
    os._exit(130)


def describe_last_good(run):
    return (f"{run.out} at step {run.last_good}" if run.last_good is not None
            else "none (no step was saved)")


def stop_run(prog, e):
    """A run that cannot train (TrainingStopped, raised on every rank at the same step): its reason
    in one line from the first rank, exit status 3 (2 is a bad input)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: stopped: {e}", file=sys.stderr, flush=True)
    end_process_group()
    sys.exit(3)


def finish(run):
    """Close the metrics file; every rank waits for the others (one may still be writing)."""
    if run.metrics:
        run.metrics.close()
    barrier(run)

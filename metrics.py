"""metrics.py: what a run reports, per logged step: a record in metrics.jsonl and a log line.

The idea: a training step should never wait for the GPU, yet the log wants each step's loss,
gradient norm and whether it was skipped. So training.py's train_step keeps them as device tensors,
and a log step reads those of every step since the last log in one host read (read_pending); the
divergence guard (amp.py) then checks them in order, so a run that cannot train still stops at the
same step on every rank. A log step also measures the throughput of the window since the last line
(the loop leaves evaluation and saving out of it) and the model FLOPs utilisation (PaLM, Chowdhery
et al. 2022):

    MFU = tokens/s x training FLOPs per token / peak FLOP/s of all the devices together

with the FLOPs per token of model.flops_per_token (6 N plus the attention term) and the peak of
estimate.peak_flops (the GPU's datasheet; on a CPU, measured). Every record carries the wall-clock
time and the run's elapsed seconds, which go on across a resume; plot.py draws the curves.

Run: not on its own; `python pretrain.py --max-steps 20 --log-every 5 --out out/tiny` prints the
lines and writes out/tiny/metrics.jsonl, `python plot.py out/tiny --svg loss.svg` draws it.
"""
import json
import time

import torch

import moe
from estimate import peak_memory_mb


def log(run, record, line):
    """One record to metrics.jsonl (with the wall-clock time and the run's elapsed seconds, over
    every invocation that built it) and one line to the terminal, from rank 0."""
    if run.rank0:
        record = record | {"time": round(time.time(), 3),
                           "elapsed": round(time.perf_counter() - run.t_start, 3)}
        run.metrics.write(json.dumps(record) + "\n")
        run.metrics.flush()
        print(line, flush=True)


def describe_layout(run):
    """How a global batch is cut and where it runs, for the first log line."""
    lay, topo = run.cfg.layout, run.topo
    n_micro = lay.grad_accum * lay.microbatches
    sp = lay.sequence_parallel and topo.tp > 1
    return (f"{lay.batch_size // (n_micro * topo.dp)} x {n_micro} micro-batches x {topo.dp} "
            "data-parallel"
            + (f" (ZeRO stage {run.zero})" if run.zero
               else " (ddp.py)" if topo.dp * topo.cp > 1 else "")
            + f" | tp {topo.tp}" + (" (sequence-parallel)" if sp else "")
            + f" | pp {topo.pp}" + (f" ({lay.pp_schedule})" if topo.pp > 1 else "")
            + (f" | ep {topo.ep}" if topo.ep > 1 else "")
            + (f" | cp {topo.cp} (ring attention)" if topo.cp > 1 else ""))


def read_pending(run):
    """One host read of the losses, gradient norms and skips of the steps since the last (alike on
    every rank); the guard checks each in order, so a run that cannot train stops here, on every
    rank. Its reason, or None."""
    recs, run.pending = run.pending, []
    if not recs:
        return None
    values = torch.stack([torch.stack([r["loss"].double(), r["grad_norm"].double(),
                                       r["skipped"].double()]) for r in recs]).tolist()
    reason = None
    for rec, (loss, norm, skipped) in zip(recs, values):
        rec.update(loss=loss, grad_norm=norm, skipped=bool(skipped))
        run.losses.append(loss)
        reason = reason or run.guard.check(loss, norm, run.opt.scaler)
    return reason


def log_step(run, rec):
    """Throughput since the last log line: tokens/s (padding included), labelled tokens/s, MFU."""
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - run.t_last
    run.tokens_since, run.labels_since = float(run.tokens_since), float(run.labels_since)
    tps = run.tokens_since / dt
    # The CPU's peak was measured (estimate.peak_flops); a run faster than it has measured a
    # higher one, so MFU never reads above 100%.
    if run.device.type == "cpu":
        run.peak = max(run.peak, tps * run.fpt)
    rec.update(tokens_per_s=tps, labelled_tokens_per_s=run.labels_since / dt,
               mfu=tps * run.fpt / run.peak, peak_mem_mb=peak_memory_mb(run.device))
    scaler = run.opt.scaler
    if scaler.enabled:
        rec["loss_scale"] = scaler.scale
    # The balancing loss, the routed share of the busiest and idlest expert.
    if run.cfg.moe is not None and run.cfg.moe.experts:
        rec["aux_loss"] = float(moe.aux_loss(run.model).detach())
        rec["expert_load_max"], rec["expert_load_min"] = moe.load_spread(run.model)
    masked = run.labels_since < run.tokens_since
    log(run, rec,
        f"step {run.step:5d} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | norm "
        f"{rec['grad_norm']:.3f} | {tps / 1e3:.1f}k tok/s"
        + (f" ({rec['labelled_tokens_per_s'] / 1e3:.1f}k learned)" if masked else "")
        + f" | mfu {rec['mfu']:.1%} | mem {rec['peak_mem_mb']:.0f} MB"
        + (f" | scale {scaler.scale:g}" if scaler.enabled else "")
        + (f" | aux {rec['aux_loss']:.4f} | load max {rec['expert_load_max']:.1%} min "
           f"{rec['expert_load_min']:.1%}" if "aux_loss" in rec else "")
        + (" | skipped" if rec["skipped"] else "")
        + f" | {clock(time.perf_counter() - run.t_start)}")
    run.t_last, run.tokens_since, run.labels_since = time.perf_counter(), 0.0, 0.0


def clock(seconds):
    """Elapsed time as the log shows it: 42s, 3m07s, 2h05m."""
    s = int(seconds)
    return (f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600
            else f"{s // 3600}h{s % 3600 // 60:02d}m")

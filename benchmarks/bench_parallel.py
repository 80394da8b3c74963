"""bench_parallel.py: our model-parallel compositions against torch's own, same model and batches.

    world 4: our ZeRO-3 (zero.py, dp 2) over our tensor parallelism (tensor_parallel.py, tp 2)
             vs FSDP2 (fully_shard over the dp axis of a 2 x 2 device mesh) over torch's
             parallelize_module (ColwiseParallel wq, wk, wv, w1, w3; RowwiseParallel wo, w2; the
             embedding row-wise, the head column-wise with its logits gathered)
    world 2: our 1F1B (pipeline.py, 2 stages, 4 micro-batches)
             vs torch.distributed.pipelining's Schedule1F1B over PipelineStage, the same two stages

gloo, CPU, fp32, AdamW (gradient clipping at 1.0 for the world-4 row, none for the pipeline one:
torch's schedule leaves it to the user). Each run is fresh processes, one thread each; peak memory
is the growth of the peak resident set over the process's footprint before the model is built; step
time the median of --steps steps after --warmup, the slowest rank's; each pair is repeated --repeats
times and the fastest kept. Throughput ratio = their step time / ours (> 1: ours is faster), printed
beside its goal (GOALS; a missed one says so, as in bench_dp.py).

Run: `make bench`, or `python benchmarks/bench_parallel.py --out out/bench/bench_parallel.json`.
"""
import argparse
import json
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pipeline  # noqa: E402
import tensor_parallel  # noqa: E402
import stack  # noqa: E402
from amp import DynamicLossScaler  # noqa: E402
from benchmarks.bench_dp import report_ratios  # noqa: E402
from model import PRESETS, Transformer  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from topology import Topology  # noqa: E402
from zero import ZeroOptimizer  # noqa: E402

CFG = replace(PRESETS["tiny"], n_layer=4, n_head=4, n_kv_head=4, d_model=256, d_ff=704,
              vocab_size=2048, block_size=128)
MICRO_BATCH, MICROBATCHES, LR, CLIP = 4, 4, 1e-3, 1.0


def adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.0)


def batches(n, rows):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, CFG.vocab_size, (n, rows, CFG.block_size + 1), generator=g)


# --------------------------------------------------------------------------- world 4: ZeRO-3 x tp 2
def zero3_tp(rank, impl):
    """(step function) for one rank of dp 2 x tp 2; each dp rank takes half of the global batch."""
    if impl == "ours":
        topo = Topology(tp=2)
        torch.manual_seed(0)
        model = tensor_parallel.parallelize(Transformer(CFG), topo)
        opt = ZeroOptimizer(model, [{"params": list(model.parameters())}], adamw,
                            DynamicLossScaler(False), group=topo.dp_group, stage=3,
                            norm_reduce_fn=stack.grad_norm_reduce(topo))

        def step(x):
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step(CLIP)
            opt.zero_grad()
            return loss
        return topo.dp_rank, step
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    # tp innermost, as topology.py
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = Transformer(CFG)
    for block in model.blocks:
        parallelize_module(block, mesh["tp"], {
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(), "attn.wo": RowwiseParallel(),
            "mlp.w1": ColwiseParallel(), "mlp.w3": ColwiseParallel(), "mlp.w2": RowwiseParallel()})
    parallelize_module(model, mesh["tp"], {"tok_emb": RowwiseParallel(input_layouts=Replicate()),
                                           "lm_head": ColwiseParallel(output_layouts=Replicate())})
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = adamw(model.parameters())

    def step(x):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        clip_dtensor_grads(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        return loss
    return mesh.get_local_rank("dp"), step


def clip_dtensor_grads(params, max_norm):
    """clip_grad_norm_ for FSDP2 over TP: tp-sharded weights live on the 2-D mesh, the norms on its
    dp axis only, and torch's clip_grad_norm_ cannot stack norms of two meshes; each parameter's
    norm is made whole first."""
    grads = [p.grad for p in params if p.grad is not None]
    total = sum(g.norm().full_tensor() ** 2 for g in grads) ** 0.5
    coef = min(1.0, max_norm / (total.item() + 1e-6))
    for g in grads:
        g.mul_(coef)
    return total


# ------------------------------------------------------------------------ world 2: 1F1B on 2 stages
class StageOutput(nn.Module):
    """A pipeline.keep_stage stage for torch's pipelining: tensors in, a tensor (or logits) out."""

    def __init__(self, stage):
        super().__init__()
        self.stage = stage

    def forward(self, x):
        return self.stage(x)[0]


def one_f_one_b(rank, impl):
    topo = Topology(pp=2)
    torch.manual_seed(0)
    model = pipeline.keep_stage(Transformer(CFG), topo)
    opt = adamw(model.parameters())
    if impl == "ours":
        def step(x):
            micro = list(zip(x[:, :-1].chunk(MICROBATCHES), x[:, 1:].chunk(MICROBATCHES)))
            loss = pipeline.run_pipeline(model, micro, topo, "1f1b")
            opt.step()
            opt.zero_grad()
            return loss
        return 0, step
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    stage = PipelineStage(StageOutput(model), rank, 2, torch.device("cpu"))
    loss_fn = lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten())
    schedule = Schedule1F1B(stage, MICROBATCHES, loss_fn=loss_fn)

    def step(x):
        losses = []
        if rank == 0:
            schedule.step(x[:, :-1])
        else:
            schedule.step(target=x[:, 1:], losses=losses)
        opt.step()
        opt.zero_grad()
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        torch.distributed.all_reduce(loss)  # from the last stage, as ours reports it
        return loss
    return 0, step


# world, builder, data-parallel ranks, rows per data-parallel rank per step
ROWS = {"zero3-tp2": (4, zero3_tp, 2, MICRO_BATCH),
        "1f1b-pp2": (2, one_f_one_b, 1, MICRO_BATCH * MICROBATCHES)}
# Throughput goals, ours / torch's, as bench_dp.py's: ZeRO-3 (here over tp) as its ZeRO-3 row; 1F1B,
# the same operations in the same order as torch's schedule, as its DDP row. Memory: at most 1x.
GOALS = {"zero3-tp2": 0.9, "1f1b-pp2": 0.95}


def run_one(rank, world, row, impl, steps, warmup):
    _, build, dp, rows = ROWS[row]
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dp_rank, step = build(rank, impl)
    times, losses = [], []
    for i, batch in enumerate(batches(warmup + steps, dp * rows)):
        x = batch.chunk(dp)[dp_rank]
        t0 = time.perf_counter()
        loss = step(x)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach().full_tensor() if hasattr(loss, "full_tensor")
                            else loss.detach()))
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024
    return {"step_s": statistics.median(times), "peak_rss_growth_mb": peak_mb, "losses": losses}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rows", nargs="*", default=list(ROWS))
    ap.add_argument("--out", default="out/bench/bench_parallel.json")
    args = ap.parse_args(argv)
    n_params = sum(p.numel() for p in Transformer(CFG).parameters())
    print(f"model: {n_params:,} parameters, fp32, gloo, CPU, 1 thread per rank; per "
          f"data-parallel rank and step {MICRO_BATCH} x {CFG.block_size} tokens (zero3-tp2), "
          f"{MICROBATCHES} micro-batches of that (1f1b-pp2)", flush=True)
    result = {"params": n_params, "rows": {}}
    for row in args.rows:
        world, _, dp, rows = ROWS[row]
        best = {}
        for rep in range(args.repeats):
            for impl in ("ours", "torch"):
                per_rank = run_distributed(run_one, world, row, impl, args.steps, args.warmup)
                step_s = max(r["step_s"] for r in per_rank)
                mem = max(r["peak_rss_growth_mb"] for r in per_rank)
                print(f"  {row} repeat {rep}: {impl:<6} {step_s * 1e3:8.1f} ms/step  "
                      f"peak RSS growth {mem:7.1f} MB/rank  "
                      f"last loss {per_rank[0]['losses'][-1]:.4f}", flush=True)
                if impl not in best or step_s < best[impl]["step_s"]:
                    best[impl] = {"step_s": step_s, "mem": mem, "losses": per_rank[0]["losses"]}
        ours, theirs = best["ours"], best["torch"]
        tokens = dp * rows * CFG.block_size
        result["rows"][row] = {
            "world": world, "tokens_per_s": {k: tokens / v["step_s"] for k, v in best.items()},
            "peak_rss_growth_mb_per_rank": {k: v["mem"] for k, v in best.items()},
            "throughput": theirs["step_s"] / ours["step_s"], "goal": GOALS[row],
            "memory": ours["mem"] / theirs["mem"],
            "max_loss_difference": max(abs(a - b)
                                       for a, b in zip(ours["losses"], theirs["losses"]))}
    for row, r in result["rows"].items():
        print(f"{row} (world {r['world']}): ours {r['tokens_per_s']['ours']:.0f} vs torch "
              f"{r['tokens_per_s']['torch']:.0f} tokens/s")
    report_ratios(result["rows"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()

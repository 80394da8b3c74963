"""bench_dp.py: our ddp.py against torch.nn.parallel.DistributedDataParallel, and our ZeRO-3
(zero.py) against torch FSDP2 (torch.distributed.fsdp.fully_shard), on the same model and batches.

World size 2, gloo, CPU, fp32, AdamW and gradient clipping at 1.0 in all four. Each implementation
runs in fresh processes (one thread each), so that the peak resident memory a rank reaches is its
own: reported as the growth of the peak RSS over the process's footprint before the model is built
(weights, gradients, optimizer states, activations, communication buffers, allocator slack). Step
time: the median of --steps timed steps after --warmup; the four runs are repeated --repeats times
in turn and each one's fastest median is kept, to damp the noise of a shared machine. Throughput
ratio = their step time / ours (> 1: ours is faster). Goals: throughput at least 0.95x (DDP), 0.9x
(ZeRO-3); peak memory at most 1x. A ratio that misses its goal is printed as such ("below goal
(x0.812 < x0.95)"), and a last line names the pairs.

Run: `make bench`, or `python benchmarks/bench_dp.py --out out/bench/bench_dp.json` (about a minute
on 2 cores).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ddp import DistributedDataParallel  # noqa: E402
from model import PRESETS, Transformer  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from zero import ZeroOptimizer  # noqa: E402
from amp import DynamicLossScaler  # noqa: E402

CFG = replace(PRESETS["tiny"], n_layer=4, n_head=4, n_kv_head=4, d_model=256, d_ff=704,
              vocab_size=2048, block_size=128)
MICRO_BATCH, LR, CLIP = 4, 1e-3, 1.0


def adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.0)


def run_one(rank, world, impl, steps, warmup):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as TorchDDP
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    model = Transformer(CFG)
    if impl == "ours-ddp":
        module = DistributedDataParallel(model, bucket_mb=25)
        opt = adamw(model.parameters())
    elif impl == "torch-ddp":
        module = TorchDDP(model, bucket_cap_mb=25)
        opt = adamw(model.parameters())
    elif impl == "ours-zero3":
        module = model
        opt = ZeroOptimizer(model, [{"params": list(model.parameters())}], adamw,
                            DynamicLossScaler(False), stage=3)
    else:  # torch-fsdp2: each block a unit, then the root, as ours
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        module = fully_shard(model, mesh=mesh)
        opt = adamw(model.parameters())
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, CFG.vocab_size,
                         (warmup + steps, world * MICRO_BATCH, CFG.block_size + 1), generator=g)
    times, losses = [], []
    for i, batch in enumerate(data):
        x = batch.chunk(world)[rank]
        t0 = time.perf_counter()
        _, loss = module(x[:, :-1], x[:, 1:])
        loss.backward()
        if impl == "ours-zero3":
            opt.step(CLIP)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
        opt.zero_grad()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024
    return {"step_s": statistics.median(times), "peak_rss_growth_mb": peak_mb, "losses": losses}


def meets(ratio, goal, at_least=True):
    return ratio >= goal if at_least else ratio <= goal


def against_goal(what, ratio, goal, at_least=True):
    """One measured ratio (ours / torch's) beside its goal, a floor (throughput) or a ceiling
    (memory): `throughput 1.015x (goal >= 0.95x)`; a ratio that misses it says so:
    `throughput 0.812x: below goal (x0.812 < x0.95)`,
    `peak memory 1.050x: over goal (x1.050 > x1)`."""
    if meets(ratio, goal, at_least):
        return f"{what} {ratio:.3f}x (goal {'>=' if at_least else '<='} {goal:g}x)"
    how, sign = ("below", "<") if at_least else ("over", ">")
    return f"{what} {ratio:.3f}x: {how} goal (x{ratio:.3f} {sign} x{goal:g})"


def report_ratios(ratios):
    """Each pair's line: throughput against its goal, peak memory against 1 (no more than torch's),
    how well the losses agree; then, if any ratio missed its goal, a last line naming the pairs."""
    missed = []
    for name, r in ratios.items():
        print(f"{name}: {against_goal('throughput', r['throughput'], r['goal'])}, "
              f"{against_goal('peak memory', r['memory'], 1.0, at_least=False)}, "
              f"losses agree to {r['max_loss_difference']:.1e}")
        if not (meets(r["throughput"], r["goal"]) and meets(r["memory"], 1.0, at_least=False)):
            missed.append(name)
    if missed:
        print(f"goal missed by: {', '.join(missed)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="out/bench/bench_dp.json")
    ap.add_argument("--only", nargs="*", default=None,
                    help="a subset of the four runs (no ratios then)")
    args = ap.parse_args(argv)
    world, impls = 2, args.only or ["ours-ddp", "torch-ddp", "ours-zero3", "torch-fsdp2"]
    n_params = sum(p.numel() for p in Transformer(CFG).parameters())
    print(f"model: {n_params:,} parameters, fp32; world {world} (gloo, CPU, 1 thread per rank); "
          f"{MICRO_BATCH} x {CFG.block_size} tokens per rank per step", flush=True)
    best = {}
    for rep in range(args.repeats):
        for impl in impls:
            per_rank = run_distributed(run_one, world, impl, args.steps, args.warmup)
            step_s = max(r["step_s"] for r in per_rank)  # a step ends when the slowest rank's does
            mem = max(r["peak_rss_growth_mb"] for r in per_rank)
            print(f"  repeat {rep}: {impl:<12} {step_s * 1e3:8.1f} ms/step  peak RSS growth "
                  f"{mem:7.1f} MB/rank  last loss {per_rank[0]['losses'][-1]:.4f}", flush=True)
            if impl not in best or step_s < best[impl]["step_s"]:
                best[impl] = {"step_s": step_s, "peak_rss_growth_mb": mem,
                              "losses": per_rank[0]["losses"]}
    tokens = world * MICRO_BATCH * CFG.block_size
    result = {"params": n_params, "world": world, "tokens_per_step": tokens, "runs": {},
              "ratios": {}}
    for impl, r in best.items():
        result["runs"][impl] = {"step_s": r["step_s"], "tokens_per_s": tokens / r["step_s"],
                                "peak_rss_growth_mb_per_rank": r["peak_rss_growth_mb"]}
    for ours, theirs, goal in (("ours-ddp", "torch-ddp", 0.95), ("ours-zero3", "torch-fsdp2", 0.9)):
        if ours not in best or theirs not in best:
            continue
        a, b = best[ours], best[theirs]
        result["ratios"][f"{ours}/{theirs}"] = {
            "throughput": b["step_s"] / a["step_s"], "goal": goal,
            "memory": a["peak_rss_growth_mb"] / b["peak_rss_growth_mb"],
            "max_loss_difference": max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))}
    print(f"\n{'':<12}{'tokens/s':>10}{'peak RSS growth/rank':>24}")
    for impl, r in result["runs"].items():
        print(f"{impl:<12}{r['tokens_per_s']:>10.0f}{r['peak_rss_growth_mb_per_rank']:>21.1f} MB")
    report_ratios(result["ratios"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()

"""bench_build.py: the memory of building a rank's model: whole-then-cut vs meta-then-materialise.

Each case is one fresh process that builds rank r of a world-4 layout (a topology of the right
coordinates and no process group: building communicates nothing) and reports its peak resident
memory (VmHWM, from /proc/self/status) right after stack.build_model and the optimizer's
construction, next to the bytes of the parameters it holds and to its resident memory before
building (torch imported, a tiny model built once so that torch's own first-use allocations are not
counted as the model's). Two ways to build:

    whole   the whole model on the device (every parameter allocated and drawn), then cut to the
            rank's stage, slices and experts: what every rank did before the meta build (its peak:
            the whole model)
    meta    stack.build_model: built on the meta device, cut there, only the rank's pieces allocated
            and drawn (its peak: its pieces plus one block of draws)

and the same for --init: the whole state dict read into memory and loaded into the whole model,
against the file memory-mapped and only this rank's blocks copied out (weights.read_box). ZeRO-3 is
not in the picture: its shards are cut (zero.py) from the tp/pp/ep piece a rank builds, which is the
peak, then freed down to 1/dp.

Run: `nice -n 10 python benchmarks/bench_build.py` (the 1b preset: 1.2B parameters, 4.9 GB in fp32;
about 6 GB at most in one process at a time, a few minutes on 2 cores). `--init-model gpt2-124m`
chooses the preset of the --init part (its whole file is written to a temporary folder).
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pipeline  # noqa: E402
import tensor_parallel  # noqa: E402
import stack  # noqa: E402
from model import PRESETS, Transformer  # noqa: E402
from weights import load_weights  # noqa: E402

LAYOUTS = {"tp2pp2": (2, 2), "tp4": (4, 1), "pp4": (1, 4)}


def fake_topology(rank, tp, pp):
    """Rank `rank` of a tp x pp world (dp 1): its coordinates; no groups (building needs none)."""
    pp_rank, tp_rank = divmod(rank, tp)
    return SimpleNamespace(world=tp * pp, rank=rank, tp=tp, pp=pp, ep=1, cp=1, dp=1,
                           tp_rank=tp_rank, pp_rank=pp_rank, ep_rank=0, cp_rank=0, dp_rank=0,
                           expert_dp_rank=0, tp_group=None, ep_group=None,
                           is_first_stage=pp_rank == 0, is_last_stage=pp_rank == pp - 1)


def rss_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(model_name, layout, rank, how, init):
    """One case in this process: its figures as one JSON line."""
    torch.set_num_threads(1)
    cfg = PRESETS[model_name]
    tp, pp = LAYOUTS[layout]
    topo = fake_topology(rank, tp, pp)
    tiny = replace(PRESETS["tiny"], n_layer=pp, n_head=4 * tp, n_kv_head=tp)
    # warm-up: torch's first-use costs (about 100 MB of lazy initialisation) are not the model's
    stack.build_model(tiny, topo, 0, torch.device("cpu"), torch.float32)
    Transformer(tiny)
    before = rss_mb("VmRSS")
    t0 = time.perf_counter()
    if how == "meta":
        weights = load_weights(init)["model"] if init else None
        model = stack.build_model(cfg, topo, 0, torch.device("cpu"), torch.float32, weights=weights)
    else:  # the whole model first, as every rank built it before
        torch.manual_seed(0)
        model = Transformer(cfg)
        if init:
            model.load_state_dict(torch.load(init, map_location="cpu", weights_only=False)["model"])
        tensor_parallel.parallelize(pipeline.keep_stage(model, topo), topo)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # (Adam's moments come at the first step)
    seconds = time.perf_counter() - t0
    held = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    print(json.dumps({"model": model_name, "layout": layout, "rank": rank, "how": how,
                      "init": bool(init), "before_mb": round(before),
                      "peak_mb": round(rss_mb("VmHWM")), "params_mb": round(held),
                      "seconds": round(seconds, 1)}), flush=True)
    del opt


def run_case(*argv):
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, argv)],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"bench_build.py: case {argv} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1b", choices=sorted(PRESETS))
    ap.add_argument("--init-model", default="gpt2-124m", choices=sorted(PRESETS))
    ap.add_argument("--layouts", default="tp2pp2,tp4")
    ap.add_argument("--out", default=None, help="write the rows as JSON here too")
    ap.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, layout, rank, how, init = args.child
        return child(name, layout, int(rank), how, init if init != "-" else None)
    print(f"{'model':<10} {'layout':<7} {'rank':>4} {'build':<6} {'--init':<6} {'params MB':>10} "
          f"{'RSS before MB':>14} {'peak RSS MB':>12} {'peak - before':>14} {'s':>6}", flush=True)
    rows = []

    # one process after the other (never two whole models at once); each row when it is done
    def case(*argv):
        r = run_case(*argv)
        rows.append(r)
        print(f"{r['model']:<10} {r['layout']:<7} {r['rank']:>4} {r['how']:<6} "
              f"{'file' if r['init'] else '-':<6} "
              f"{r['params_mb']:>10,} {r['before_mb']:>14,} {r['peak_mb']:>12,} "
              f"{r['peak_mb'] - r['before_mb']:>14,} "
              f"{r['seconds']:>6}", flush=True)

    for layout in args.layouts.split(","):
        # whole: one rank stands for all (each builds the same whole model first); meta: every rank
        case(args.model, layout, 0, "whole", "-")
        for r in range(4):
            case(args.model, layout, r, "meta", "-")
    with tempfile.TemporaryDirectory() as d:  # --init: a consolidated file of the smaller preset
        cfg = PRESETS[args.init_model]
        torch.manual_seed(0)
        sd = Transformer(cfg).state_dict()
        torch.save({"model": sd, "model_config": asdict(replace(cfg, attn="-")),
                    "tokenizer": "gpt2"}, Path(d) / "model.pt")
        del sd
        layout = args.layouts.split(",")[0]
        case(args.init_model, layout, 0, "whole", Path(d) / "model.pt")
        for r in range(4):
            case(args.init_model, layout, r, "meta", Path(d) / "model.pt")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""bench_checkpoint.py: what the layout-free checkpoint costs, on the gpt2-124m preset.

Four CPU processes train one bf16 step of it (GPT-2's 50,304 vocabulary) as ZeRO-3 x tp 2 (dp 2)
and save: the bytes each rank writes and the time of the save. The same four then resume the
checkpoint as tp 2 x pp 2 (another layout): the bytes of pieces each rank copies in and the time of
the load. Then, in one process, `consolidate` (one whole-model file) and `export-hf` (a Hugging Face
folder), timed, with their sizes. Expected sizes: 14 bytes per parameter in all (2 bf16 weights
+ 4 master + 4 + 4 AdamW moments), 1/4 of it per rank; consolidated: 4 bytes per parameter.

Run: `nice -n 10 python benchmarks/bench_checkpoint.py --out out/bench/bench_checkpoint.json` (a few
minutes, about 6 GB of memory in all, on 2 cores).
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoint  # noqa: E402
import pretrain  # noqa: E402
import reshard  # noqa: E402
import stack  # noqa: E402
import training  # noqa: E402
import hf  # noqa: E402
import weights  # noqa: E402
from model import PRESETS, Transformer  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from topology import Topology  # noqa: E402

CFG, T, B = PRESETS["gpt2-124m"], 32, 4


def build(topo, zero):
    cfg = pretrain.parse(["--zero", str(zero), "--amp", "bf16", "--lr", "1e-4"])
    model = stack.build_model(CFG, topo, 0, torch.device("cpu"), torch.bfloat16, experts=cfg.moe)
    return (model, *stack.build_training(model, cfg, torch.bfloat16, topo))


def _ranks(rank, world, out):
    topo = Topology(tp=2)
    model, module, opt = build(topo, zero=3)
    x = torch.randint(0, CFG.vocab_size, (B // topo.dp, T + 1),
                      generator=torch.Generator().manual_seed(topo.dp_rank))
    training.forward_backward(module, [(x[:, :-1], x[:, 1:])], topo, "1f1b", opt.scale_loss, "cpu",
                              opt.no_sync)
    opt.step(1.0)
    t0 = time.perf_counter()
    checkpoint.save(out, 1, model, opt, topo, {"data": {"step": 1}, "model_config": vars(CFG),
                                               "tokenizer": "gpt2"})
    t_save = time.perf_counter() - t0
    written = (Path(out) / "step_000001" / f"rank{rank}.pt").stat().st_size
    del model, module, opt
    topo = Topology(tp=2, pp=2)
    model, module, opt = build(topo, zero=0)
    copied, copy = [0], reshard.copy_overlap

    def counting(dst, dst_rects, src, src_rects):
        n = copy(dst, dst_rects, src, src_rects)
        copied[0] += n * src.element_size()
        return n
    reshard.copy_overlap = counting
    t0 = time.perf_counter()
    checkpoint.load(out, model, opt, topo)
    return {"written": written, "save_s": t_save, "read": copied[0],
            "load_s": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/bench/bench_checkpoint.json")
    args = ap.parse_args()
    n_params = sum(p.numel() for p in Transformer(CFG).parameters())
    with tempfile.TemporaryDirectory() as tmp:
        ranks = run_distributed(_ranks, 4, tmp)
        t0 = time.perf_counter()
        weights.consolidate(tmp, Path(tmp) / "model.pt")
        t_cons = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf.export_hf(Path(tmp) / "model.pt", Path(tmp) / "hf")
        t_hf = time.perf_counter() - t0
        sizes = {"consolidated": (Path(tmp) / "model.pt").stat().st_size,
                 "safetensors": (Path(tmp) / "hf" / "model.safetensors").stat().st_size}
    total = sum(r["written"] for r in ranks)
    result = {"params": n_params, "ranks": ranks, "written_total": total,
              "bytes_per_param": total / n_params, "consolidate_s": t_cons, "export_hf_s": t_hf,
              **sizes}
    print(f"gpt2-124m: {n_params:,} parameters; saved by ZeRO-3 x tp 2 on 4 ranks: "
          f"{total / 2**20:.0f} MB ({total / n_params:.2f} bytes/parameter)")
    for r, x in enumerate(ranks):
        print(f"  rank {r}: wrote {x['written'] / 2**20:.0f} MB in {x['save_s']:.1f} s | resumed "
              f"as tp 2 x pp 2: read {x['read'] / 2**20:.0f} MB of pieces, load "
              f"{x['load_s']:.1f} s")
    print(f"consolidate: {sizes['consolidated'] / 2**20:.0f} MB in {t_cons:.1f} s | export-hf: "
          f"{sizes['safetensors'] / 2**20:.0f} MB in {t_hf:.1f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

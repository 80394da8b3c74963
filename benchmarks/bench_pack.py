"""bench_pack.py: sft.py --pack against padded rows, on the embedded SFT set, one process on CPU.

Both runs fine-tune the same base (the tiny preset, or --model; random weights: speed does not
depend on them) on the same examples per step (the step's examples are packed, never changed, so
both runs take the same steps and losses to rounding): padded puts one example per row, padded to
the micro-batch's longest; --pack puts examples first-fit, longest first, into rows of the context's
length with attention blocked between them. Reported: step time (median over the timed steps, after
warm-up), tokens/s (the tensor's tokens, padding included), response tokens/s (the tokens that carry
a loss), the padding fraction of each run's batches and the fraction of padding removed, and the
ratio packed / padded of response tokens per second. Runs are interleaved --repeats times; each
keeps its fastest median.

Run: `python benchmarks/bench_pack.py` (a minute or two on 2 cores; on a shared machine, with
`nice -n 10` in front).
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import sft  # noqa: E402
import sft_data  # noqa: E402
import training  # noqa: E402
from model import PRESETS, Transformer, pad_vocab  # noqa: E402


def make_base(folder, preset):
    torch.manual_seed(0)
    cfg = replace(PRESETS[preset], vocab_size=pad_vocab(data.get_tokenizer("bytes").n_vocab))
    cfg_dict = asdict(replace(cfg, attn="-", activation_checkpointing=False))
    # a consolidated checkpoint (weights.py), as sft.py --init reads
    torch.save({"model": Transformer(cfg).state_dict(), "model_config": cfg_dict,
                "tokenizer": "bytes"}, folder / "model.pt")
    return folder / "model.pt"


def timed_run(base, out, pack, args):
    """sft.py's run, each step of the shared loop (training.train_step) timed."""
    argv = ["--init", str(base), "--out", str(out), "--batch-size", str(args.batch_size),
            "--max-steps", str(args.steps), "--samples", "0", "--eval-examples", "1",
            "--attn", args.attn, "--log-every", "1000"]
    argv += ["--pack"] if pack else []
    timings, original = [], training.train_step

    def step(run):
        t0 = time.perf_counter()
        rec = original(run)
        timings.append(time.perf_counter() - t0)
        return rec

    training.train_step = step
    try:
        sft.main(argv)
    finally:
        training.train_step = original
    return statistics.median(timings[args.warmup:])


def batch_sizes(base, pack, args):
    """Tokens in the steps' tensors, tokens of the examples themselves, response tokens (the same
    examples either way: sft.py's batches with its seed)."""
    init = sft.load_init(base)
    enc, T = data.get_tokenizer(init["tokenizer"]), init["model_config"]["block_size"]
    train_ex, _ = sft_data.read_examples(None, None)
    rows, _ = sft_data.tokenize(train_ex, enc, T)

    def make(r):  # the batch, and its examples' own tokens
        batch = (sft_data.pack(r, data.eot_id(enc), T) if pack
                 else sft_data.collate(r, data.eot_id(enc)))
        return batch, sum(len(x) for x, _ in r)
    batches = sft_data.SFTBatches(rows, args.batch_size, make, seed=1337)
    tokens = real = labels = 0
    for _ in range(args.steps):
        ((x, y, *_), n), = batches.next()
        tokens, real, labels = tokens + x.numel(), real + n, labels + int((y != -100).sum())
    return tokens, real, labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--model", default="tiny", choices=sorted(PRESETS),
                    help="the base's preset: its context is the packed rows' length "
                         "(tiny 256, small 512)")
    ap.add_argument("--out", default=None, help="write the figures here as JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = make_base(tmp, args.model)
        best = {}
        for rep in range(args.repeats):
            for pack in (False, True):
                med = timed_run(base, tmp / f"o{rep}{pack}", pack, args)
                best[pack] = min(best.get(pack, med), med)
        sizes = {pack: batch_sizes(base, pack, args) for pack in (False, True)}
    report = {}
    for pack in (False, True):
        tokens, real, labels = sizes[pack]
        report["packed" if pack else "padded"] = {
            "step_s": best[pack], "tokens_per_step": tokens / args.steps,
            "padding_fraction": 1 - real / tokens, "tokens_per_s": tokens / args.steps / best[pack],
            "response_tokens_per_s": labels / args.steps / best[pack]}
    (t0, real, _), (t1, _, _) = sizes[False], sizes[True]
    report["padding_removed"] = 1 - (t1 - real) / (t0 - real)
    report["response_tokens_per_s_packed_over_padded"] = best[False] / best[True]
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

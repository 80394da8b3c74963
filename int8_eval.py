"""int8_eval.py: INT8 weight-only quantization of a trained checkpoint, measured against its bf16
model: validation loss, bytes, and greedy generation speed.

Post-training quantization (quantization.py's quantize_model_int8) stores each linear's weight row j
as int8 with its own scale s_j = max|W_j| / 127; the embedding and the norms stay in bf16. Its cost,
if any, is a rise of the loss, measured here on validation batches; what it buys is bytes: 1 per
weight instead of 2. Decoding one token at a time reads every weight for 2 FLOPs each, so it is
bound by memory traffic, which int8 halves; prefilling many rows is bound by compute, where
weight-only int8 buys nothing. Both models generate from the same prompt, timed alternately so that
both see the same machine load (the fastest of --repeats counts), greedily, so that their outputs
can be compared token by token.

Run: `python pretrain.py --amp bf16 --max-steps 300 --out out/bf16 && python int8_eval.py out/bf16`
(CKPT: a run's --out folder on any layout, a consolidated file, or a Hugging Face Llama folder).
"""
import argparse
import copy
import sys
import time

import torch

import data as data_lib
from batches import eval_batches
from checkpoint import CheckpointError
from model import ModelConfig, Transformer
from quantization import model_bytes, quantize_model_int8
from weights import load_weights


class EvalError(ValueError):
    """A bad argument: the message is the one line the user sees."""


def load_trained(path):
    """(model, tokenizer) from any checkpoint the project writes or reads (a run's --out folder on
    any layout, a consolidated file, a Hugging Face Llama folder: weights.load_weights)."""
    try:
        whole = load_weights(path)
    except CheckpointError as e:
        raise EvalError(str(e)) from None  # (the message names the path)
    cfg = ModelConfig(**{**whole["model_config"], "attn": "sdpa",
                         "activation_checkpointing": False})
    model = Transformer(cfg)
    model.load_state_dict(whole["model"])
    return model.eval(), whole["tokenizer"]


@torch.no_grad()
def val_loss(model, batches):
    return torch.stack([model(x, y)[1].double() for x, y in batches]).mean().item()


@torch.no_grad()
def generation_seconds(model, prompt, n_tokens):
    t0 = time.perf_counter()
    # greedy: the two models' outputs can be compared
    out = model.generate(prompt, n_tokens, temperature=0)
    return time.perf_counter() - t0, out[0, prompt.shape[1]:]


def parse(argv):
    p = argparse.ArgumentParser(prog="int8_eval.py",
                                description="INT8 weight-only PTQ of a checkpoint against its bf16 "
                                            "model: validation loss, bytes, generation tokens/s")
    p.add_argument("ckpt", help="a run's --out folder (any layout), a consolidated file or a "
                                "Hugging Face folder")
    p.add_argument("--data", default=None,
                   help="prepared data folder (default: the embedded corpus)")
    p.add_argument("--eval-iters", type=int, default=20, help="validation batches")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per validation batch")
    p.add_argument("--gen-tokens", type=int, default=100, help="tokens generated per timing")
    p.add_argument("--repeats", type=int, default=3,
                   help="timings per model, alternating; the fastest counts")
    args = p.parse_args(argv)
    for flag in ("eval_iters", "batch_size", "gen_tokens", "repeats"):
        if getattr(args, flag) < 1:
            raise EvalError(f"--{flag.replace('_', '-')} must be at least 1, "
                            f"got {getattr(args, flag)}")
    return args


def evaluate(argv):
    """The table of both models (val loss, bytes, tokens/s) and how far their outputs agree."""
    args = parse(argv)
    model, tokenizer = load_trained(args.ckpt)
    data_dir = args.data or data_lib.ensure_default_data(tokenizer)
    # a DataError if the data was prepared with another tokenizer
    data_lib.load_meta(data_dir, tokenizer)
    val = eval_batches(data_dir, model.cfg.block_size, args.batch_size, args.eval_iters)
    enc = data_lib.get_tokenizer(tokenizer)
    prompt = torch.tensor([enc.encode_ordinary("def ")])

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    # from the checkpoint's own weights, not from bf16's
    int8 = quantize_model_int8(model, torch.bfloat16)
    models = {"bf16": bf16, "int8": int8}
    seconds, text = {k: [] for k in models}, {}
    for _ in range(args.repeats):  # alternate, so that both see the same machine load
        for name, m in models.items():
            s, text[name] = generation_seconds(m, prompt, args.gen_tokens)
            seconds[name].append(s)
    rows = {name: (val_loss(m, val), model_bytes(m), args.gen_tokens / min(seconds[name]))
            for name, m in models.items()}
    print(f"{args.ckpt}: {sum(p.numel() for p in bf16.parameters()):,} parameters, "
          f"{len(val)} x {args.batch_size} x {model.cfg.block_size} validation tokens, "
          f"greedy generation of {args.gen_tokens} tokens "
          f"(fastest of {args.repeats}, {torch.get_num_threads()} threads)")
    print(f"{'model':<6} {'val loss':>9} {'bytes':>12} {'tokens/s':>9}")
    for name, (loss, nbytes, tps) in rows.items():
        print(f"{name:<6} {loss:>9.4f} {nbytes:>12,} {tps:>9.1f}")
    (lb, bb, tb), (li, bi, ti) = rows["bf16"], rows["int8"]
    same = int((text["bf16"] == text["int8"]).cumprod(0).sum())
    print(f"int8 vs bf16: val loss {li - lb:+.5f} nats, bytes {bi / bb:.3f}x, "
          f"generation {ti / tb:.2f}x tokens/s; "
          f"greedy outputs agree on the first {same} of {args.gen_tokens} tokens")
    return rows


def main(argv=None):
    try:
        return evaluate(sys.argv[1:] if argv is None else argv)
    except EvalError as e:
        print(f"int8_eval.py: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

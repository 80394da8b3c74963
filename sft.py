"""sft.py: supervised fine-tuning: teach a pretrained model to answer, learning only the answers.

The idea: an instruction example is a prompt and a response rendered into one token sequence by a template.
The model is trained exactly as in pretraining (next-token cross-entropy), except that the labels are -100
on the prompt and on padding, and model.py's loss ignores -100: the prompt is context, never a target, so the
gradient comes only from response tokens. The template (Alpaca's headers), learned part in [brackets]:

    ### System:               (chat-style only, when given)
    {system}

    ### Instruction:
    {instruction}

    ### Input:                (only when the example has one)
    {input}

    ### Response:
    [{output}<|endoftext|>]

Chat-style lines ({"messages": [{"role": "system|user|assistant", "content": ...}, ...]}) use the same
headers per turn; every assistant turn, with its end-of-text token, is learned, everything else is masked.
Alpaca-style lines ({"instruction", "input" (optional), "output"}) are a one-turn chat.

Batches: one example per row, padded on the right to the longest row of its micro-batch (padding labels -100).
Attention is causal, so a real token never sees the padding after it, and no example sees another: no
cross-contamination, at the cost of the padded positions' compute (packing would save it but needs a
block-diagonal mask). Examples longer than the context are skipped and counted, never silently truncated; a
prompt that alone fills the context is an error.

Loss normalisation: with masks, micro-batches hold different numbers of response tokens. Each micro-batch's
summed loss is divided by the number of response tokens in the whole optimizer step, on every data-parallel
rank (one all-reduce of a count), so accumulation and data parallelism give the gradient of the mean over the
step's tokens, exactly as one big batch would (a per-micro-batch mean would weight a token in a short
micro-batch more). Data parallelism is pretrain.py's: ddp.py (--zero 0) or ZeRO stages 1-2 (zero.py); with
LoRA only the adapters reach the optimizer, so only they are sharded.

The embedded default data, offline: from the pretraining corpus (the Python standard library), every short
function with a docstring becomes "Write a Python function `name(args)` that: <docstring's first paragraph>"
-> its source without the docstring (ast); held out by module (crc32 of its path % 10 == 0, a superset of the
modules pretraining held out, % 50). Evaluation: the response-only loss on held-out examples, before training
and at each eval; at the end, greedy answers to a few held-out prompts.

Cost: as pretraining, about 6 N FLOPs per token, padded positions included; the log's tokens/s counts them.

Run:
    python sft.py --init out/pretrain                          # full fine-tuning on the embedded default
    python sft.py --init out/pretrain --lora-r 8 --lora-targets wq,wk,wv,wo,w1,w2,w3 --lr 3e-3
    python sft.py --init out/pretrain --data my.jsonl --val-data my_val.jsonl
    torchrun --nproc_per_node 2 sft.py --init out/pretrain --zero 2 --lora-r 8    # data parallel, as pretrain.py
    make sft                                                   # pretrains first if out/pretrain has no checkpoint
"""
import contextlib
import json
import sys
import time
import zlib
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

import data as data_lib
import lora as lora_lib
from amp import DTYPES, DivergenceGuard, TrainingStopped, cast_model
from model import ATTN_BACKENDS, PRESETS, ModelConfig, Transformer, num_params
from checkpoint import (CheckpointError, check_checkpoint_layout, checkpoint_path, load_checkpoint, rng_state,
                        save_checkpoint, set_rng_state)
from pretrain import (ConfigError, OneLineParser, build_training, check_values, lr_at, peak_memory_mb,
                      setup_distributed, stop_run)
from topology import Topology
from data import SFTBatches, collate, ensure_sft_default_data, prompt_ids, read_jsonl, tokenize

# ------------------------------------------------------------------------------------------- the model
def load_init(path):
    """A pretrain.py or sft.py checkpoint (a folder holding ckpt.pt, or the file): model, config, tokenizer."""
    p = Path(path)
    f = p / "ckpt.pt" if p.is_dir() else p
    if p.is_dir() and not f.exists() and (p / "ckpt.rank0.pt").exists():
        f = p / "ckpt.rank0.pt"  # a data-parallel run's: under ZeRO-1/2 each rank holds the whole model
    if not f.exists():
        raise ConfigError(f"--init {path}: no checkpoint there (run pretrain.py --out {path} first, or `make "
                          "pretrain`)")
    try:
        ckpt = torch.load(f, map_location="cpu", weights_only=False)
        missing = {"model", "model_config", "tokenizer"} - set(ckpt)
    except Exception as e:
        raise ConfigError(f"--init {f}: not a readable checkpoint ({type(e).__name__})") from None
    if missing:
        raise ConfigError(f"--init {f}: not a model checkpoint (missing {', '.join(sorted(missing))})")
    if any(".lora_" in k for k in ckpt["model"]):
        raise ConfigError(f"--init {f} holds LoRA adapters: start from its merged.pt, or pass --adapter")
    return ckpt


def check_init_config(init, args):
    """--model, when given, must be the preset the checkpoint was trained as (vocabulary as the checkpoint's)."""
    if args.model is not None:
        want = asdict(replace(PRESETS[args.model], vocab_size=init["model_config"]["vocab_size"], attn="-"))
        if want != init["model_config"]:
            diff = sorted(k for k in want if want[k] != init["model_config"].get(k))
            raise ConfigError(f"--init {args.init} is a checkpoint of another model config than --model "
                              f"{args.model} (differs in {', '.join(diff)})")


def build_model(init, args, device):
    cfg = replace(ModelConfig(**init["model_config"]), attn=args.attn)
    model = Transformer(cfg)
    model.load_state_dict(init["model"])
    return model.to(device)


# ------------------------------------------------------------------------------------------- steps
def train_step(model, opt, micro_batches, device, topo=None):
    """One optimizer step's forward and backward. Every micro-batch's summed loss is divided by the response
    tokens of the whole step over every data-parallel rank, so the accumulated gradients are those of the
    step's token mean. ddp.py and zero.py average gradients over the dp ranks: the loss is multiplied by dp so
    that their average is this sum. Returns this rank's share of the step's mean loss (a sum over ranks)."""
    n = torch.tensor(float(sum(int((y != -100).sum()) for _, y in micro_batches)), device=device)
    dp = topo.dp if topo is not None else 1
    if dp > 1:
        dist.all_reduce(n, group=topo.dp_group)
    loss_sum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        # Only the last micro-step's backward communicates (ddp.py; ZeRO-2 reduce-scatters every time).
        with opt.no_sync() if dp > 1 and i < len(micro_batches) - 1 else contextlib.nullcontext():
            _, loss = model(x.to(device), y.to(device), reduction="sum")
            loss = loss / n
            opt.scale_loss(loss * dp).backward()
        loss_sum += loss.detach().float()
    return loss_sum


def sum_over_dp(x, topo):
    if topo is not None and topo.dp > 1:
        x = x.clone()
        dist.all_reduce(x, group=topo.dp_group)
    return x


@torch.no_grad()
def response_loss(model, batches, device, topo=None):
    """Mean cross-entropy per response token (labels other than -100) over the held-out batches (each rank
    holds some of them: sums and counts are added over the ranks, then divided)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        total[0] += model(x.to(device), y.to(device), reduction="sum")[1].double()
        total[1] += int((y != -100).sum())
    model.train()
    total = sum_over_dp(total, topo)
    return (total[0] / total[1]).item()


@torch.no_grad()
def answer(model, enc, ids, max_new_tokens, device):
    """Greedy decoding until end-of-text, the context's end or max_new_tokens (over the tokenizer's ids only:
    the padded vocabulary's extra rows are never valid tokens)."""
    eot, block = data_lib.eot_id(enc), model.cfg.block_size
    idx = torch.tensor([ids], device=device)
    for _ in range(min(max_new_tokens, block - len(ids))):
        nxt = model(idx)[0][0, -1, :enc.n_vocab].argmax()
        if nxt.item() == eot:
            break
        idx = torch.cat([idx, nxt.view(1, 1)], dim=1)
    return enc.decode(idx[0, len(ids):].tolist())


# ------------------------------------------------------------------------------------------- the run
def build_parser():
    ap = OneLineParser(prog="sft.py", description="Supervised fine-tuning (and LoRA) of a pretrained checkpoint.")
    a = ap.add_argument
    a("--init", default="out/pretrain", help="pretrain.py/sft.py checkpoint: its folder (ckpt.pt) or a file")
    a("--model", default=None, choices=sorted(PRESETS), help="check that --init is of this preset")
    a("--data", default=None, help="training JSONL (Alpaca- or chat-style); default: the embedded stdlib set")
    a("--val-data", default=None, help="held-out JSONL; default: the embedded set's, or 1 in 10 lines of --data")
    a("--no-prompt-mask", action="store_true", help="learn the prompt tokens too (the baseline to compare with)")
    a("--batch-size", type=int, default=16, help="global batch in examples per optimizer step")
    a("--grad-accum", type=int, default=1)
    a("--max-steps", type=int, default=100, help="optimizer steps (0: evaluate and answer only)")
    a("--lr", type=float, default=5e-4)
    a("--min-lr", type=float, default=None, help="end of the cosine decay (default lr/10)")
    a("--warmup-steps", type=int, default=10)
    a("--weight-decay", type=float, default=0.0)
    a("--beta1", type=float, default=0.9)
    a("--beta2", type=float, default=0.95)
    a("--grad-clip", type=float, default=1.0)
    a("--amp", default="fp32", choices=sorted(DTYPES))
    a("--zero", type=int, default=0, choices=[0, 1, 2],
      help="data parallelism over torchrun's ranks: 0 ddp.py, 1-2 ZeRO stages (zero.py); stage 3 is not "
           "offered: the answers and the LoRA export need the whole weights on one rank")
    a("--bucket-mb", type=float, default=25.0, help="gradient bucket size of ddp.py's all-reduce")
    a("--attn", default="sdpa", choices=ATTN_BACKENDS)
    a("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    a("--lora-alpha", type=float, default=16.0)
    a("--lora-dropout", type=float, default=0.0)
    a("--lora-targets", default="wq,wk,wv,wo", help=f"comma-separated, from {','.join(lora_lib.TARGETS)}")
    a("--adapter", default=None, help="load LoRA adapters (adapter.pt) onto --init before anything else")
    a("--out", default="out/sft")
    a("--resume", action="store_true")
    a("--stop-after", type=int, default=None, help="end this invocation after N steps with a checkpoint")
    a("--save-every", type=int, default=100)
    a("--eval-every", type=int, default=50)
    a("--eval-examples", type=int, default=200, help="held-out examples in each evaluation")
    a("--log-every", type=int, default=10)
    a("--samples", type=int, default=3, help="held-out prompts answered at the end")
    a("--max-new-tokens", type=int, default=200)
    a("--seed", type=int, default=1337)
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return ap


def check_args(args, world):
    check_values(args)
    for flag in ("batch_size", "grad_accum", "save_every", "eval_every", "eval_examples", "log_every", "stop_after"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.max_steps < 0 or args.samples < 0 or args.max_new_tokens < 0:
        raise ConfigError("--max-steps, --samples and --max-new-tokens must be >= 0")
    if args.batch_size % (args.grad_accum * world):
        raise ConfigError(f"--batch-size {args.batch_size} does not divide into --grad-accum {args.grad_accum} x "
                          f"{world} ranks: use a multiple of {args.grad_accum * world}")
    if args.lora_r:
        lora_lib.check_settings(args.lora_r, args.lora_alpha, args.lora_dropout)
        lora_lib.parse_targets(args.lora_targets)
    if args.adapter and args.lora_r:
        raise ConfigError("--adapter brings its own LoRA settings: drop --lora-r")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return train(args)
    except (ConfigError, CheckpointError, data_lib.DataError, lora_lib.LoRAError) as e:
        print(f"sft.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:
        stop_run("sft.py", e)


def train(args):
    rank, world, device = setup_distributed(args)
    check_args(args, world)
    layout = {"dp": world, "pp": 1, "tp": 1}  # every rank data-parallel: tp and pp are pretrain.py's only
    master = rank == 0
    out = Path(args.out)
    ckpt_path = checkpoint_path(out, rank, world)
    zero = args.zero if world > 1 else 0
    if args.resume:
        check_checkpoint_layout(out, world, zero, layout)
    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    init = load_init(args.init)
    check_init_config(init, args)
    if ckpt and ckpt["model_config"] != init["model_config"]:
        raise ConfigError(f"--resume: the checkpoint in {out} is of another model config than --init {args.init}")

    # Data: read and check everything before building anything.
    enc = data_lib.get_tokenizer(init["tokenizer"])
    if args.data is None:
        train_file, val_file = ensure_sft_default_data()
        train_ex, val_ex = read_jsonl(train_file), read_jsonl(args.val_data or val_file)
    else:
        train_ex = read_jsonl(args.data)
        if args.val_data:
            val_ex = read_jsonl(args.val_data)
        else:  # hold out 1 line in 10 (by a hash of its position), never the whole file
            held = [zlib.crc32(w.encode()) % 10 == 0 for w, _ in train_ex]
            if all(held) or not any(held):
                held = [i == len(train_ex) - 1 for i in range(len(train_ex))]
            val_ex = [e for e, h in zip(train_ex, held) if h]
            train_ex = [e for e, h in zip(train_ex, held) if not h] or val_ex
    block = init["model_config"]["block_size"]
    train_rows, skipped = tokenize(train_ex, enc, block, prompt_mask=not args.no_prompt_mask)
    val_rows, val_skipped = tokenize(val_ex, enc, block)  # held-out loss: always on response tokens only
    if not train_rows or not val_rows:
        raise data_lib.DataError(f"no example fits in the model's context of {block} tokens "
                                 f"({skipped} train and {val_skipped} held-out examples are longer)")
    if world > 1 and not dist.is_initialized():  # the process group, once every input has been checked
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    topo = Topology()
    micro_bs = args.batch_size // (args.grad_accum * world)
    pad = data_lib.eot_id(enc)
    batches = SFTBatches(train_rows, args.batch_size, pad, topo.dp_rank, topo.dp, args.grad_accum, args.seed)
    val_rows = val_rows[:args.eval_examples]
    n_val = len(val_rows)
    mine = val_rows[topo.dp_rank::topo.dp]  # each rank evaluates its share; response_loss adds them up
    val = [collate(mine[i:i + micro_bs], pad) for i in range(0, len(mine), micro_bs)]

    torch.manual_seed(args.seed)  # LoRA's A matrices, dropout
    model = build_model(init, args, device)
    model_config = init["model_config"]
    if args.adapter:
        lora_lib.load_adapter(model, args.adapter, model_config)
    elif args.lora_r:
        lora_lib.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
    lora_config = getattr(model, "lora_config", None)
    if ckpt and ckpt.get("lora") != lora_config:
        raise ConfigError(f"--resume: the checkpoint in {out} has LoRA settings {ckpt.get('lora')}, this run "
                          f"{lora_config}")
    dtype = DTYPES[args.amp]
    cast_model(model, dtype)
    module, opt = build_training(model, args, dtype, topo)  # pretrain.py's: plain, ddp.py or zero.py
    step, guard = 0, DivergenceGuard()
    last_good = ckpt["step"] if ckpt else None  # the newest checkpoint saved with a finite loss
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
        batches.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"])
        step = ckpt["step"]

    def checkpoint_now():  # every rank its own file, as pretrain.py (under ZeRO it alone holds its slices)
        nonlocal last_good
        if not guard.healthy:  # never replace a good checkpoint with a diverged one
            if master:
                print(f"step {step:5d} | not saved: the loss is not finite (last good checkpoint: "
                      f"{f'step {last_good}' if last_good is not None else 'none'})", flush=True)
            return
        last_good = step
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optim": opt.state_dict(), "step": step, "data": batches.state_dict(),
            "rng": rng_state(), "tokenizer": init["tokenizer"], "args": vars(args), "model_config": model_config,
            "lora": lora_config, "world": world, "zero": zero, "topology": layout})

    n_resp = sum(sum(t != -100 for t in y) for _, y in train_rows)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        print(f"init {args.init}: {num_params(model):,} parameters, block {block}, tokenizer {init['tokenizer']} | "
              f"{len(train_rows)} train examples ({n_resp:,} learned tokens"
              f"{', prompts too' if args.no_prompt_mask else ', responses only'}), {n_val} held-out | "
              f"skipped as longer than the context: {skipped} train, {val_skipped} held-out | batch "
              f"{args.batch_size} = {micro_bs} x {args.grad_accum} micro-steps x {world} ranks"
              + (f" (ZeRO stage {zero})" if zero else " (ddp.py)" if world > 1 else "") + f" | {args.max_steps} "
              f"steps | {args.amp} on {device}" + (f" | resuming at step {step}" if step else ""), flush=True)
        if lora_config:
            print(lora_lib.describe(model), flush=True)
    metrics = open(out / "metrics.jsonl", "a") if master else None

    def log(record):
        if master:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def evaluate_now():
        loss = response_loss(module, val, device, topo)
        log({"step": step, "val_loss": loss})
        if master:
            print(f"step {step:5d} | held-out response loss {loss:.4f}", flush=True)
        return loss

    val_losses = [evaluate_now()] if step == 0 else []
    history, t_last, tokens_since = [], time.perf_counter(), 0
    stop_at = min(args.max_steps, step + args.stop_after) if args.stop_after else args.max_steps
    while step < stop_at:
        lr = lr_at(step, args, args.max_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        micro_batches = batches.next()
        tokens_since += sum(x.numel() for x, _ in micro_batches)
        loss = sum_over_dp(train_step(module, opt, micro_batches, device, topo), topo).item()
        grad_norm, skipped_step = opt.step(args.grad_clip)
        opt.zero_grad()
        step += 1
        history.append(loss)
        if reason := guard.check(loss, grad_norm, opt.scaler):
            log({"step": step, "stopped": reason})
            raise TrainingStopped(f"step {step}: {reason}; last good checkpoint: " + (
                f"{out} at step {last_good}" if last_good is not None else "none (no step was saved)"))
        if step % args.log_every == 0 or step == stop_at:
            dt = time.perf_counter() - t_last
            tokens_since = sum_over_dp(torch.tensor(float(tokens_since)), topo).item()  # every rank's rows
            rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_since / dt,
                   "peak_mem_mb": peak_memory_mb(device), "skipped": skipped_step}
            log(rec)
            if master:
                print(f"step {step:5d} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm:.3f} | "
                      f"{rec['tokens_per_s'] / 1e3:.1f}k tok/s (padded) | mem {rec['peak_mem_mb']:.0f} MB", flush=True)
            t_last, tokens_since = time.perf_counter(), 0
        if step % args.eval_every == 0 or step == args.max_steps:
            val_losses.append(evaluate_now())
        if step % args.save_every == 0 or step == stop_at:
            checkpoint_now()

    if master and lora_config and step == args.max_steps:
        lora_lib.save_adapter(out / "adapter.pt", model, model_config)
        # The export: W + (alpha/r) B A in a plain model's state dict, usable as --init.
        save_checkpoint(out / "merged.pt", {"model": lora_lib.merged_state_dict(model), "model_config": model_config,
                                            "tokenizer": init["tokenizer"]})
        print(f"adapters in {out / 'adapter.pt'}, merged model in {out / 'merged.pt'}", flush=True)
    samples = []
    if master and args.samples and step == args.max_steps:
        model.eval()
        for where, messages in val_ex[:args.samples]:
            reply = answer(model, enc, prompt_ids(enc, messages), args.max_new_tokens, device)
            asked = [m["content"] for m in messages if m["role"] == "user"][-1:] or [""]
            samples.append({"where": where, "prompt": asked[0], "answer": reply})
            print(f"{'-' * 20} {where}\n{asked[0]}\n{'-' * 8} answer:\n{reply}", flush=True)
        (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    if metrics:
        metrics.close()
    return {"losses": history, "val_losses": val_losses, "step": step, "model": model, "opt": opt,
            "samples": samples, "skipped": skipped}


if __name__ == "__main__":
    main()

"""pretrain.py: next-token pretraining, one loop from a laptop CPU to torchrun on many GPUs.

The idea: sample windows of text, predict each next token, step AdamW; repeat for D tokens. This file holds
what is particular to pretraining: the model built from a preset, the text windows (data.py), the training
length from a token budget, the sample at the end. The loop around it is training.py's, shared with sft.py:
flags checked before any work, the parallel stack, mixed precision (amp.py), warmup then cosine learning rate,
gradient accumulation, gradient clipping, evaluation on held-out data, checkpoints that survive a crash
mid-write and resume bit for bit, and a log line per step with throughput and model FLOPs utilisation.

Formulas (Kaplan et al. 2020; Hoffmann et al. 2022):
    training FLOPs   C = 6 N D                  (N parameters, D tokens; plus the attention term, model.py)
    compute-optimal  D = 20 N                   (Chinchilla: --chinchilla)
    time             C / (peak FLOP/s x GPUs x MFU)
    model states     16 bytes per parameter     (mixed-precision Adam: 2 weights + 2 grads + 12 fp32 master,
                                                 momentum and variance; --estimate prints the table)

Run:
    python pretrain.py --model tiny --max-steps 600 --out out/tiny           # the embedded default corpus
    python pretrain.py --model gpt2-124m --estimate --gpus 8 --chinchilla    # the calculator, no training
    torchrun --nproc_per_node 4 pretrain.py --zero 2 ...                      # data parallel, ZeRO stage 2
    torchrun --nproc_per_node 4 pretrain.py --zero 3 --tp 2                   # ZeRO-3 x tensor parallel
    torchrun --nproc_per_node 4 pretrain.py --tp 2 --pp 2 --microbatches 4    # tensor x pipeline parallel
    torchrun --nproc_per_node 4 pretrain.py --experts 8 --ep 2 --zero 1      # experts over 2 ranks, 2 replicas
    torchrun --nproc_per_node 4 pretrain.py --cp 2 --tp 2     # sequences split over 2 ranks
"""
import math
import sys
from dataclasses import replace

import torch

import data as data_lib
import estimate
import flags
import launch
import moe
import tensor_parallel
import training
from amp import DTYPES, TrainingStopped
from checkpoint import CheckpointError
from estimate import PEAK_TFLOPS
from flags import ConfigError
from model import PRESETS, Transformer, config_dict, flops_per_token, num_params, pad_vocab
from topology import TopologyError, rank0_token
from weights import load_weights


def build_parser():
    ap = flags.OneLineParser(prog="pretrain.py", description="Pretrain a decoder-only transformer.")
    a = ap.add_argument
    a("--model", default="tiny", choices=sorted(PRESETS), help="model preset (model.py)")
    a("--data", default=None, help="prepared data folder (data.py prepare); default: the Python stdlib source")
    a("--tokenizer", default=None, help="tiktoken encoding; default: the data folder's, or 'bytes' (offline)")
    a("--init", default=None, help="start from these weights with a fresh optimizer: a run's --out, a "
                                   "consolidated file (checkpoint.py consolidate) or a Hugging Face Llama folder")
    a("--tokens", type=float, default=None, help="train on this many tokens (sets --max-steps; default 1000 steps)")
    a("--chinchilla", action="store_true", help="train on 20 tokens per parameter (sets --max-steps)")
    a("--eval-iters", type=int, default=10, help="validation batches per evaluation")
    a("--sample-tokens", type=int, default=300, help="length of the sample printed at the end (0: none)")
    a("--estimate", action="store_true", help="run estimate.py with the other flags: parameters, FLOPs, memory, "
                                             "communication and time; do not train")
    a("--gpus", type=int, default=1, help="for --estimate")
    a("--gpu", default="h100", choices=sorted(PEAK_TFLOPS), help="for --estimate and MFU on CUDA")
    a("--mfu", type=float, default=0.4, help="for --estimate: the utilisation to assume")
    a("--experts", type=int, default=0, help="mixture of experts (moe.py): experts per MoE layer (0: dense)")
    a("--topk", type=int, default=2, help="experts per token")
    a("--moe-layers", default="all", help="which blocks get an MoE MLP: 'all', or block numbers like 1,3")
    a("--capacity-factor", type=float, default=None,
      help="expert capacity = factor x k x tokens / experts (overflow passes through the residual); "
           "omit for dropless routing")
    a("--aux-loss-weight", type=float, default=1e-2, help="weight of the Switch load-balancing loss")
    return flags.add_shared_flags(ap)


def check_args(args, world):
    """Every flag that can be checked without touching data or building anything."""
    flags.check_args(args, world)
    flags.check_model_layout(PRESETS[args.model], args, f"model {args.model!r}")  # vocabulary: again once known
    if args.tokens is not None and args.chinchilla:
        raise ConfigError("--tokens and --chinchilla both set the training length: give one")
    if args.max_steps is not None and (args.tokens is not None or args.chinchilla):
        raise ConfigError("--max-steps and --tokens/--chinchilla both set the training length: give one")
    for flag in ("max_steps", "eval_iters"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {v}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return train(args)
    except (ConfigError, CheckpointError, data_lib.DataError, TopologyError, moe.MoEError) as e:
        launch.release(args.out)  # (a refused start leaves no folder behind)
        print(f"pretrain.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:
        training.stop_run("pretrain.py", e)


def load_data(args, ckpt):
    """The embedded default unless --data; the tokenizer must be the one the data was prepared with."""
    tokenizer = args.tokenizer or (ckpt["tokenizer"] if ckpt else None)
    if args.data is None:
        tokenizer = tokenizer or data_lib.DEFAULT_TOKENIZER
        data_lib.get_tokenizer(tokenizer)  # fails here, with the reason, if it cannot load offline
        data_dir = data_lib.ensure_default_data(tokenizer)
    else:
        data_dir = args.data
    meta = data_lib.load_meta(data_dir, tokenizer)
    if ckpt and ckpt["tokenizer"] != meta["tokenizer"]:
        raise ConfigError(f"{args.out} holds a run trained with tokenizer {ckpt['tokenizer']!r}, the data uses "
                          f"{meta['tokenizer']!r}: give --fresh (the old run is moved aside) or another --out")
    return data_dir, meta


def train(args):
    args.out = flags.run_folder(args, "pretrain") if args.out is None else args.out
    flags.check_values(args)
    if args.estimate:  # estimate.py on this run's flags (any other shape: python estimate.py --help)
        return estimate.main(flags=args)
    rank, world, device = training.setup_distributed(args)
    check_args(args, world)
    ckpt = training.read_checkpoint(args, rank, world)
    data_dir, meta = load_data(args, ckpt)
    tokenizer = meta["tokenizer"]
    cfg = replace(PRESETS[args.model], vocab_size=pad_vocab(meta["vocab_size"]), attn=args.attn,
                  activation_checkpointing=args.activation_checkpointing)
    if meta["max_id"] >= cfg.vocab_size:  # (load_meta checked the ids against meta.json's vocab_size)
        raise data_lib.DataError(f"--data {data_dir}: token id {meta['max_id']} is outside the model's vocabulary "
                                 f"of {cfg.vocab_size}")
    model_config = config_dict(replace(cfg, attn="-", activation_checkpointing=False))
    if err := tensor_parallel.check_divisible(cfg, args.tp):
        raise TopologyError(err)
    T = args.seq_len or cfg.block_size
    with torch.device("meta"):  # the whole model's counts (for FLOPs and the log), without allocating it
        whole = moe.with_experts(Transformer(cfg), args)
    # FLOPs follow the parameters a token meets: with experts, k of E per MoE layer (moe.py).
    n_params, n_mm = num_params(whole), num_params(whole, matmul_only=True) - moe.inactive_params(whole)
    if args.tokens is not None or args.chinchilla:
        max_steps = math.ceil((args.tokens or 20 * n_params) / (args.batch_size * T))
    else:
        max_steps = args.max_steps or 1000
    identity = training.check_same_run(args, ckpt, max_steps=max_steps, model_config=model_config,
                                       tokenizer=tokenizer)
    # (a resume takes its weights from the checkpoint: the same command line both starts and resumes a run)
    weights = read_init(args.init, model_config, tokenizer, args.experts) if args.init and not ckpt else None

    # Every check has passed: only now are the process groups built.
    topo = training.build_topology(args, world, device)
    n_micro = args.grad_accum * args.microbatches
    batches = data_lib.Batches(data_dir, T, args.batch_size, topo.dp_rank, topo.dp, n_micro, args.seed)
    val = data_lib.eval_batches(data_dir, T, args.batch_size // args.grad_accum, args.eval_iters, topo.dp_rank,
                                topo.dp)
    model = training.build_model(cfg, topo, args.seed, device, DTYPES[args.amp], args.sequence_parallel, args,
                                 weights=weights)
    run = training.start(args, topo, device, model, batches, val, max_steps,
                         {"tokenizer": tokenizer, "model_config": model_config, "identity": identity},
                         flops_per_token(cfg, n_mm, T), ckpt)
    if run.rank0:
        print(f"model {args.model}: {n_params:,} parameters, {run.fpt:.3g} FLOPs/token | data {data_dir} "
              f"({meta['tokens']['train']:,} train tokens, tokenizer {tokenizer}) | batch {args.batch_size} x {T} "
              f"tokens = {training.describe_layout(run)} | {max_steps} steps | {args.amp} on {device} | out {args.out}"
              + (f" | resuming at step {run.step}" if run.step else ""), flush=True)
    training.train_loop(run)
    if run.step == max_steps and args.sample_tokens > 0:
        sample(run, data_lib.get_tokenizer(tokenizer))
    training.finish(run)
    return {"losses": run.losses, "step": run.step, "model": model, "opt": run.opt, "topo": topo}


def read_init(path, model_config, tokenizer, experts):
    """--init: whole weights (weights.load_weights, memory-mapped: build_model reads only this rank's blocks) of this
    run's model and tokenizer, or one line saying why not."""
    init = load_weights(path)
    saved, saved_tokenizer = init["model_config"], init["tokenizer"]
    for k in sorted(set(saved) | set(model_config)):
        if k not in ("attn", "activation_checkpointing") and saved.get(k) != model_config.get(k):
            raise ConfigError(f"--init {path}: its {k} is {saved.get(k)}, this run's model has {model_config.get(k)} "
                              f"(choose the matching --model; the vocabulary follows the data)")
    if (init["args"].get("experts") or 0) != experts:
        raise ConfigError(f"--init {path} has {init['args'].get('experts') or 0} experts per MoE layer, this run "
                          f"{experts}: give the same --experts (and --moe-layers)")
    if saved_tokenizer != tokenizer:
        raise ConfigError(f"--init {path} was trained with tokenizer {saved_tokenizer!r}, the data uses {tokenizer!r}")
    return init["model"]


def sample(run, enc):
    """The sample at the end: generation from "def ", printed and written to sample.txt."""
    args, topo, model = run.args, run.topo, run.model
    if topo.pp > 1 or (args.sequence_parallel and topo.tp > 1) or topo.cp > 1:
        if run.rank0:  # generation grows the sequence one token at a time: none of these cuts it
            print("(no sample: generation is not pipelined, sequence- nor context-parallel)", flush=True)
        return
    if not (run.rank0 or topo.tp > 1 or run.zero == 3 or topo.ep > 1):
        return
    # Under tensor parallelism every tp rank samples in lockstep (the head gathers the full logits, the same
    # seed draws the same tokens; rank 0's are taken); under ZeRO-3 every forward gathers weights from every
    # rank, under expert parallelism every forward sends tokens to every ep rank's experts: all sample.
    model.eval()
    tensor_parallel.set_gather_output(model, True)
    if topo.world > 1:
        torch.manual_seed(args.seed)
    prompt = torch.tensor([enc.encode_ordinary("def ")], device=run.device)
    agree = rank0_token(topo.world > 1 and (topo.tp > 1 or run.zero == 3 or topo.ep > 1))
    text = enc.decode(model.generate(prompt, args.sample_tokens, temperature=0.8, top_k=50,
                                     n_vocab=enc.n_vocab, agree=agree)[0].tolist())
    if run.rank0:
        (run.out / "sample.txt").write_text(text)
        print("-" * 30 + " sample " + "-" * 30 + "\n" + text + "\n" + "-" * 68, flush=True)


if __name__ == "__main__":
    main()

"""pretrain.py: next-token pretraining, one loop from a laptop CPU to torchrun on many GPUs.

The idea: sample windows of text, predict each next token, step AdamW; repeat for D tokens. This
file holds what is particular to pretraining: the model from a preset, the text windows (data.py,
batches.py), the training length from a token budget, the sample at the end. The loop around it is
training.py's, shared with sft.py: flags checked before any work, the parallel stack, mixed
precision (amp.py), warmup then cosine learning rate, gradient accumulation, gradient clipping,
evaluation on held-out data, checkpoints that survive a crash mid-write and resume bit for bit, and
a log line per step with throughput and model FLOPs utilisation.

Formulas (Kaplan et al. 2020; Hoffmann et al. 2022):
    training FLOPs   C = 6 N D               (N parameters, D tokens; plus attention: model.py)
    compute-optimal  D = 20 N                (Chinchilla: --chinchilla)
    time             C / (peak FLOP/s x GPUs x MFU)
    model states     16 bytes per parameter  (mixed-precision Adam: 2 weights + 2 grads + 12 fp32
                                              master, momentum and variance; --estimate: the table)

Run:
    python pretrain.py --model tiny --max-steps 600 --out out/tiny         # the embedded corpus
    python pretrain.py --model gpt2-124m --estimate --gpus 8 --chinchilla  # the calculator only
    torchrun --nproc_per_node 4 pretrain.py FLAGS    # 4 processes (one per GPU), FLAGS e.g.:
        --zero 2                          data parallel, ZeRO stage 2
        --zero 3 --tp 2                   ZeRO-3 x tensor parallel
        --tp 2 --pp 2 --microbatches 4    tensor x pipeline parallel
        --experts 8 --ep 2 --zero 1       experts over 2 ranks, 2 replicas
        --cp 2 --tp 2                     sequences split over 2 ranks
"""
import math
import sys
from dataclasses import dataclass, replace

import torch

import data as data_lib
import estimate
import flags
import launch
import metrics
import moe
import stack
import tensor_parallel
import training
from amp import DTYPES, TrainingStopped
from batches import Batches, eval_batches
from checkpoint import CheckpointError
from estimate import PEAK_TFLOPS
from flags import ConfigError
from model import PRESETS, Transformer, config_dict, flops_per_token, num_params, pad_vocab
from topology import TopologyError, end_process_group, rank0_token
from weights import load_weights


def build_parser():
    ap = flags.OneLineParser(prog="pretrain.py", description="Pretrain a decoder-only transformer.")
    a = ap.add_argument
    a("--model", default="tiny", choices=sorted(PRESETS), help="model preset (model.py)")
    a("--data", default=None,
      help="prepared data folder (data.py prepare); default: the Python stdlib source")
    a("--tokenizer", default=None,
      help="tiktoken encoding; default: the data folder's, or 'bytes' (offline)")
    a("--init", default=None,
      help="start from these weights with a fresh optimizer: a run's --out, a consolidated file "
           "(checkpoint.py consolidate) or a Hugging Face Llama folder")
    a("--tokens", type=float, default=None,
      help="train on this many tokens (sets --max-steps; default 1000 steps)")
    a("--chinchilla", action="store_true",
      help="train on 20 tokens per parameter (sets --max-steps)")
    a("--eval-iters", type=int, default=10, help="validation batches per evaluation")
    a("--sample-tokens", type=int, default=300,
      help="length of the sample printed at the end (0: none)")
    a("--estimate", action="store_true",
      help="run estimate.py with the other flags: parameters, FLOPs, memory, communication and "
           "time; do not train")
    a("--gpus", type=int, default=1, help="for --estimate")
    a("--gpu", default="h100", choices=sorted(PEAK_TFLOPS), help="for --estimate and MFU on CUDA")
    a("--mfu", type=float, default=0.4, help="for --estimate: the utilisation to assume")
    a("--experts", type=int, default=0,
      help="mixture of experts (moe.py): experts per MoE layer (0: dense)")
    a("--topk", type=int, default=2, help="experts per token")
    a("--moe-layers", default="all",
      help="which blocks get an MoE MLP: 'all', or block numbers like 1,3")
    a("--capacity-factor", type=float, default=None,
      help="expert capacity = factor x k x tokens / experts (overflow passes through the "
           "residual); omit for dropless routing")
    a("--aux-loss-weight", type=float, default=1e-2,
      help="weight of the Switch load-balancing loss")
    return flags.add_shared_flags(ap)


@dataclass(frozen=True)
class Pretrain:
    """pretrain.py's own flags (build_parser), beside the shared ones of flags.TrainConfig."""
    model: str
    data: str
    tokenizer: str
    init: str
    tokens: float
    chinchilla: bool
    eval_iters: int
    sample_tokens: int
    estimate: bool
    gpus: int
    gpu: str
    mfu: float


def parse(argv=None):
    """The command line, parsed once into a frozen config (flags.TrainConfig)."""
    return flags.from_args(build_parser().parse_args(argv), "pretrain", Pretrain)


def check_args(cfg, world):
    """Every flag that can be checked without touching data or building anything."""
    flags.check_args(cfg, world)
    task = cfg.task
    # (the vocabulary: again once the data's is known)
    flags.check_model_layout(PRESETS[task.model], cfg, f"model {task.model!r}")
    if task.tokens is not None and task.chinchilla:
        raise ConfigError("--tokens and --chinchilla both set the training length: give one")
    if cfg.optim.max_steps is not None and (task.tokens is not None or task.chinchilla):
        raise ConfigError("--max-steps and --tokens/--chinchilla both set the training length: "
                          "give one")
    for flag, v in (("max_steps", cfg.optim.max_steps), ("eval_iters", task.eval_iters)):
        if v is not None and v < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {v}")


def main(argv=None):
    cfg = parse(argv)
    try:
        return train(cfg)
    except (ConfigError, CheckpointError, data_lib.DataError, TopologyError, moe.MoEError) as e:
        launch.release(cfg.settings.out)  # (a refused start leaves no folder behind)
        print(f"pretrain.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:
        training.stop_run("pretrain.py", e)


def load_data(cfg, ckpt):
    """The embedded corpus unless --data; the tokenizer must be the one the data was made with."""
    tokenizer = cfg.task.tokenizer or (ckpt["tokenizer"] if ckpt else None)
    if cfg.task.data is None:
        tokenizer = tokenizer or data_lib.DEFAULT_TOKENIZER
        data_lib.get_tokenizer(tokenizer)  # fails here, with the reason, if it cannot load offline
        data_dir = data_lib.ensure_default_data(tokenizer)
    else:
        data_dir = cfg.task.data
    meta = data_lib.load_meta(data_dir, tokenizer)
    if ckpt and ckpt["tokenizer"] != meta["tokenizer"]:
        raise ConfigError(f"{cfg.settings.out} holds a run trained with tokenizer "
                          f"{ckpt['tokenizer']!r}, the data uses {meta['tokenizer']!r}: give "
                          "--fresh (the old run is moved aside) or another --out")
    return data_dir, meta


def train(cfg):
    flags.check_values(cfg)
    task, settings = cfg.task, cfg.settings
    if task.estimate:  # estimate.py on this run's flags (others: python estimate.py --help)
        return estimate.main(flags=cfg.flat())
    rank, world, device = stack.setup_distributed(settings.device)
    check_args(cfg, world)
    cfg = flags.resolved(cfg)  # --amp auto: the precision that runs, recorded in the run's identity
    ckpt = training.read_checkpoint(cfg.settings, rank)
    data_dir, meta = load_data(cfg, ckpt)
    model_cfg = replace(PRESETS[task.model], vocab_size=pad_vocab(meta["vocab_size"]),
                        attn=cfg.settings.attn,
                        activation_checkpointing=settings.activation_checkpointing)
    run = build_and_train(cfg, model_cfg, data_dir, meta, world, device, ckpt)
    return {"losses": run.losses, "step": run.step, "model": run.model, "opt": run.opt,
            "topo": run.topo}


def build_and_train(cfg, model_cfg, data_dir, meta, world, device, ckpt):
    """The checks that need the model's shape and the data, then the run: built, trained, its sample
    written."""
    task, lay, amp = cfg.task, cfg.layout, cfg.settings.amp
    tokenizer = meta["tokenizer"]
    if meta["max_id"] >= model_cfg.vocab_size:  # (load_meta checked the ids against its vocab_size)
        raise data_lib.DataError(f"--data {data_dir}: token id {meta['max_id']} is outside the "
                                 f"model's vocabulary of {model_cfg.vocab_size}")
    model_config = config_dict(replace(model_cfg, attn="-", activation_checkpointing=False))
    if err := tensor_parallel.check_divisible(model_cfg, lay.tp):
        raise TopologyError(err)
    T = lay.seq_len or model_cfg.block_size
    # the whole model's counts (for FLOPs and the log), without allocating it
    with torch.device("meta"):
        whole = moe.with_experts(Transformer(model_cfg), cfg.moe)
    # FLOPs follow the parameters a token meets: with experts, k of E per MoE layer (moe.py).
    n_params, n_mm = (num_params(whole),
                      num_params(whole, matmul_only=True) - moe.inactive_params(whole))
    if task.tokens is not None or task.chinchilla:
        max_steps = math.ceil((task.tokens or 20 * n_params) / (lay.batch_size * T))
    else:
        max_steps = cfg.optim.max_steps or 1000
    identity = training.check_same_run(cfg, ckpt, max_steps=max_steps, model_config=model_config,
                                       tokenizer=tokenizer)
    cfg = training.change_length(cfg, ckpt, max_steps) if ckpt else cfg
    # (a resume takes its weights from the checkpoint: one command line starts and resumes a run)
    weights = None
    if task.init and not ckpt:
        weights = read_init(task.init, model_config, tokenizer, cfg.moe.experts)

    # Every check has passed: only now are the process groups built.
    topo = stack.build_topology(lay, world, device, cfg.settings.dist_timeout)
    n_micro = lay.grad_accum * lay.microbatches
    seed = cfg.settings.seed
    batches = Batches(data_dir, T, lay.batch_size, topo.dp_rank, topo.dp, n_micro, seed)
    val = eval_batches(data_dir, T, lay.batch_size // lay.grad_accum, task.eval_iters,
                                topo.dp_rank, topo.dp)
    model = stack.build_model(model_cfg, topo, seed, device, DTYPES[amp], lay.sequence_parallel,
                              cfg.moe, weights=weights, fp8=amp == "fp8")
    run = training.start(cfg, topo, device, model, batches, val, max_steps,
                         {"tokenizer": tokenizer, "model_config": model_config,
                          "identity": identity},
                         flops_per_token(model_cfg, n_mm, T), ckpt, task.gpu)
    if run.rank0:
        print(f"model {task.model}: {n_params:,} parameters, {run.fpt:.3g} FLOPs/token | data "
              f"{data_dir} ({meta['tokens']['train']:,} train tokens, tokenizer {tokenizer}) | "
              f"batch {lay.batch_size} x {T} tokens = {metrics.describe_layout(run)} | "
              f"{max_steps} steps | {amp} on {device} | out {cfg.settings.out}"
              + (f" | resuming at step {run.step}" if run.step else ""), flush=True)
    training.train_loop(run)
    if run.step == max_steps and task.sample_tokens > 0:
        sample(run, data_lib.get_tokenizer(tokenizer))
    training.finish(run)
    return run


def read_init(path, model_config, tokenizer, experts):
    """--init: whole weights (weights.load_weights, memory-mapped: build_model reads only this
    rank's blocks) of this run's model and tokenizer, or one line saying why not."""
    init = load_weights(path)
    saved, saved_tokenizer = init["model_config"], init["tokenizer"]
    for k in sorted(set(saved) | set(model_config)):
        if k not in ("attn", "activation_checkpointing") and saved.get(k) != model_config.get(k):
            raise ConfigError(f"--init {path}: its {k} is {saved.get(k)}, this run's model has "
                              f"{model_config.get(k)} (choose the matching --model; the "
                              "vocabulary follows the data)")
    if (init["args"].get("experts") or 0) != experts:
        raise ConfigError(f"--init {path} has {init['args'].get('experts') or 0} experts per MoE "
                          f"layer, this run {experts}: give the same --experts (and --moe-layers)")
    if saved_tokenizer != tokenizer:
        raise ConfigError(f"--init {path} was trained with tokenizer {saved_tokenizer!r}, the "
                          f"data uses {tokenizer!r}")
    return init["model"]


def sample(run, enc):
    """The sample at the end: generation from "def ", printed and written to sample.txt."""
    cfg, topo, model = run.cfg, run.topo, run.model
    if topo.pp > 1 or (cfg.layout.sequence_parallel and topo.tp > 1) or topo.cp > 1:
        if run.rank0:  # generation grows the sequence one token at a time: none of these cuts it
            print("(no sample: generation is not pipelined, sequence- nor context-parallel)",
                  flush=True)
        return
    if not (run.rank0 or topo.tp > 1 or run.zero == 3 or topo.ep > 1):
        return
    # Under tensor parallelism every tp rank samples in lockstep (the head gathers the full logits,
    # the same seed draws the same tokens; rank 0's are taken); under ZeRO-3 every forward gathers
    # weights from every rank, under expert parallelism every forward sends tokens to every ep
    # rank's experts: all sample.
    model.eval()
    tensor_parallel.set_gather_output(model, True)
    if topo.world > 1:
        torch.manual_seed(cfg.settings.seed)
    prompt = torch.tensor([enc.encode_ordinary("def ")], device=run.device)
    agree = rank0_token(topo.world > 1 and (topo.tp > 1 or run.zero == 3 or topo.ep > 1))
    text = enc.decode(model.generate(prompt, cfg.task.sample_tokens, temperature=0.8, top_k=50,
                                     n_vocab=enc.n_vocab, agree=agree)[0].tolist())
    if run.rank0:
        (run.out / "sample.txt").write_text(text)
        print("-" * 30 + " sample " + "-" * 30 + "\n" + text + "\n" + "-" * 68, flush=True)


if __name__ == "__main__":
    main()
    end_process_group()  # (every rank; topology.py says why not destroy_process_group alone)

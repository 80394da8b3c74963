"""sft.py: supervised fine-tuning: pretraining with a different batch and a masked loss.

The idea: an instruction example is a prompt and a response rendered into one token sequence by a
template. The model is trained exactly as in pretraining (next-token cross-entropy, training.py's
loop on any layout), except that the labels are -100 on the prompt and on padding, and the loss
ignores -100: the prompt is context, never a target, so the gradient comes only from response
tokens. The template is chat.py's: Alpaca's ### headers (### Instruction:, ### Input: when the
example has one, ### Response:, the response then <|endoftext|>), or, for a model from a Hugging
Face folder, the folder's own Jinja chat template.

Chat-style lines ({"messages": [{"role": "system|user|assistant", "content": ...}, ...]}) render
turn by turn; every assistant turn, with its end token, is learned, everything else is masked.
Alpaca-style lines ({"instruction", "input" (optional), "output"}) are a one-turn chat.

Batches (sft_data.py): one example per row, padded on the right to its micro-batch's longest row;
or, with --pack, several examples in one row of --seq-len tokens with block-diagonal causal
attention (model.py), so that each example's loss is exactly its padded loss. An example longer
than --seq-len (default: the context) is skipped and counted, never silently truncated. The compute
saved is the padding's (the matmuls' 6 N per token), less what longer rows add to attention unless
the kernel skips the masked tiles.

Loss: the token mean over the response tokens of the whole global batch, whatever the micro-batches
hold (training.py's docstring says why). With LoRA only the adapters reach the optimizer (and ZeRO
shards only them: the frozen base carries no optimizer state).

The embedded default data (sft_data.py), offline: from the pretraining corpus (the Python standard
library), every short function with a docstring becomes "Write a Python function `name(args)` that:
<docstring's first paragraph>" -> its source without the docstring (ast); held out by module (crc32
of its path % 10 == 0, a superset of the modules pretraining held out, % 50). Evaluation: the
response-only loss on held-out examples, before training and at each eval; at the end, greedy
answers to a few held-out prompts.

Cost: as pretraining, about 6 N FLOPs per token, padded positions included; the log counts tokens/s
with the padding and, apart, the learned (response) tokens/s.

Run:
    python sft.py --init out/pretrain            # full fine-tuning on the embedded default
    python sft.py --init out/pretrain --lora-r 8 --lora-targets wq,wk,wv,wo,w1,w2,w3 --lr 3e-3
    python sft.py --init out/pretrain --data my.jsonl --val-data my_val.jsonl
    python sft.py --init out/pretrain --pack     # several examples per row, no attention between
    python sft.py --init HF_FOLDER --lora-r 8 --data chat.jsonl  # a Llama-family model + template
    # any layout pretrain.py runs:
    torchrun --nproc_per_node 4 sft.py --init out/pretrain --zero 3 --tp 2 --lora-r 8
    make sft                                     # (make pretrain first if out/pretrain has none)
"""
import contextlib
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import data as data_lib
import flags
import launch
import lora as lora_lib
import metrics
import moe
import stack
import tensor_parallel
import training
from amp import DTYPES, TrainingStopped
from checkpoint import CheckpointError
from chat import prompt_ids, stop_ids
from data import DataError, eot_id
from flags import ConfigError
from model import PRESETS, ModelConfig, Transformer, config_dict, flops_per_token, num_params
from sft_data import SFTBatches, collate, pack, read_examples, tokenize
from topology import TopologyError, end_process_group, rank0_token
from weights import load_weights, save_checkpoint


# ----------------------------------------------------------------------------------- the base model
def load_init(path):
    """The base model: a run's --out (its newest complete step, whatever layout wrote it), a step
    folder, a consolidated file or a Hugging Face Llama folder (weights.load_weights): model,
    config, tokenizer, args."""
    if not Path(path).exists():
        raise ConfigError(f"--init {path}: no checkpoint there (run pretrain.py --out {path} "
                          "first, or `make pretrain`)")
    try:
        init = load_weights(path)
    except CheckpointError as e:
        raise ConfigError(f"--init {e}" if str(e).startswith(str(path))
                          else f"--init {path}: {e}") from None
    if any(".lora_" in k for k in init["model"]):
        raise ConfigError(f"--init {path} holds LoRA adapters: start from its merged.pt, or pass "
                          "--adapter")
    return init


def check_init_config(init, task):
    """--model, when given, must be the preset the checkpoint was trained as (its vocabulary)."""
    if task.model is not None:
        vocab = init["model_config"]["vocab_size"]
        want = config_dict(replace(PRESETS[task.model], vocab_size=vocab, attn="-"))
        if want != init["model_config"]:
            diff = sorted(k for k in want if want[k] != init["model_config"].get(k))
            raise ConfigError(f"--init {task.init} is a checkpoint of another model config than "
                              f"--model {task.model} (differs in {', '.join(diff)})")


def add_lora(task, seed, model_config):
    """build_model's hook on the sliced frozen base: wrap the target layers (or load --adapter)."""
    def adapt(model):
        if task.adapter:
            lora_lib.load_adapter(model, task.adapter, model_config)
        elif task.lora_r:
            lora_lib.apply_lora(model, task.lora_r, task.lora_alpha, task.lora_dropout,
                                task.lora_targets, seed)
    return adapt


@torch.no_grad()
def answer(model, enc, ids, max_new_tokens, device, agree=None):
    """Greedy decoding until an end token (chat.stop_ids), the context's end or max_new_tokens (over
    the tokenizer's ids only: the padded vocabulary's extra rows are never valid tokens). `agree`:
    ranks that answer together take one token, and so stop together (topology.rank0_token)."""
    stops, block = stop_ids(enc), model.cfg.block_size
    idx = torch.tensor([ids], device=device)
    for _ in range(min(max_new_tokens, block - len(ids))):
        nxt = model(idx)[0][0, -1, :enc.n_vocab].argmax()
        if agree is not None:
            nxt = agree(nxt)
        if nxt.item() in stops:
            break
        idx = torch.cat([idx, nxt.view(1, 1)], dim=1)
    return enc.decode(idx[0, len(ids):].tolist())


# ------------------------------------------------------------------------------------------ the run
def build_parser():
    ap = flags.OneLineParser(prog="sft.py", description="Supervised fine-tuning (and LoRA) of a "
                                                        "pretrained checkpoint.")
    a = ap.add_argument
    a("--init", default="out/pretrain", help="the base model: a pretrain.py/sft.py --out (any "
                                             "layout), a consolidated file or a Hugging Face "
                                             "Llama folder")
    a("--model", default=None, choices=sorted(PRESETS), help="check that --init is of this preset")
    a("--data", default=None, help="training JSONL (Alpaca- or chat-style); default: the "
                                   "embedded stdlib set")
    a("--val-data", default=None, help="held-out JSONL; default: the embedded set's, or 1 in 10 "
                                       "lines of --data")
    a("--no-prompt-mask", action="store_true", help="learn the prompt tokens too (the baseline "
                                                    "to compare with)")
    a("--eval-examples", type=int, default=200, help="held-out examples in each evaluation")
    a("--pack", action="store_true", help="several examples per row of --seq-len tokens, "
                                          "attention blocked between them (no compute on padding)")
    a("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    a("--lora-alpha", type=float, default=16.0)
    a("--lora-dropout", type=float, default=0.0)
    a("--lora-targets", default="wq,wk,wv,wo", help="comma-separated, from "
                                                    f"{','.join(lora_lib.TARGETS)}")
    a("--adapter", default=None, help="load LoRA adapters (adapter.pt) onto --init before "
                                      "anything else")
    a("--samples", type=int, default=3, help="held-out prompts answered at the end")
    a("--max-new-tokens", type=int, default=200)
    return flags.add_shared_flags(ap, batch_size=16, max_steps=100, lr=5e-4, warmup_steps=10,
                                  weight_decay=0.0, save_every=100, eval_every=50)


@dataclass(frozen=True)
class SFT:
    """sft.py's own flags (build_parser), beside the shared ones of flags.TrainConfig."""
    init: str
    model: str
    data: str
    val_data: str
    no_prompt_mask: bool
    eval_examples: int
    pack: bool
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: str
    adapter: str
    samples: int
    max_new_tokens: int


def parse(argv=None):
    """The command line, parsed once into a frozen config (flags.TrainConfig; the MoE settings come
    from --init)."""
    return flags.from_args(build_parser().parse_args(argv), "sft", SFT)


def check_args(cfg, world):
    """Every flag that can be checked before reading anything; returns the data-parallel size."""
    dp = flags.check_args(cfg, world)
    task = cfg.task
    if task.eval_examples < 1:
        raise ConfigError(f"--eval-examples must be at least 1, got {task.eval_examples}")
    if cfg.optim.max_steps < 0 or task.samples < 0 or task.max_new_tokens < 0:
        raise ConfigError("--max-steps, --samples and --max-new-tokens must be >= 0")
    if task.lora_r:
        lora_lib.check_settings(task.lora_r, task.lora_alpha, task.lora_dropout)
        lora_lib.parse_targets(task.lora_targets)
    if task.adapter and task.lora_r:
        raise ConfigError("--adapter brings its own LoRA settings: drop --lora-r")
    return dp


def main(argv=None):
    cfg = parse(argv)
    try:
        return train(cfg)
    except (ConfigError, CheckpointError, DataError, TopologyError, lora_lib.LoRAError,
            moe.MoEError) as e:
        launch.release(cfg.settings.out)  # (a refused start leaves no folder behind)
        print(f"sft.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:
        training.stop_run("sft.py", e)


def train(cfg):
    task, settings = cfg.task, cfg.settings
    rank, world, device = stack.setup_distributed(settings.device)
    dp = check_args(cfg, world)
    cfg = flags.resolved(cfg)  # --amp auto: the precision that runs, recorded in the run's identity
    ckpt = training.read_checkpoint(cfg.settings, rank)
    init = load_init(task.init)
    check_init_config(init, task)
    model_config = init["model_config"]
    # An MoE base keeps its experts (pretrain.py's --experts): its blocks get MoE MLPs, then load.
    cfg = replace(cfg, moe=moe.config_of(init.get("args") or {}))
    model_cfg = replace(ModelConfig(**model_config), attn=cfg.settings.attn,
                        activation_checkpointing=settings.activation_checkpointing)
    flags.check_model_layout(model_cfg, cfg, f"--init {task.init}", task.pack)
    identity = training.check_same_run(cfg, ckpt, max_steps=cfg.optim.max_steps,
                                       model_config=model_config, tokenizer=init["tokenizer"])
    cfg = training.change_length(cfg, ckpt, cfg.optim.max_steps) if ckpt else cfg
    if task.lora_r:
        lora_lib.check_rank(model_cfg, task.lora_r, task.lora_targets)
    enc = data_lib.get_tokenizer(init["tokenizer"])
    if enc.n_vocab > model_cfg.vocab_size:
        raise ConfigError(f"--init {task.init}: its tokenizer has {enc.n_vocab} ids, more than "
                          f"the model's vocab_size {model_cfg.vocab_size}: an id would index past "
                          "the embedding")
    rows = read_rows(cfg, enc, model_cfg, dp)  # every input checked before building
    run = build_and_train(cfg, model_cfg, init, enc, rows, identity, world, device, ckpt)
    done = run.step == cfg.optim.max_steps
    if done and getattr(run.model, "lora_config", None):
        export_lora(run, init)
    samples = answers(run, enc, rows[2]) if done and task.samples else []
    training.finish(run)
    return {"losses": run.losses, "val_losses": run.val_losses, "step": run.step,
            "model": run.model, "opt": run.opt, "samples": samples, "skipped": rows[3][0]}


def build_and_train(cfg, model_cfg, init, enc, rows, identity, world, device, ckpt):
    """The process groups, the batches, the model (LoRA-wrapped), and the loop."""
    task, lay, amp = cfg.task, cfg.layout, cfg.settings.amp
    train_rows, val_rows, _, skipped = rows
    topo = stack.build_topology(lay, world, device, cfg.settings.dist_timeout)
    T = lay.seq_len or model_cfg.block_size
    # rows cut over tp (sequence-parallel) and into 2 cp chunks
    multiple = math.lcm(lay.tp if lay.sequence_parallel else 1, 2 * lay.cp if lay.cp > 1 else 1)
    if task.pack:  # several examples per row of T tokens, attention blocked between them
        def make(rows):
            return pack(rows, eot_id(enc), T, multiple)
    else:  # one example per row, padded to the micro-batch's longest
        def make(rows):
            return collate(rows, eot_id(enc), multiple)
    batches = SFTBatches(train_rows, lay.batch_size, make, topo.dp_rank, topo.dp,
                         lay.grad_accum * lay.microbatches, cfg.settings.seed)
    mine, bs = val_rows[topo.dp_rank::topo.dp], lay.batch_size // (lay.grad_accum * topo.dp)
    val = [make(mine[i:i + bs]) for i in range(0, len(mine), bs)]
    model_config = init["model_config"]
    model = stack.build_model(model_cfg, topo, cfg.settings.seed, device, DTYPES[amp],
                              lay.sequence_parallel, cfg.moe, weights=init["model"],
                              fp8=amp == "fp8",
                              adapt=add_lora(task, cfg.settings.seed, model_config))
    lora_config = getattr(model, "lora_config", None)
    if ckpt and ckpt.get("lora") != lora_config:
        raise ConfigError(f"{cfg.settings.out} holds a run with LoRA settings {ckpt.get('lora')}, "
                          f"this run has {lora_config}")
    # FLOPs follow the parameters a token meets: k of E experts per MoE layer
    with torch.device("meta"):
        whole = moe.with_experts(Transformer(model_cfg), cfg.moe)
    n_mm = num_params(whole, matmul_only=True) - moe.inactive_params(whole)
    fpt = flops_per_token(model_cfg, n_mm, T)
    meta = {"tokenizer": init["tokenizer"], "model_config": model_config, "lora": lora_config,
            "identity": identity}
    run = training.start(cfg, topo, device, model, batches, val, cfg.optim.max_steps, meta, fpt,
                         ckpt)
    if run.rank0:
        n_resp = sum(sum(t != -100 for t in y) for _, y in train_rows)
        learned = ", prompts too" if task.no_prompt_mask else ", responses only"
        print(f"init {task.init}: {num_params(whole):,} parameters, block "
              f"{model_cfg.block_size}, tokenizer {init['tokenizer']} | {len(train_rows)} train "
              f"examples ({n_resp:,} learned tokens{learned}), {len(val_rows)} held-out | "
              f"skipped as longer than {T} tokens: {skipped[0]} train, {skipped[1]} held-out | "
              f"batch {lay.batch_size} = "
              f"{metrics.describe_layout(run)}{' packed' if task.pack else ''} | "
              f"{cfg.optim.max_steps} steps | {amp} on {device} | out {cfg.settings.out}"
              + (f" | resuming at step {run.step}" if run.step else ""), flush=True)
        if lora_config:
            print(lora_lib.describe(model), flush=True)
    training.train_loop(run)
    return run


def read_rows(cfg, enc, model_cfg, dp):
    """Training and held-out rows (token ids and masked labels), every example checked; as many
    held-out rows on every data-parallel rank (under ZeRO-3 or --ep each forward communicates)."""
    task, seq_len = cfg.task, cfg.layout.seq_len
    train_ex, val_ex = read_examples(task.data, task.val_data)
    T = seq_len or model_cfg.block_size
    limit = "--seq-len" if seq_len else "the model's context"
    pack = task.pack
    train_rows, skipped = tokenize(train_ex, enc, T, not task.no_prompt_mask, limit, pack)
    val_rows, val_skipped = tokenize(val_ex, enc, T, True, limit, pack)  # held-out: responses only
    if not train_rows or not val_rows:
        raise DataError(f"no example fits in {limit} of {T} tokens ({skipped} train and "
                        f"{val_skipped} held-out examples are longer)")
    val_rows = val_rows[:min(len(val_rows), task.eval_examples) // dp * dp]
    if not val_rows:
        raise DataError(f"fewer held-out examples that fit than the {dp} data-parallel ranks: "
                        "give more --val-data")
    return train_rows, val_rows, val_ex, (skipped, val_skipped)


def export_lora(run, init):
    """adapter.pt (the adapters alone, gathered whole from every rank) and merged.pt (the base's
    weights + (alpha/r) B A: a plain model's state dict, usable as --init), written by rank 0."""
    # ZeRO-3 shards the adapters
    with run.opt.gathered() if run.zero == 3 else contextlib.nullcontext():
        adapter = lora_lib.lora_state_dict(run.model, run.topo)
    if run.rank0:
        model_config, moe_args = init["model_config"], asdict(run.cfg.moe)
        torch.save({"lora_config": run.model.lora_config, "model_config": model_config,
                    "adapter": adapter}, run.out / "adapter.pt")
        save_checkpoint(run.out / "merged.pt", {
            "model": lora_lib.merged_state_dict(run.model, init["model"], adapter),
            "model_config": model_config, "tokenizer": init["tokenizer"], "args": moe_args})
        print(f"adapters in {run.out / 'adapter.pt'}, merged model in {run.out / 'merged.pt'}",
              flush=True)


def answers(run, enc, val_ex):
    """Greedy answers to the first --samples held-out prompts: printed, and in samples.jsonl."""
    task, topo, model = run.cfg.task, run.topo, run.model
    if topo.pp > 1 or (run.cfg.layout.sequence_parallel and topo.tp > 1):
        # generation grows the sequence one token at a time: neither cuts into stages or shards
        if run.rank0:
            print("(no answers: generation is not pipelined nor sequence-parallel)", flush=True)
        return []
    if not (run.rank0 or topo.tp > 1 or run.zero == 3 or topo.ep > 1):
        # (under tp, ZeRO-3 and ep every rank's forward communicates: all answer in lockstep)
        return []
    model.eval()
    tensor_parallel.set_gather_output(model, True)
    agree = rank0_token(topo.world > 1 and (topo.tp > 1 or run.zero == 3 or topo.ep > 1))
    samples = []
    for where, messages in val_ex[:task.samples]:
        reply = answer(model, enc, prompt_ids(enc, messages), task.max_new_tokens, run.device,
                       agree)
        asked = [m["content"] for m in messages if m["role"] == "user"][-1:] or [""]
        samples.append({"where": where, "prompt": asked[0], "answer": reply})
        if run.rank0:
            print(f"{'-' * 20} {where}\n{asked[0]}\n{'-' * 8} answer:\n{reply}", flush=True)
    if run.rank0:
        (run.out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return samples


if __name__ == "__main__":
    main()
    end_process_group()  # (every rank; topology.py says why not destroy_process_group alone)

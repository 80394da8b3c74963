"""generate.py: text from a trained model, token by token with a KV cache; prefill/decode tokens/s.

The idea: a causal model's keys and values of past positions never change, so generation keeps them
(kv_cache.py) and runs in two phases of different cost (N matmul parameters, L layers, context T):
    prefill   the prompt's P tokens in one forward: 2N FLOPs per token (+ attention) in large
              matmuls, so it is compute-bound, like training's forward
    decode    one forward per new token, of that token alone: 2N FLOPs for reading every weight
              once (N x bytes per weight) plus the whole cache, so it is bound by memory bandwidth:
                  tokens/s <= bandwidth / (weight bytes + KV cache bytes)    (batch 1)
              e.g. the 1b preset's 1.08 B matmul weights in bf16 (2.15 GB; the embedding is a
              lookup of one row) on an H100 (3.35 TB/s): at most ~1,550 tokens/s
    KV cache  2 (keys and values) * L * T * n_kv_head * head_dim * bytes per value, per sequence:
              grouped-query attention's few KV heads make it n_head / n_kv_head times smaller
Without the cache (--no-cache) every new token runs the whole sequence again: the t-th token costs a
forward over t tokens, so n tokens cost O(n^2) token-forwards instead of O(n). INT8 weights (--int8,
quantization.py's weight-only PTQ) halve the bytes decode reads against bf16.

Sampling: temperature 0 is greedy (the argmax); otherwise softmax(logits / temperature), restricted
to the top_k most likely tokens and to the top-p nucleus (the smallest set of tokens whose
probabilities sum to >= p; Holtzman et al., 2019). The padded vocabulary's ids (>= the tokenizer's
n_vocab) are never drawn. Generation stops at the tokenizer's end-of-text, after --max-new-tokens,
or at the end of the model's context.

Run (the path: a run's --out, a step folder, a consolidated model.pt or a Hugging Face folder):
    python generate.py out/pretrain --prompt "def "
    python generate.py out/sft --prompt "Reverse the word hello." --chat --temperature 0
    python generate.py model.pt --prompt "def " --temperature 0 --no-cache   # same tokens, no cache
"""
import sys
import time
from pathlib import Path

import torch

import data as data_lib
import flags
import moe
from amp import DTYPES
from checkpoint import CheckpointError
from model import ModelConfig, Transformer
from quantization import quantize_model_int8
from chat import prompt_ids, stop_ids
from weights import load_weights


class GenerateError(ValueError):
    """Bad input: the message is the one line the user sees."""


def build_parser():
    p = flags.OneLineParser(prog="generate.py",
                            description="Generate text from a trained model with a KV cache; "
                                        "prints the text and the prefill and decode tokens/s.")
    a = p.add_argument
    a("path", help="a run's --out folder (its newest complete step), a step folder, a "
                   "consolidated file (checkpoint.py consolidate) or a Hugging Face Llama folder")
    a("--prompt", required=True, help="the text to continue (with --chat: the user's message)")
    a("--chat", action="store_true",
      help="wrap the prompt as a user message in the fine-tuning template")
    a("--max-new-tokens", type=int, default=200, help="tokens generated at most")
    a("--temperature", type=float, default=0.8, help="softmax temperature; 0: greedy")
    a("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    a("--top-p", type=float, default=1.0,
      help="nucleus: the smallest set of tokens with probability >= p")
    a("--seed", type=int, default=0, help="random seed of the sampling")
    a("--int8", action="store_true",
      help="INT8 weight-only quantization of every linear (quantization.py)")
    a("--no-cache", action="store_true",
      help="recompute the whole sequence for every token (for comparison)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu",
      help="cpu or cuda (default: cuda if there is one)")
    a("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
      help="compute dtype (default: fp32 on cpu, bf16 on cuda and with --int8)")
    return p


def check_args(args):
    """Every flag's value, before any file is read: one line naming the flag and what is valid."""
    if not Path(args.path).exists():
        raise GenerateError(f"{args.path}: no such file or folder (a run's --out, a consolidated "
                            "file or a Hugging Face folder)")
    if not args.prompt:
        raise GenerateError("--prompt is empty: give the text to continue")
    if args.max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise GenerateError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise GenerateError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise GenerateError(f"--top-k must be at least 1, got {args.top_k}")
    if args.device.split(":")[0] not in ("cpu", "cuda") or (args.device.startswith("cuda")
                                                             and not torch.cuda.is_available()):
        other = " or cuda" if torch.cuda.is_available() else " (no CUDA device here)"
        raise GenerateError(f"--device {args.device}: use cpu{other}")


def load(args):
    """(model on the device in eval mode, tokenizer) from args.path; a damaged or foreign file is
    one line of error, no traceback."""
    try:
        init = load_weights(args.path)
        enc = data_lib.get_tokenizer(init["tokenizer"])
    except (CheckpointError, data_lib.DataError) as e:
        raise GenerateError(str(e) if str(e).startswith(str(args.path))
                            else f"{args.path}: {e}") from None
    cfg = ModelConfig(**{**init["model_config"], "attn": "sdpa", "activation_checkpointing": False})
    if enc.n_vocab > cfg.vocab_size:
        raise GenerateError(f"{args.path}: tokenizer {init['tokenizer']!r} has {enc.n_vocab} "
                            f"ids, the model's vocabulary only {cfg.vocab_size}")
    # a mixture-of-experts run: the same blocks get MoE MLPs before loading
    run_args = init.get("args") or {}
    model = moe.with_experts(Transformer(cfg), moe.config_of(run_args))
    try:
        model.load_state_dict(init["model"])
    except RuntimeError as e:
        lines = str(e).splitlines()
        why = lines[1].strip() if len(lines) > 1 else e
        raise GenerateError(f"{args.path}: weights do not fit the model they describe "
                            f"({why})") from None
    dtype = DTYPES[args.dtype or ("fp32" if args.device == "cpu" and not args.int8 else "bf16")]
    model = quantize_model_int8(model, dtype) if args.int8 else model.to(dtype)
    return model.to(args.device).eval(), enc


def prompt_tokens(args, enc, block_size):
    """The prompt's ids (--chat: the template up to the assistant's header), below the context."""
    if args.chat:
        ids = prompt_ids(enc, [{"role": "user", "content": args.prompt},
                               {"role": "assistant", "content": ""}])
    else:
        ids = enc.encode_ordinary(args.prompt)
    if len(ids) >= block_size:
        raise GenerateError(f"--prompt is {len(ids)} tokens; the model's context is {block_size}: "
                            f"at most {block_size - 1}, to leave room for a new token")
    return ids


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def generate(model, ids, args, stops, n_vocab):
    """The new token ids (up to, not including, the first of `stops`: end-of-text, or the chat
    template's end of turn), seconds of the prefill (the first forward and its token) and of the
    decode (every later token), and whether it stopped at one of them."""
    idx = torch.tensor([ids], device=args.device)
    # the cache (and RoPE's table) end there
    n = min(args.max_new_tokens, model.cfg.block_size - len(ids))
    steps = model.stream(idx, n, args.temperature, args.top_k, n_vocab, args.top_p,
                         use_cache=not args.no_cache)
    out, seconds, hit_eos = [], [], False
    sync(args.device)
    t0 = time.perf_counter()
    for tok in steps:
        tok = tok.item()  # (waits for the device)
        seconds.append(time.perf_counter() - t0)
        if tok in stops:
            hit_eos = True
            break
        out.append(tok)
    return out, seconds[0], seconds[-1] - seconds[0], hit_eos


def report(model, args, n_prompt, n_new, prefill_s, decode_s, hit_eos):
    """One line: prefill and decode tokens/s, the KV cache's bytes, why it stopped."""
    cfg = model.cfg
    T = n_prompt + n_new - 1  # the positions the cache holds: every token but the last one drawn
    dtype_bytes = next(model.parameters()).element_size()
    # the formula of the docstring
    cache = 2 * cfg.n_layer * T * cfg.n_kv_head * cfg.head_dim * dtype_bytes
    decode = f"{(n_new - 1) / decode_s:,.1f} tokens/s" if n_new > 1 and decode_s > 0 else "-"
    why = "end-of-text" if hit_eos else ("the context's end" if T + 1 >= cfg.block_size
                                         else "--max-new-tokens")
    return (f"prefill {n_prompt} tokens: {n_prompt / prefill_s:,.1f} tokens/s | "
            f"decode {max(n_new - 1, 0)} tokens: {decode} | "
            f"{'no cache' if args.no_cache else f'KV cache of {T} positions: {cache:,} bytes'}"
            f"{' | int8' if args.int8 else ''} | stopped at {why}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    model, enc = load(args)
    ids = prompt_tokens(args, enc, model.cfg.block_size)
    torch.manual_seed(args.seed)
    new, prefill_s, decode_s, hit_eos = generate(model, ids, args, stop_ids(enc), enc.n_vocab)
    print(enc.decode(new) if args.chat else enc.decode(ids + new))
    print(report(model, args, len(ids), len(new) + hit_eos, prefill_s, decode_s, hit_eos))
    return new


if __name__ == "__main__":
    try:
        main()
    except GenerateError as e:
        print(f"generate.py: {e}", file=sys.stderr)
        sys.exit(2)

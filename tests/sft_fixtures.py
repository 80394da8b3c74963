"""Small inputs for the SFT and LoRA tests: a tiny 'pretrained' checkpoint and instruction files."""
import json
import random
from dataclasses import asdict

import torch

from model import ModelConfig, Transformer

# Two layers, width 32, context 128: fast, and short enough to hit the prompt-too-long error easily.
CFG = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, vocab_size=320,
                  block_size=128)
WORDS = ["alpha", "bravo", "delta", "echo", "golf", "hotel", "india",
         "kilo", "lima", "mike", "oscar", "papa", "romeo", "sierra",
         "tango", "victor", "whisky", "yankee", "zulu", "quebec"]


def make_init(path, cfg=CFG, seed=0):
    """A consolidated checkpoint, as `checkpoint.py consolidate` writes (random weights: the tests
    are about the mechanics). Returns the file."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    cfg_dict = asdict(cfg)
    cfg_dict.update(attn="-", activation_checkpointing=False)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_config": cfg_dict, "tokenizer": "bytes"},
               path / "model.pt")
    return path / "model.pt"


def reverse_examples(n, seed=0):
    """Alpaca-style (some with an input) and chat-style lines: reverse a word."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w = rng.choice(WORDS) + rng.choice(WORDS)[:2]
        if i % 3 == 0:
            out.append({"instruction": "Reverse the word.", "input": w, "output": w[::-1]})
        elif i % 3 == 1:
            out.append({"instruction": f"Reverse {w}.", "output": w[::-1]})
        else:
            out.append({"messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": f"Reverse {w}."},
                                     {"role": "assistant", "content": w[::-1]}]})
    return out


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path

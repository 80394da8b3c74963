"""hf_folder.py: a random-weight Hugging Face Llama folder of a real model's shape (tests, timing).

The project never downloads a model; to measure what fine-tuning, generation and export cost on a
pretrained model's shape, this writes a folder laid out as the Hub's are (SmolLM2-135M-Instruct's):
    config.json              transformers 5's form: rope_parameters {"rope_type", "rope_theta"},
                             tied embeddings
    generation_config.json   the bos/eos/pad ids
    model.safetensors        model.py's random initialisation under Llama's names, no lm_head (tied)
    tokenizer.json           a byte-level BPE: merges learned (bpe.learn_merges) on this
                             repository's text; <|endoftext|>, <|im_start|>, <|im_end|> added
    tokenizer_config.json    eos <|im_end|> and a ChatML template, per turn:
                             <|im_start|>role\\ncontent<|im_end|>\\n
The weights are random: a run on this folder costs what it would on the real model (same shapes),
but its text is noise. The tokenizer has a few hundred merges, not the real 49k: the embedding's
rows are the real count.

Shapes:
    smollm2-135m  SmolLM2-135M's: 30 layers, width 576, 9 heads / 3 KV heads (head 64), MLP 1536,
                  vocab 49152, context 8192, theta 1e5: 9 heads split over --tp 3 or 1, not 2.
    135m-tp2      not a real model: SmolLM2-135M's dims with 8 heads / 2 KV heads (head 72), which
                  split over tp 2
    tiny          the structure in miniature (2 layers, width 64, 4 / 2 heads, theta 5e5), for tests

Run: `python benchmarks/hf_folder.py --shape smollm2-135m --out /tmp/smollm2-shape`
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bpe  # noqa: E402
import hf  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

SMOLLM2 = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
           "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
           "max_position_embeddings": 8192, "rope_theta": 1e5}
SHAPES = {"smollm2-135m": SMOLLM2,
          "135m-tp2": SMOLLM2 | {"num_attention_heads": 8, "num_key_value_heads": 2},
          "tiny": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 640,
                   "max_position_embeddings": 256, "rope_theta": 5e5}}
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML as SmolLM2-Instruct writes it: a default system turn when the conversation has none.
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tokenizer_json(n_merges):
    """A GPT-2-layout byte-level BPE learned offline on this repository's own bpe.py and chat.py."""
    root = Path(__file__).resolve().parent.parent
    text = "".join((root / f).read_text(encoding="utf-8") for f in ("bpe.py", "chat.py"))
    return bpe.gpt2_style_json(bpe.learn_merges(text, n_merges), added=SPECIALS)


def config_json(shape, dtype):
    # shape: a name, or a dict of SHAPES' fields
    s = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    theta = s.pop("rope_theta")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **s, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "initializer_range": 0.02,
            "dtype": str(dtype).removeprefix("torch.")}


def write_hf_folder(out, shape="tiny", n_merges=300, dtype=torch.bfloat16, seed=0):
    """Writes the folder (see above) and returns its path; shape: a SHAPES name or such a dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tj = tokenizer_json(n_merges)
    vocab = {**tj["model"]["vocab"], **{t["content"]: t["id"] for t in tj["added_tokens"]}}
    c = config_json(shape, dtype)
    n_vocab = len(vocab)
    if n_vocab > c["vocab_size"]:
        raise ValueError(f"--merges {n_merges}: the tokenizer's {n_vocab} ids exceed the model's "
                         f"{c['vocab_size']}")
    ids = {"bos_token_id": vocab["<|im_start|>"], "eos_token_id": vocab["<|im_end|>"],
           "pad_token_id": vocab["<|im_end|>"]}
    c |= ids
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"],
                      n_kv_head=c["num_key_value_heads"], d_model=c["hidden_size"],
                      d_ff=c["intermediate_size"], vocab_size=c["vocab_size"],
                      block_size=c["max_position_embeddings"])
    sd = Transformer(cfg).state_dict()
    # No lm_head: the embedding is tied.
    tensors = {hf.rename(k, hf.TO_HF): v.to(dtype) for k, v in sd.items() if k != "lm_head.weight"}
    hf.write_safetensors(out / "model.safetensors", tensors)
    (out / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
    (out / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "chat_template": CHATML,
        "model_max_length": c["max_position_embeddings"]}, indent=2) + "\n")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a random-weight Hugging Face Llama folder "
                                            "of a model's shape.")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--merges", type=int, default=300, help="BPE merges the tokenizer learns")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="the weights' dtype in the file")
    args = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    out = write_hf_folder(args.out, args.shape, args.merges, dtype)
    n = sum(t.numel() for t in hf.read_safetensors(out / "model.safetensors").values())
    enc = bpe.load_folder(str(out.resolve()))
    print(f"{out}: {args.shape}, {n:,} parameters (tied), {args.dtype}; "
          f"tokenizer.json of {enc.n_vocab} ids")


if __name__ == "__main__":
    main()

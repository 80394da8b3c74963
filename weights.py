"""weights.py: a model's weights out of training and back in: one whole-model file, or a Hugging Face Llama folder.

The idea: a checkpoint (checkpoint.py) is pieces of every parameter spread over the files of the ranks that held
them; the whole model is those pieces assembled (full_state_dict: each rank file memory-mapped, each piece copied
into place). `consolidate` writes it as one file; `load_weights` reads whatever a user hands over (a run's folder,
a step folder, such a file, or a Hugging Face folder), for sft.py --init, pretrain.py --init and generation.

model.py is a Llama-architecture decoder (RMSNorm, rotary embeddings on split halves, SwiGLU, grouped-query
attention, no biases), so a trained model is a LlamaForCausalLM once its tensors are renamed, and a Llama
checkpoint of a shape model.py can build is a model.py model. The names:

    model.py                       Hugging Face Llama
    tok_emb                        model.embed_tokens
    blocks.{i}.attn_norm           model.layers.{i}.input_layernorm
    blocks.{i}.attn.w{q,k,v,o}     model.layers.{i}.self_attn.{q,k,v,o}_proj
    blocks.{i}.mlp_norm            model.layers.{i}.post_attention_layernorm
    blocks.{i}.mlp.w1, w3, w2      model.layers.{i}.mlp.gate_proj, up_proj, down_proj   (gate, up, down)
    norm, lm_head                  model.norm, lm_head

Both rotate the two halves of each head (rotate_half), so the query and key rows need no permutation. model.py
never ties the embedding and the head: a tied checkpoint's embedding is copied into the head on import.

safetensors, written out: 8 bytes of little-endian header length N, N bytes of JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}} (offsets into what follows), then the raw little-endian tensors. Reading it is a
memory map and one view per tensor; every field is checked, so a damaged file is one line, not a crash.

Cost: assembling reads every piece of the chosen kind once (the fp32 masters: 4 bytes per parameter) after the
CRC-32 of every file (all of the checkpoint); the file written is 4 bytes per parameter.

Run: `python checkpoint.py consolidate out/pretrain model.pt` and `python checkpoint.py export-hf out/pretrain hf/`
write them; `sft.py --init hf/` or `pretrain.py --init model.pt` read them back (load_weights).
"""
import json
import math
import mmap
import re
import struct
import sys
from pathlib import Path

import torch

from checkpoint import CheckpointError, copy_overlap, find, rects, safe_load

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
NAMES = {v: k for k, v in DTYPES.items()}


# ----------------------------------------------------------------------------- the whole model
def full_state_dict(d, meta, kinds=("master", "param")):
    """Every parameter whole, of the first of `kinds` saved for it (by default the fp32 master where there is one,
    else the weights), from a step folder: the pieces of every rank's file assembled."""
    by_name = {}
    for f in meta["files"]:
        t = safe_load(d / f["file"])["tensors"]
        for r in f["pieces"]:
            by_name.setdefault(r["name"], []).append((t, r))
    sd = {}
    for name, saved in by_name.items():
        kind = next((k for k in kinds if any(k in r["kinds"] for _, r in saved)), None)
        if kind is None:
            continue
        first = next(t[r["kinds"][kind]] for t, r in saved if kind in r["kinds"])
        whole = torch.empty(saved[0][1]["shape"], dtype=first.dtype)
        n = sum(copy_overlap(whole.view(-1), rects([[0, s] for s in whole.shape], [0, whole.numel()]),
                             t[r["kinds"][kind]], rects(r["box"], r["flat"])) for t, r in saved if kind in r["kinds"])
        if n != whole.numel():
            raise CheckpointError(f"{d}: {kind} of {name}: the checkpoint's pieces cover {n} of its {whole.numel()} "
                                  "values (missing, or saved twice)")
        sd[name] = whole
    return dict(sorted(sd.items(), key=lambda kv: _order(kv[0])))


def _order(name):  # the model's own order: embedding, blocks by number, norm, head
    m = re.match(r"blocks\.(\d+)\.", name)
    return (1, int(m.group(1)), name) if m else (0 if name.startswith("tok_emb") else 2, 0, name)


def newest_whole(path):
    """The newest complete step under `path` with every file's CRC-32 right (reads them all): (folder, meta)."""
    d, meta, skipped = find(path, crc=True)
    if d is None:
        raise CheckpointError(f"no complete checkpoint in {path}" + (f" ({skipped[0]})" if skipped else ""))
    if skipped:
        print(f"warning: {skipped[0]}: took the previous complete step, {d}", file=sys.stderr)
    return d, meta


def merged(sd, lora_config):
    """A LoRA run's weights as a plain model's: W + (alpha/r) B A for every adapted layer, the factors dropped (what
    --init, export-hf and generation take; sft.py's merged.pt holds the same)."""
    if not lora_config:
        return sd
    scaling = lora_config["alpha"] / lora_config["r"]
    out = {k: v for k, v in sd.items() if ".lora_" not in k}
    for k in sd:
        if k.endswith(".lora_A"):
            w = out[f"{k[:-len('.lora_A')]}.weight"]
            out[f"{k[:-len('.lora_A')]}.weight"] = w + (sd[k[:-1] + "B"] @ sd[k] * scaling).to(w.dtype)
    return out


def whole_model(d, meta):
    """The whole model of a step folder, merged if it is a LoRA run's."""
    return merged(full_state_dict(d, meta), meta.get("lora"))


def consolidate(src, dst):
    """One whole-model file: {"model": state dict, "model_config", "tokenizer", "args", "step"} (what --init
    reads; "args" are the training run's flags, e.g. its --experts). A LoRA run's adapters are merged in."""
    d, meta = newest_whole(src)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": whole_model(d, meta), "model_config": meta["model_config"],
                "tokenizer": meta["tokenizer"], "args": meta.get("args", {}), "step": meta["step"]}, dst)
    return d


def save_checkpoint(path, state):
    """One small file (sft.py's merged model): written under a temporary name, then renamed."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_weights(path):
    """Whole weights from what a user may hand over: a run's folder (its newest complete step), a step folder,
    a consolidated file, or a Hugging Face Llama folder. Returns {"model": state dict, "model_config": dict,
    "tokenizer", "args": the flags of the run that trained it (empty for a Hugging Face folder)}."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").exists():
        return import_hf(p)
    if p.is_dir():
        d, meta = newest_whole(p)
        return {"model": whole_model(d, meta), "model_config": meta["model_config"],
                "tokenizer": meta["tokenizer"], "args": meta.get("args", {})}
    if not p.is_file():
        raise CheckpointError(f"{path}: no such file or folder (a run's --out, a consolidated file or an HF folder)")
    ckpt = safe_load(p, mmap=False)  # (weights_only: a file that would run code when unpickled is refused)
    try:
        assert all(torch.is_tensor(t) for t in ckpt["model"].values()) and isinstance(ckpt["model_config"], dict)
        return {"model": ckpt["model"], "model_config": ckpt["model_config"], "tokenizer": ckpt["tokenizer"],
                "args": ckpt.get("args") or {}}
    except (KeyError, TypeError, AttributeError, AssertionError) as e:
        raise CheckpointError(f"{path}: not a consolidated checkpoint ({type(e).__name__} {e})") from None


# ----------------------------------------------------------------------------- Hugging Face names
PAIRS = [("tok_emb", "model.embed_tokens"), ("norm", "model.norm"), ("lm_head", "lm_head"),
         ("blocks.{i}.attn_norm", "model.layers.{i}.input_layernorm"),
         ("blocks.{i}.mlp_norm", "model.layers.{i}.post_attention_layernorm"),
         ("blocks.{i}.attn.w{p}", "model.layers.{i}.self_attn.{p}_proj"),
         ("blocks.{i}.mlp.w1", "model.layers.{i}.mlp.gate_proj"), ("blocks.{i}.mlp.w3", "model.layers.{i}.mlp.up_proj"),
         ("blocks.{i}.mlp.w2", "model.layers.{i}.mlp.down_proj")]


def _table(pairs):
    """[(regex of one side's weight name, the other side's name with groups)] from the pairs above."""
    pat = lambda s: re.escape(s + ".weight").replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", "(?P<p>[qkvo])")  # noqa
    sub = lambda s: (s + ".weight").replace("{i}", r"\g<i>").replace("{p}", r"\g<p>")  # noqa
    return [(pat(a), sub(b)) for a, b in pairs]


TO_HF, FROM_HF = _table(PAIRS), _table([(b, a) for a, b in PAIRS])


class HFError(CheckpointError):
    """A Hugging Face folder model.py cannot represent, or a damaged one: the one line the user sees."""


def rename(name, table):
    """A weight's name on the other side (TO_HF or FROM_HF), or None if it has no counterpart."""
    for pattern, other in table:
        if m := re.fullmatch(pattern, name):
            return m.expand(other)
    return None


# ----------------------------------------------------------------------------- safetensors, by hand
def write_safetensors(path, tensors, metadata=None):
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the tensors start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def read_safetensors(path):
    """{name: tensor} from a .safetensors file; every length, dtype and offset checked against the file."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= size - 8:
            raise HFError(f"{path}: corrupt safetensors header (header length {n}, file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
            assert isinstance(header, dict)
        except (ValueError, AssertionError):
            raise HFError(f"{path}: corrupt safetensors header (not a JSON object)") from None
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    out, spans = {}, []
    for name, h in header.items():
        if name == "__metadata__":
            continue
        try:  # sizes are JSON integers (not floats, not bools), >= 0; the product in Python's unbounded ints
            dtype, shape, (a, b) = DTYPES[h["dtype"]], h["shape"], h["data_offsets"]
            assert all(type(v) is int and v >= 0 for v in [*shape, a, b])
            nbytes = dtype.itemsize * math.prod(shape)
            assert b - a == nbytes and 8 + n + b <= size
        except (KeyError, TypeError, ValueError, AssertionError):
            raise HFError(f"{path}: corrupt safetensors header entry for {name} ({str(h)[:200]}): its shape and "
                          "offsets must be non-negative integers that fit the file") from None
        spans.append((a, b, name))
    for (a0, b0, first), (a1, b1, second) in zip(sorted(spans), sorted(spans)[1:]):
        if a1 < b0:  # two tensors sharing bytes: a forged or damaged header
            raise HFError(f"{path}: tensors {first} and {second} overlap in the file (bytes {a1}..{b0})")
    for name, h in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (a, b) = DTYPES[h["dtype"]], h["shape"], h["data_offsets"]
        nbytes = b - a
        buf = memoryview(data)[8 + n + a:8 + n + b]
        out[name] = (torch.frombuffer(bytearray(buf), dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
                     ).view(shape)
    return out


# ----------------------------------------------------------------------------- out
def export_hf(src, dst):
    """A run's folder, step folder or consolidated file -> dst/config.json and dst/model.safetensors (a new or
    empty folder: nothing is overwritten)."""
    if Path(dst).exists() and (not Path(dst).is_dir() or any(Path(dst).iterdir())):
        raise CheckpointError(f"export-hf: {dst} exists and is not an empty folder: give a new one (nothing there is "
                              "overwritten)")
    init = load_weights(src)
    sd, cfg, tokenizer = init["model"], init["model_config"], init["tokenizer"]
    hf = {}
    for name, t in sd.items():
        hf_name = rename(name, TO_HF)
        if hf_name is None:
            raise CheckpointError(f"export-hf: {name} has no Llama counterpart (mixture-of-experts and LoRA layers "
                                  "are not in the Llama architecture; merge LoRA first)")
        hf[hf_name] = t
    Path(dst).mkdir(parents=True, exist_ok=True)
    write_safetensors(Path(dst) / "model.safetensors", hf)
    dtype = next(iter(sd.values())).dtype
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg["d_model"],
              "intermediate_size": cfg["d_ff"], "num_hidden_layers": cfg["n_layer"],
              "num_attention_heads": cfg["n_head"], "num_key_value_heads": cfg["n_kv_head"],
              "head_dim": cfg["d_model"] // cfg["n_head"], "rms_norm_eps": cfg["norm_eps"],
              "rope_theta": cfg["rope_theta"], "rope_scaling": None, "max_position_embeddings": cfg["block_size"],
              "vocab_size": cfg["vocab_size"], "tie_word_embeddings": False, "hidden_act": "silu",
              "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
              "torch_dtype": str(dtype).removeprefix("torch."), "tokenizer": tokenizer}
    (Path(dst) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


# ----------------------------------------------------------------------------- in
def _check_config(c, where):
    arch = c.get("architectures") or [c.get("model_type")]
    if "LlamaForCausalLM" not in arch and c.get("model_type") != "llama":
        raise HFError(f"{where}: architectures {arch} is not LlamaForCausalLM (model.py is a Llama-style decoder)")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False), ("rope_scaling", None),
                      ("pretraining_tp", 1)):
        if c.get(key, want) != want:
            raise HFError(f"{where}: {key} {c[key]!r} cannot be represented by model.py (it has {want!r})")
    sizes = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "d_model": "hidden_size",
             "d_ff": "intermediate_size", "vocab_size": "vocab_size"}
    defaults = {"num_key_value_heads": c.get("num_attention_heads"), "max_position_embeddings": 2048}
    for key in [*sizes.values(), *defaults]:
        v = c.get(key, defaults.get(key))
        if type(v) is not int or v < 1:
            raise HFError(f"{where}: {key} {v!r} must be a positive integer")
    try:
        cfg = {k: c[hf] for k, hf in sizes.items()} | {
            "n_kv_head": c.get("num_key_value_heads", c["num_attention_heads"]),
            "block_size": c.get("max_position_embeddings", 2048), "rope_theta": float(c.get("rope_theta", 1e4)),
            "norm_eps": float(c.get("rms_norm_eps", 1e-6)), "attn": "-", "activation_checkpointing": False}
    except (KeyError, TypeError, ValueError) as e:
        raise HFError(f"{where}: missing or invalid field {e}") from None
    d, h = cfg["d_model"], cfg["n_head"]
    if c.get("head_dim", d // h) != d // h or d % h or h % cfg["n_kv_head"]:
        raise HFError(f"{where}: head_dim {c.get('head_dim')} with hidden_size {d}, {h} heads and "
                      f"{cfg['n_kv_head']} KV heads: model.py needs head_dim = hidden_size / heads, grouped evenly")
    return cfg


def expected_shapes(cfg):
    """Every tensor model.py builds for this config, with its shape, in the model's order."""
    d, q, kv, ff = cfg["d_model"], cfg["d_model"], cfg["n_kv_head"] * cfg["d_model"] // cfg["n_head"], cfg["d_ff"]
    shapes = {"tok_emb.weight": [cfg["vocab_size"], d]}
    for i in range(cfg["n_layer"]):
        shapes |= {f"blocks.{i}.{name}.weight": shape for name, shape in (
            ("attn_norm", [d]), ("attn.wq", [q, d]), ("attn.wk", [kv, d]), ("attn.wv", [kv, d]), ("attn.wo", [d, q]),
            ("mlp_norm", [d]), ("mlp.w1", [ff, d]), ("mlp.w3", [ff, d]), ("mlp.w2", [d, ff]))}
    return shapes | {"norm.weight": [d], "lm_head.weight": [cfg["vocab_size"], d]}


def import_hf(folder):
    """An HF Llama folder -> load_weights' dict (model.py state dict, config, tokenizer); refuses, naming the
    field or tensor, whatever model.py cannot represent."""
    folder = Path(folder)
    try:
        c = json.loads((folder / "config.json").read_text())
        assert isinstance(c, dict)
    except (OSError, ValueError, AssertionError):
        raise HFError(f"{folder}/config.json: missing or not a JSON object") from None
    cfg = _check_config(c, f"{folder}/config.json")
    index = folder / "model.safetensors.index.json"
    # A large model comes in several files, listed by an index: {"weight_map": {tensor name: file}}.
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        ["model.safetensors"]
    hf = {}
    for name in files:
        if not (folder / name).is_file():
            raise HFError(f"{folder / name}: missing")
        hf |= read_safetensors(folder / name)
    # The table of shapes below has 9 entries per layer: bounded by the layers the files hold before it is made (a
    # config claiming 10^9 layers is one line, not an allocation without bound); every other size is then checked
    # against a tensor that exists.
    layers = {m.group(1) for n in hf if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    if cfg["n_layer"] > len(layers):
        raise HFError(f"{folder}/config.json: num_hidden_layers {cfg['n_layer']}, but its safetensors files hold "
                      f"the tensors of {len(layers)} layers")
    shapes, sd = expected_shapes(cfg), {}
    for hf_name, t in hf.items():
        name = rename(hf_name, FROM_HF)
        if name is None or name not in shapes:
            why = ("a bias: model.py's linears and norms have none" if hf_name.endswith(".bias")
                   else "a tensor model.py has no place for")
            raise HFError(f"{folder}: {hf_name} is {why}")
        if list(t.shape) != shapes[name]:
            raise HFError(f"{folder}: {hf_name} has shape {list(t.shape)}, config.json implies {shapes[name]}")
        sd[name] = t
    if "lm_head.weight" not in sd and c.get("tie_word_embeddings", False) and "tok_emb.weight" in sd:
        sd["lm_head.weight"] = sd["tok_emb.weight"].clone()  # model.py unties: the head starts as a copy
    if missing := [hf for ours, hf in ((n, rename(n, TO_HF)) for n in shapes) if ours not in sd]:
        raise HFError(f"{folder}: {missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if missing[1:] else ""))
    tokenizer = c.get("tokenizer")
    if not isinstance(tokenizer, str):
        raise HFError(f"{folder}/config.json names no tokenizer this project reads: add \"tokenizer\": \"gpt2\" "
                      "(or another tiktoken encoding, or \"bytes\") if the model was trained with it")
    return {"model": {n: sd[n] for n in shapes}, "model_config": cfg, "tokenizer": tokenizer, "args": {}}


# ----------------------------------------------------------------------------- the command line
def main(argv=None):
    """checkpoint.py's command line (python checkpoint.py consolidate ... | export-hf ...)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in ("consolidate", "export-hf"):
        print("usage: python checkpoint.py consolidate OUT_DIR FILE | export-hf OUT_DIR HF_DIR", file=sys.stderr)
        sys.exit(2)
    cmd, src, dst = argv
    try:
        if cmd == "consolidate":
            d = consolidate(src, dst)
            print(f"{d} -> {dst} ({Path(dst).stat().st_size / 2 ** 20:.1f} MB)")
        else:
            export_hf(src, dst)
            print(f"{src} -> {dst}/config.json, {dst}/model.safetensors")
    except (CheckpointError, OSError) as e:
        print(f"checkpoint.py: error: {e}", file=sys.stderr)
        sys.exit(2)

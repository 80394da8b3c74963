"""weights.py: a model's weights out of training and back in: one whole-model file, or a Hugging Face Llama folder.

The idea: a checkpoint (checkpoint.py) is pieces of every parameter spread over the files of the ranks that held
them; the whole model is those pieces assembled (full_state_dict: each rank file memory-mapped, each piece copied
into place). `consolidate` writes it as one file; `load_weights` reads whatever a user hands over (a run's folder,
a step folder, such a file, or a Hugging Face folder), for sft.py --init, pretrain.py --init and generation. It
reads nothing yet: each tensor is memory-mapped (SavedWeights for a folder), and training.build_model copies out
only the blocks a rank holds (read_box), so a rank of a large model never holds the whole one.

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
CRC-32 of every file (all of the checkpoint); the file written is 4 bytes per parameter. --init on a layout: each
rank reads its blocks' pages (and, from a run's folder, the CRC-32 of every file first).

Run: `python checkpoint.py consolidate out/pretrain model.pt` and `python checkpoint.py export-hf out/pretrain hf/`
write them; `sft.py --init hf/` or `pretrain.py --init model.pt` read them back (load_weights).
"""
import json
import mmap
import os
import re
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from checkpoint import CheckpointError, copy_overlap, find, rects

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
NAMES = {v: k for k, v in DTYPES.items()}


# ----------------------------------------------------------------------------- the whole model
class SavedWeights(Mapping):
    """A step folder's parameters by full name, assembled only when asked: [name] one whole tensor, box(name, box)
    only a block of it. Each rank file is memory-mapped, so only the pages of the pieces a block overlaps are
    read. For each parameter, the first of `kinds` saved for it (by default the fp32 master where there is one,
    else the weights)."""

    def __init__(self, d, meta, kinds=("master", "param")):
        self.d, by_name, self.saved = Path(d), {}, {}
        for f in meta["files"]:
            t = torch.load(self.d / f["file"], map_location="cpu", mmap=True, weights_only=False)["tensors"]
            for r in f["pieces"]:
                by_name.setdefault(r["name"], []).append((t, r))
        for name, saved in by_name.items():
            kind = next((k for k in kinds if any(k in r["kinds"] for _, r in saved)), None)
            if kind is not None:
                self.saved[name] = (kind, [(t[r["kinds"][kind]], r) for t, r in saved if kind in r["kinds"]])
        self.shapes = {name: saved[0][1]["shape"] for name, (_, saved) in self.saved.items()}

    def __getitem__(self, name):
        return self.box(name, [[0, n] for n in self.shapes[name]])

    def __iter__(self):
        return iter(sorted(self.saved, key=_order))

    def __len__(self):
        return len(self.saved)

    def box(self, name, box):
        """Block `box` ([start, length] per dimension) of the whole tensor `name`, copied from the pieces."""
        kind, saved = self.saved[name]
        out = torch.empty([n for _, n in box], dtype=saved[0][0].dtype)
        n = sum(copy_overlap(out.view(-1), rects(box, [0, out.numel()]), t, rects(r["box"], r["flat"]))
                for t, r in saved)
        if n != out.numel():
            raise CheckpointError(f"{self.d}: {kind} of {name}: the checkpoint's pieces cover {n} of the "
                                  f"{out.numel()} values asked for (missing, or saved twice)")
        return out


def full_state_dict(d, meta, kinds=("master", "param")):
    """Every parameter whole (SavedWeights, every one assembled), in the model's order."""
    return dict(SavedWeights(d, meta, kinds))


def read_box(weights, name, shape, box):
    """Block `box` ([start, length] per dimension) of the whole tensor `name` (of `shape`) of `weights`: a state
    dict (memory-mapped, as load_weights gives it: only the block's pages are read) or SavedWeights. A copy."""
    if name not in weights:
        raise CheckpointError(f"the weights have no {name} (another model?)")
    have = weights.shapes[name] if isinstance(weights, SavedWeights) else weights[name].shape
    if list(have) != list(shape):
        raise CheckpointError(f"the weights' {name} has shape {list(have)}, the model's {list(shape)}")
    if isinstance(weights, SavedWeights):
        return weights.box(name, box)
    return weights[name][tuple(slice(a, a + n) for a, n in box)].clone(memory_format=torch.contiguous_format)


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


def consolidate(src, dst):
    """One whole-model file: {"model": state dict, "model_config", "tokenizer", "args", "step"} (what --init
    reads; "args" are the training run's flags, e.g. its --experts)."""
    d, meta = newest_whole(src)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": full_state_dict(d, meta), "model_config": meta["model_config"],
                "tokenizer": meta["tokenizer"], "args": meta.get("args", {}), "step": meta["step"]}, dst)
    return d


def load_weights(path):
    """Whole weights from what a user may hand over: a run's folder (its newest complete step), a step folder,
    a consolidated file, or a Hugging Face Llama folder. Returns {"model": state dict, "model_config": dict,
    "tokenizer", "args": the flags of the run that trained it (empty for a Hugging Face folder)}. Nothing is read
    yet: the state dict's tensors are memory-mapped from the file (SavedWeights for a folder), so a rank that
    takes its blocks (read_box) reads only their pages."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").exists():
        return import_hf(p)
    if p.is_dir():
        d, meta = newest_whole(p)
        return {"model": SavedWeights(d, meta), "model_config": meta["model_config"],
                "tokenizer": meta["tokenizer"], "args": meta.get("args", {})}
    if not p.is_file():
        raise CheckpointError(f"{path}: no such file or folder (a run's --out, a consolidated file or an HF folder)")
    try:
        ckpt = torch.load(p, map_location="cpu", mmap=True, weights_only=False)
        return {"model": ckpt["model"], "model_config": ckpt["model_config"], "tokenizer": ckpt["tokenizer"],
                "args": ckpt.get("args") or {}}
    except Exception as e:
        raise CheckpointError(f"{path}: not a consolidated checkpoint ({type(e).__name__})") from None


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
    # Written aside, then renamed over `path`: a file being read through a memory map (read_safetensors) is
    # never truncated under its reader, which keeps the old contents until it lets go.
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def read_safetensors(path):
    """{name: tensor} from a .safetensors file; every length, dtype and offset checked against the file. The
    tensors are views of a memory map of the file: nothing is read until they are."""
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
        # Copy-on-write: the tensors may be written to without touching the file; pages are read when touched.
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = DTYPES[h["dtype"]], [int(s) for s in h["shape"]], h["data_offsets"]
            nbytes = dtype.itemsize * (torch.Size(shape).numel())
            assert 0 <= a and b - a == nbytes and 8 + n + b <= size
        except (KeyError, TypeError, ValueError, AssertionError):
            raise HFError(f"{path}: corrupt safetensors header entry for {name} ({h})") from None
        out[name] = (torch.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=8 + n + a) if nbytes
                     else torch.empty(0, dtype=dtype)).view(shape)
    return out


# ----------------------------------------------------------------------------- out
def export_hf(src, dst):
    """A run's folder, step folder or consolidated file -> dst/config.json and dst/model.safetensors."""
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
    try:
        d, h = int(c["hidden_size"]), int(c["num_attention_heads"])
        cfg = {"n_layer": int(c["num_hidden_layers"]), "n_head": h, "n_kv_head": int(c.get("num_key_value_heads", h)),
               "d_model": d, "d_ff": int(c["intermediate_size"]), "vocab_size": int(c["vocab_size"]),
               "block_size": int(c.get("max_position_embeddings", 2048)), "rope_theta": float(c.get("rope_theta", 1e4)),
               "norm_eps": float(c.get("rms_norm_eps", 1e-6)), "attn": "-", "activation_checkpointing": False}
    except (KeyError, TypeError, ValueError) as e:
        raise HFError(f"{where}: missing or invalid field {e}") from None
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

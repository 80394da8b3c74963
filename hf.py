"""hf.py: Hugging Face Llama folders in and out: names, safetensors by hand, config.json, tokenizer.

model.py is a Llama-architecture decoder (RMSNorm, rotary embeddings on split halves, SwiGLU,
grouped-query attention, no biases), so a trained model is a LlamaForCausalLM once its tensors are
renamed, and a Llama checkpoint of a shape model.py can build is a model.py model. The names:

    model.py                       Hugging Face Llama
    tok_emb                        model.embed_tokens
    blocks.{i}.attn_norm           model.layers.{i}.input_layernorm
    blocks.{i}.attn.w{q,k,v,o}     model.layers.{i}.self_attn.{q,k,v,o}_proj
    blocks.{i}.mlp_norm            model.layers.{i}.post_attention_layernorm
    blocks.{i}.mlp.w1, w3, w2      model.layers.{i}.mlp.gate_proj, up_proj, down_proj
    norm, lm_head                  model.norm, lm_head

Both rotate the two halves of each head (rotate_half), so the query and key rows need no
permutation.

config.json comes in two forms: transformers 4 writes top-level `rope_theta` and `rope_scaling`,
transformers 5 one `rope_parameters` {"rope_type", "rope_theta", ...}; both are read (and must agree
when both are there), and export writes both. Rope types: "default" and Llama 3.1's "llama3"
(model.llama3_frequencies); any other (linear, dynamic, yarn, longrope, ...) is refused in one line,
as are biases, another activation, partial rotary and settings per layer type. A `head_dim` other
than hidden_size / heads is kept (ModelConfig.head_dim_override).

Tied embeddings: model.py never ties the embedding and the head (a pipeline's first and last stages,
and tensor-parallel or ZeRO shards, would otherwise share one parameter across ranks). A tied
checkpoint's embedding is copied into the head on import; export writes tie_word_embeddings true and
no lm_head when the two are still equal (a tied model not trained since), else false with both
tensors: a fine-tuned tied model comes out untied.

Special tokens: load_weights returns {"bos", "eos", "pad"} ids (special_ids): a Hugging Face
folder's from generation_config.json, config.json or its tokenizer files; "bytes" and tiktoken
encodings have <|endoftext|> as eos. A folder holding tokenizer.json or tokenizer.model is its own
tokenizer: runs record its path, and export copies its files (tokenizer.json, tokenizer_config.json,
...) next to the weights, with the ids in config.json and generation_config.json, so that
transformers' AutoTokenizer and generate() work on the exported folder.

safetensors, written out: 8 bytes of little-endian header length N, N bytes of JSON {name: {"dtype",
"shape", "data_offsets": [begin, end]}} (offsets into what follows), then the raw little-endian
tensors. Reading it is a memory map and one view per tensor; every field is checked, so a damaged
file is one line, not a crash.

Run: `python checkpoint.py export-hf out/pretrain hf/` writes a folder (export_hf, from anything
load_weights reads); `sft.py --init hf/` or `generate.py hf/` read one (load_weights -> import_hf).
"""
import json
import math
import mmap
import os
import re
import shutil
import struct
from pathlib import Path

import torch

import data as data_lib
from checkpoint import CheckpointError
from model import config_dict

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
NAMES = {v: k for k, v in DTYPES.items()}


# ----------------------------------------------------------------------------- Hugging Face names
PAIRS = [("tok_emb", "model.embed_tokens"), ("norm", "model.norm"), ("lm_head", "lm_head"),
         ("blocks.{i}.attn_norm", "model.layers.{i}.input_layernorm"),
         ("blocks.{i}.mlp_norm", "model.layers.{i}.post_attention_layernorm"),
         ("blocks.{i}.attn.w{p}", "model.layers.{i}.self_attn.{p}_proj"),
         ("blocks.{i}.mlp.w1", "model.layers.{i}.mlp.gate_proj"),
         ("blocks.{i}.mlp.w3", "model.layers.{i}.mlp.up_proj"),
         ("blocks.{i}.mlp.w2", "model.layers.{i}.mlp.down_proj")]


def _table(pairs):
    """[(regex of one side's weight name, the other side's name with groups)] from pairs."""
    pat = lambda s: (re.escape(s + ".weight").replace(r"\{i\}", r"(?P<i>\d+)")  # noqa
                     .replace(r"\{p\}", "(?P<p>[qkvo])"))
    sub = lambda s: (s + ".weight").replace("{i}", r"\g<i>").replace("{p}", r"\g<p>")  # noqa
    return [(pat(a), sub(b)) for a, b in pairs]


TO_HF, FROM_HF = _table(PAIRS), _table([(b, a) for a, b in PAIRS])


class HFError(CheckpointError):
    """A Hugging Face folder model.py cannot represent, or a damaged one: the line the user sees."""


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
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the tensors start 8-byte aligned
    # Written aside, then renamed over `path`: a file read through a memory map (read_safetensors)
    # is never truncated under its reader, which keeps the old contents until it lets go.
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def read_safetensors(path):
    """{name: tensor} from a .safetensors file; every length, dtype and offset checked against the
    file. The tensors are views of a memory map of the file: nothing is read until they are."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= size - 8:
            raise HFError(f"{path}: corrupt safetensors header (header length {n}, file of "
                          f"{size} bytes)")
        try:
            header = json.loads(f.read(n))
            assert isinstance(header, dict)
        except (ValueError, AssertionError):
            raise HFError(f"{path}: corrupt safetensors header (not a JSON object)") from None
        # Copy-on-write: the tensors may be written to without touching the file; pages load
        # when touched.
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out, spans = {}, []
    for name, h in header.items():
        if name == "__metadata__":
            continue
        # Sizes are JSON integers (not floats, not bools), >= 0; their product in Python's ints.
        try:
            dtype, shape, (a, b) = DTYPES[h["dtype"]], h["shape"], h["data_offsets"]
            assert all(type(v) is int and v >= 0 for v in [*shape, a, b])
            nbytes = dtype.itemsize * math.prod(shape)
            assert b - a == nbytes and 8 + n + b <= size
        except (KeyError, TypeError, ValueError, AssertionError):
            raise HFError(f"{path}: corrupt safetensors header entry for {name} "
                          f"({str(h)[:200]}): its shape and offsets must be non-negative "
                          "integers that fit the file") from None
        spans.append((a, b, name))
    for (a0, b0, first), (a1, b1, second) in zip(sorted(spans), sorted(spans)[1:]):
        if a1 < b0:  # two tensors sharing bytes: a forged or damaged header
            raise HFError(f"{path}: tensors {first} and {second} overlap in the file "
                          f"(bytes {a1}..{b0})")
    for name, h in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (a, b) = DTYPES[h["dtype"]], h["shape"], h["data_offsets"]
        out[name] = (torch.frombuffer(data, dtype=dtype, count=(b - a) // dtype.itemsize,
                                      offset=8 + n + a) if b > a
                     else torch.empty(0, dtype=dtype)).view(shape)
    return out


# ----------------------------------------------------------------------------- out
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja")


def export_hf(src, dst):
    """A run's folder, step folder or consolidated file -> dst/config.json, generation_config.json,
    model.safetensors, and the tokenizer's files when the run's tokenizer is a folder (dst new or
    empty: nothing is overwritten)."""
    if Path(dst).exists() and (not Path(dst).is_dir() or any(Path(dst).iterdir())):
        raise CheckpointError(f"export-hf: {dst} exists and is not an empty folder: give a new "
                              "one (nothing there is overwritten)")
    from weights import load_weights  # (imported here: weights.py imports this file)
    init = load_weights(src)
    sd, cfg, tokenizer, ids = (init["model"], init["model_config"], init["tokenizer"],
                               init["special_ids"])
    # Tied exactly when the two tensors are equal (an untouched tied import): no head is written.
    tied = torch.equal(sd["tok_emb.weight"], sd["lm_head.weight"])
    hf = {}
    for name, t in sd.items():
        hf_name = rename(name, TO_HF)
        if hf_name is None:
            raise CheckpointError(f"export-hf: {name} has no Llama counterpart "
                                  "(mixture-of-experts and LoRA layers are not in the Llama "
                                  "architecture; merge LoRA first)")
        if not (tied and name == "lm_head.weight"):
            hf[hf_name] = t
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    write_safetensors(dst / "model.safetensors", hf)
    theta, scaling = cfg["rope_theta"], cfg.get("rope_scaling")
    special = {f"{k}_token_id": ids[k] for k in ("bos", "eos", "pad")}
    # Both forms of the rotary settings: transformers 4 reads rope_theta and rope_scaling,
    # transformers 5 reads rope_parameters.
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": cfg["d_model"], "intermediate_size": cfg["d_ff"],
              "num_hidden_layers": cfg["n_layer"], "num_attention_heads": cfg["n_head"],
              "num_key_value_heads": cfg["n_kv_head"],
              "head_dim": cfg.get("head_dim_override") or cfg["d_model"] // cfg["n_head"],
              "rms_norm_eps": cfg["norm_eps"], "rope_theta": theta, "rope_scaling": scaling,
              "rope_parameters": (scaling or {"rope_type": "default"}) | {"rope_theta": theta},
              "max_position_embeddings": cfg["block_size"], "vocab_size": cfg["vocab_size"],
              "tie_word_embeddings": tied, "hidden_act": "silu", "attention_bias": False,
              "mlp_bias": False, "initializer_range": 0.02,
              "torch_dtype": str(next(iter(sd.values())).dtype).removeprefix("torch.")}
    config |= special
    # The folder's files travel with the model: AutoTokenizer reads them.
    if is_tokenizer_folder(tokenizer):
        for f in TOKENIZER_FILES:
            if ((Path(tokenizer) / f).is_file()
                    and (Path(tokenizer) / f).resolve() != (dst / f).resolve()):
                shutil.copyfile(Path(tokenizer) / f, dst / f)
    else:
        config["tokenizer"] = tokenizer  # "bytes" or a tiktoken encoding: for this project's reader
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dst / "generation_config.json").write_text(json.dumps(special, indent=2) + "\n")
    return config


# ----------------------------------------------------------------------------- in
def _check_config(c, where):
    arch = c.get("architectures") or [c.get("model_type")]
    if "LlamaForCausalLM" not in arch and c.get("model_type") != "llama":
        raise HFError(f"{where}: architectures {arch} is not LlamaForCausalLM (model.py is a "
                      "Llama-style decoder)")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                      ("pretraining_tp", 1), ("partial_rotary_factor", 1.0)):
        if c.get(key, want) != want:
            raise HFError(f"{where}: {key} {c[key]!r} cannot be represented by model.py "
                          f"(it has {want!r})")
    sizes = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
             "d_model": "hidden_size", "d_ff": "intermediate_size", "vocab_size": "vocab_size"}
    defaults = {"num_key_value_heads": c.get("num_attention_heads"),
                "max_position_embeddings": 2048}
    for key in [*sizes.values(), *defaults]:
        v = c.get(key, defaults.get(key))
        if type(v) is not int or v < 1:
            raise HFError(f"{where}: {key} {v!r} must be a positive integer")
    try:
        d, h = int(c["hidden_size"]), int(c["num_attention_heads"])
        cfg = {"n_layer": int(c["num_hidden_layers"]), "n_head": h,
               "n_kv_head": int(c.get("num_key_value_heads", h)),
               "d_model": d, "d_ff": int(c["intermediate_size"]),
               "vocab_size": int(c["vocab_size"]),
               "block_size": int(c.get("max_position_embeddings", 2048)), "rope_theta": None,
               "norm_eps": float(c.get("rms_norm_eps", 1e-6)), "attn": "-",
               "activation_checkpointing": False}
        hd = int(c.get("head_dim") or d // h)  # (some configs write "head_dim": null)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise HFError(f"{where}: missing or invalid field {e}") from None
    if hd <= 0 or hd % 2 or h <= 0 or cfg["n_kv_head"] <= 0 or h % cfg["n_kv_head"]:
        raise HFError(f"{where}: head_dim {hd} with {h} heads and {cfg['n_kv_head']} KV heads: "
                      "model.py needs an even head_dim and the query heads grouped evenly over "
                      "the KV heads")
    cfg["rope_theta"], scaling = read_rope(c, where)
    return config_dict(cfg | {"head_dim_override": hd if hd * h != d else 0,
                              "rope_scaling": scaling})


LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def read_rope(c, where):
    """(rope_theta, rope_scaling for model.py) from either form of config.json: transformers 4's
    top-level rope_theta and rope_scaling {"rope_type" (or "type"), ...}, or transformers 5's
    rope_parameters {"rope_type", "rope_theta", ...}. A config with both must say the same in
    both."""
    readings = {}
    if c.get("rope_parameters") is not None:
        readings["rope_parameters"] = _rope_form(c["rope_parameters"], c.get("rope_theta", 1e4),
                                                 "rope_parameters", where)
    if "rope_theta" in c or c.get("rope_scaling") is not None or not readings:
        readings["rope_theta and rope_scaling"] = _rope_form(c.get("rope_scaling") or {},
                                                             c.get("rope_theta", 1e4),
                                                             "rope_scaling", where)
    if len(set(map(json.dumps, readings.values()))) > 1:
        raise HFError(f"{where}: rope_parameters says {readings['rope_parameters']}, rope_theta "
                      f"and rope_scaling {readings['rope_theta and rope_scaling']} (theta, "
                      "scaling): which one is meant?")
    return next(iter(readings.values()))


def _rope_form(p, theta, key, where):
    """One form's (theta, scaling): default rotary frequencies or Llama 3.1's "llama3"; no other."""
    if not isinstance(p, dict) or any(isinstance(v, dict) for v in p.values()):
        raise HFError(f"{where}: {key} {p!r} is not one object of numbers (rotary settings per "
                      "layer type are not represented by model.py)")
    kind = p.get("rope_type", p.get("type", "default"))
    try:
        theta = float(p.get("rope_theta", theta))
        assert math.isfinite(theta) and theta > 1
    except (TypeError, ValueError, AssertionError):
        raise HFError(f"{where}: rope_theta {p.get('rope_theta', theta)!r} "
                      "is not a number > 1") from None
    known = {"rope_type", "type", "rope_theta"} | (set(LLAMA3_KEYS) if kind == "llama3" else set())
    if kind not in ("default", "llama3") or set(p) - known:
        what = (f"rope_type {kind!r}" if kind not in ("default", "llama3")
                else f"{sorted(set(p) - known)[0]!r}")
        raise HFError(f"{where}: {key} {what} cannot be represented by model.py (it has the rope "
                      f"types 'default' and 'llama3' with {', '.join(LLAMA3_KEYS)})")
    if kind == "default":
        return theta, None
    try:
        s = {k: float(p[k]) for k in LLAMA3_KEYS}
        assert (s["factor"] >= 1 and 0 < s["low_freq_factor"] < s["high_freq_factor"]
                and s["factor"] < math.inf)
        assert (s["original_max_position_embeddings"]
                == int(s["original_max_position_embeddings"]) > 0)
    except (KeyError, TypeError, ValueError, AssertionError, OverflowError):
        raise HFError(f"{where}: {key} of rope_type 'llama3' needs numbers factor >= 1, "
                      "0 < low_freq_factor < high_freq_factor and "
                      f"original_max_position_embeddings > 0, got {p}") from None
    return theta, ({"rope_type": "llama3"} | s
                   | {"original_max_position_embeddings": int(s[LLAMA3_KEYS[3]])})


def expected_shapes(cfg):
    """Every tensor model.py builds for this config, with its shape, in the model's order."""
    hd = cfg.get("head_dim_override") or cfg["d_model"] // cfg["n_head"]
    d, q, kv, ff = cfg["d_model"], cfg["n_head"] * hd, cfg["n_kv_head"] * hd, cfg["d_ff"]
    shapes = {"tok_emb.weight": [cfg["vocab_size"], d]}
    for i in range(cfg["n_layer"]):
        shapes |= {f"blocks.{i}.{name}.weight": shape for name, shape in (
            ("attn_norm", [d]),
            ("attn.wq", [q, d]), ("attn.wk", [kv, d]), ("attn.wv", [kv, d]), ("attn.wo", [d, q]),
            ("mlp_norm", [d]), ("mlp.w1", [ff, d]), ("mlp.w3", [ff, d]), ("mlp.w2", [d, ff]))}
    return shapes | {"norm.weight": [d], "lm_head.weight": [cfg["vocab_size"], d]}


def _json(path):
    try:
        c = json.loads(path.read_text())
        assert isinstance(c, dict)
        return c
    except (OSError, ValueError, AssertionError):
        raise HFError(f"{path}: missing or not a JSON object") from None


def import_hf(folder):
    """An HF Llama folder -> load_weights' dict (model.py state dict, config, tokenizer, special
    ids); refuses, naming the field or tensor, whatever model.py cannot represent."""
    folder = Path(folder)
    c = _json(folder / "config.json")
    cfg = _check_config(c, f"{folder}/config.json")
    index = folder / "model.safetensors.index.json"
    # A large model comes in several files, listed by an index: {"weight_map": {tensor name: file}}.
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    hf = {}
    for name in files:
        if not (folder / name).is_file():
            raise HFError(f"{folder / name}: missing")
        hf |= read_safetensors(folder / name)
    # The table of shapes below has 9 entries per layer: bounded by the layers the files hold before
    # it is made (a config claiming 10^9 layers is one line, not an allocation without bound); every
    # other size is then checked against a tensor that exists.
    layers = {m.group(1) for n in hf if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    if cfg["n_layer"] > len(layers):
        raise HFError(f"{folder}/config.json: num_hidden_layers {cfg['n_layer']}, but its "
                      f"safetensors files hold the tensors of {len(layers)} layers")
    shapes, sd = expected_shapes(cfg), {}
    for hf_name, t in hf.items():
        name = rename(hf_name, FROM_HF)
        if name is None or name not in shapes:
            why = ("a bias: model.py's linears and norms have none" if hf_name.endswith(".bias")
                   else "a tensor model.py has no place for")
            raise HFError(f"{folder}: {hf_name} is {why}")
        if list(t.shape) != shapes[name]:
            raise HFError(f"{folder}: {hf_name} has shape {list(t.shape)}, config.json implies "
                          f"{shapes[name]}")
        sd[name] = t
    # model.py unties: the head starts as a copy
    if c.get("tie_word_embeddings", False) and "tok_emb.weight" in sd:
        if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd["tok_emb.weight"]):
            raise HFError(f"{folder}: tie_word_embeddings is true, but lm_head.weight differs "
                          "from the embedding")
        sd["lm_head.weight"] = sd["tok_emb.weight"].clone()
    if missing := [hf for ours, hf in ((n, rename(n, TO_HF)) for n in shapes) if ours not in sd]:
        raise HFError(f"{folder}: {missing[0]} is missing"
                      + (f" (and {len(missing) - 1} more)" if missing[1:] else ""))
    tokenizer = str(folder.resolve()) if is_tokenizer_folder(folder) else c.get("tokenizer")
    if not isinstance(tokenizer, str):
        raise HFError(f"{folder} holds no tokenizer.json or tokenizer.model, and its config.json "
                      "names no tokenizer this project reads: add \"tokenizer\": \"gpt2\" (or "
                      "another tiktoken encoding, or \"bytes\") if the model was trained with it")
    ids = folder_special_ids(folder)
    if not any(v is not None for v in ids.values()) and not is_tokenizer_folder(tokenizer):
        ids = special_ids(tokenizer)  # a folder exported before the ids were written
    return {"model": {n: sd[n] for n in shapes}, "model_config": cfg, "tokenizer": tokenizer,
            "args": {}, "special_ids": ids}


# ----------------------------------------------------------------------------- special tokens
def is_tokenizer_folder(tokenizer):
    """A tokenizer named by a folder path (a Hugging Face tokenizer) rather than "bytes" or a
    tiktoken encoding."""
    return any((Path(tokenizer) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


# <|endoftext|>'s id in tiktoken's own encodings (tiktoken_ext/openai_public.py), known without
# their ranks, whose download a machine offline cannot make: a run trained with one exports and
# loads anywhere.
TIKTOKEN_EOT = {"gpt2": 50256, "r50k_base": 50256, "p50k_base": 50256, "p50k_edit": 50256,
                "cl100k_base": 100257, "o200k_base": 199999, "o200k_harmony": 199999}


def special_ids(tokenizer):
    """{"bos", "eos", "pad"}: the ids generation and export need (None where there is none): a
    tokenizer folder's (folder_special_ids), or for "bytes" and tiktoken encodings the end-of-text
    token as eos."""
    if is_tokenizer_folder(tokenizer):
        return folder_special_ids(Path(tokenizer))
    if tokenizer in TIKTOKEN_EOT:
        return {"bos": None, "eos": TIKTOKEN_EOT[tokenizer], "pad": None}
    try:
        return {"bos": None, "eos": data_lib.eot_id(data_lib.get_tokenizer(tokenizer)), "pad": None}
    except data_lib.DataError as e:  # a folder that has moved, or an encoding not loadable here
        raise CheckpointError(f"tokenizer {tokenizer!r} is not a folder with tokenizer.json or "
                              f"tokenizer.model, and {e}") from None


def folder_special_ids(folder):
    """From generation_config.json (what transformers' generate() uses), else config.json, else the
    token strings of tokenizer_config.json looked up in tokenizer.json. eos may be a list (Llama 3
    instruct models)."""
    ids = {"bos": None, "eos": None, "pad": None}
    for f in ("config.json", "generation_config.json"):  # the later wins
        c = _json(folder / f) if (folder / f).is_file() else {}
        for k in ids:
            v = c.get(f"{k}_token_id")
            if v is not None and not (isinstance(v, int) or isinstance(v, list)
                                      and all(isinstance(i, int) for i in v)):
                raise HFError(f"{folder / f}: {k}_token_id {v!r} is not a token id "
                              "or a list of them")
            ids[k] = v if v is not None else ids[k]
    if (None in ids.values() and (folder / "tokenizer_config.json").is_file()
            and (folder / "tokenizer.json").is_file()):
        t, vocab = _json(folder / "tokenizer_config.json"), _json(folder / "tokenizer.json")
        known = {a.get("content"): a.get("id") for a in vocab.get("added_tokens") or []
                 if isinstance(a, dict)}
        for k in (k for k, v in ids.items() if v is None):
            token = t.get(f"{k}_token")
            token = token.get("content") if isinstance(token, dict) else token
            ids[k] = known.get(token) if isinstance(token, str) else None
    return ids

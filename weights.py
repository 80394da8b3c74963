"""weights.py: whole models out of a run's checkpoint (one consolidated file) and back in (--init).

The idea: a checkpoint (checkpoint.py) is pieces of every parameter spread over the files of the
ranks that held them; the whole model is those pieces assembled (full_state_dict: each rank file
memory-mapped, each piece copied into place by reshard.py). `consolidate` writes it as one file;
`load_weights` reads whatever a user hands over (a run's folder, a step folder, such a file, or a
Hugging Face folder: hf.py), for sft.py --init, pretrain.py --init and generation. It reads nothing
yet: each tensor is memory-mapped (SavedWeights for a folder), and stack.build_model copies out only
the blocks a rank holds (read_box), so a rank of a large model never holds the whole one.

The consolidated file: torch.save of {"model": state dict, "model_config", "tokenizer", "args",
"step"}, read back with weights_only (tensors and plain values, never code). A LoRA run's adapters
are merged in.

Cost: assembling reads every piece of the chosen kind once (the fp32 masters: 4 bytes per
parameter) after the CRC-32 of every file (all of the checkpoint); the file written is 4 bytes per
parameter. --init on a layout: each rank reads its blocks' pages (and, from a run's folder, the
CRC-32 of every file first).

Run: `python checkpoint.py consolidate out/pretrain model.pt` writes one; `pretrain.py --init
model.pt` or `sft.py --init hf/` read them back (load_weights). This file is also checkpoint.py's
command line (main): `consolidate` here, `export-hf` in hf.py.
"""
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from checkpoint import CheckpointError, find, safe_load
from hf import export_hf, import_hf, special_ids
from model import config_dict
from reshard import copy_overlap, rects


# ----------------------------------------------------------------------------- the whole model
class SavedWeights(Mapping):
    """A step folder's parameters by full name, assembled only when asked: [name] one whole tensor,
    box(name, box) only a block of it. Each rank file is memory-mapped, so only the pages of the
    pieces a block overlaps are read. For each parameter, the first of `kinds` saved for it (by
    default the fp32 master where there is one, else the weights)."""

    def __init__(self, d, meta, kinds=("master", "param")):
        self.d, by_name, self.saved = Path(d), {}, {}
        for f in meta["files"]:
            t = safe_load(self.d / f["file"])["tensors"]  # (memory-mapped; runs no code)
            for r in f["pieces"]:
                by_name.setdefault(r["name"], []).append((t, r))
        for name, saved in by_name.items():
            kind = next((k for k in kinds if any(k in r["kinds"] for _, r in saved)), None)
            if kind is not None:
                self.saved[name] = (kind, [(t[r["kinds"][kind]], r) for t, r in saved
                                           if kind in r["kinds"]])
        self.shapes = {name: saved[0][1]["shape"] for name, (_, saved) in self.saved.items()}

    def __getitem__(self, name):
        return self.box(name, [[0, n] for n in self.shapes[name]])

    def __iter__(self):
        return iter(sorted(self.saved, key=_order))

    def __len__(self):
        return len(self.saved)

    def box(self, name, box):
        """Block `box` ([start, length] per dimension) of the whole tensor `name`, from pieces."""
        kind, saved = self.saved[name]
        out = torch.empty([n for _, n in box], dtype=saved[0][0].dtype)
        n = sum(copy_overlap(out.view(-1), rects(box, [0, out.numel()]), t,
                             rects(r["box"], r["flat"]))
                for t, r in saved)
        if n != out.numel():
            raise CheckpointError(f"{self.d}: {kind} of {name}: the checkpoint's pieces cover "
                                  f"{n} of the {out.numel()} values asked for "
                                  "(missing, or saved twice)")
        return out


def full_state_dict(d, meta, kinds=("master", "param")):
    """Every parameter whole (SavedWeights, every one assembled), in the model's order."""
    return dict(SavedWeights(d, meta, kinds))


def read_box(weights, name, shape, box):
    """Block `box` ([start, length] per dimension) of the whole tensor `name` (of `shape`) of
    `weights`: a state dict (memory-mapped, as load_weights gives it: only the block's pages are
    read) or SavedWeights. A copy."""
    if name not in weights:
        raise CheckpointError(f"the weights have no {name} (another model?)")
    have = weights.shapes[name] if isinstance(weights, SavedWeights) else weights[name].shape
    if list(have) != list(shape):
        raise CheckpointError(f"the weights' {name} has shape {list(have)}, "
                              f"the model's {list(shape)}")
    if isinstance(weights, SavedWeights):
        return weights.box(name, box)
    block = weights[name][tuple(slice(a, a + n) for a, n in box)]
    return block.clone(memory_format=torch.contiguous_format)


def _order(name):  # the model's own order: embedding, blocks by number, norm, head
    m = re.match(r"blocks\.(\d+)\.", name)
    return (1, int(m.group(1)), name) if m else (0 if name.startswith("tok_emb") else 2, 0, name)


def newest_whole(path):
    """The newest complete step under `path` with every file's CRC-32 right (reads them all):
    (folder, meta)."""
    d, meta, skipped = find(path, crc=True)
    if d is None:
        raise CheckpointError(f"no complete checkpoint in {path}"
                              + (f" ({skipped[0]})" if skipped else ""))
    if skipped:
        print(f"warning: {skipped[0]}: took the previous complete step, {d}", file=sys.stderr)
    return d, meta


def merged(sd, lora_config):
    """A LoRA run's weights as a plain model's: W + (alpha/r) B A for every adapted layer, the
    factors dropped (what --init, export-hf and generation take; as in sft.py's merged.pt)."""
    if not lora_config:
        return sd
    scaling = lora_config["alpha"] / lora_config["r"]
    out = {k: v for k, v in sd.items() if ".lora_" not in k}
    for k in sd:
        if k.endswith(".lora_A"):
            w = out[f"{k[:-len('.lora_A')]}.weight"]
            delta = sd[k[:-1] + "B"] @ sd[k] * scaling  # (alpha/r) B A
            out[f"{k[:-len('.lora_A')]}.weight"] = w + delta.to(w.dtype)
    return out


def whole_model(d, meta):
    """The whole model of a step folder, merged if it is a LoRA run's."""
    return merged(full_state_dict(d, meta), meta.get("lora"))


def consolidate(src, dst):
    """One whole-model file: {"model": state dict, "model_config", "tokenizer", "args", "step"}
    (what --init reads; "args" are the training run's flags, e.g. its --experts). A LoRA run's
    adapters are merged in."""
    d, meta = newest_whole(src)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": whole_model(d, meta), "model_config": meta["model_config"],
                "tokenizer": meta["tokenizer"], "args": meta.get("args", {}),
                "step": meta["step"]}, dst)
    return d


def save_checkpoint(path, state):
    """One small file (sft.py's merged model): written under a temporary name, then renamed."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_weights(path):
    """Whole weights from what a user may hand over: a run's folder (its newest complete step), a
    step folder, a consolidated file, or a Hugging Face Llama folder. Returns {"model": state dict,
    "model_config": dict (model.config_dict's form), "tokenizer", "args": the flags of the run that
    trained it (empty for a Hugging Face folder), "special_ids": {"bos", "eos", "pad"}
    (special_ids)}. Nothing is read yet: the state dict's tensors are memory-mapped from the file
    (SavedWeights for a folder): a rank that takes its blocks (read_box) reads only their pages."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").exists():
        return import_hf(p)
    if p.is_dir():
        d, meta = newest_whole(p)
        # (a LoRA run's adapters are merged into its weights: read whole, once)
        init = {"model": whole_model(d, meta) if meta.get("lora") else SavedWeights(d, meta),
                "model_config": meta["model_config"],
                "tokenizer": meta["tokenizer"], "args": meta.get("args", {})}
    elif not p.is_file():
        raise CheckpointError(f"{path}: no such file or folder "
                              "(a run's --out, a consolidated file or an HF folder)")
    else:
        # (memory-mapped; weights_only: a file that would run code when unpickled is refused)
        ckpt = safe_load(p)
        try:
            assert (all(torch.is_tensor(t) for t in ckpt["model"].values())
                    and isinstance(ckpt["model_config"], dict))
            init = {"model": ckpt["model"], "model_config": ckpt["model_config"],
                    "tokenizer": ckpt["tokenizer"], "args": ckpt.get("args") or {}}
        except (KeyError, TypeError, AttributeError, AssertionError) as e:
            raise CheckpointError(f"{path}: not a consolidated checkpoint "
                                  f"({type(e).__name__} {e})") from None
    return init | {"model_config": config_dict(init["model_config"]),
                   "special_ids": special_ids(init["tokenizer"])}


# ----------------------------------------------------------------------------- the command line
def main(argv=None):
    """checkpoint.py's command line (python checkpoint.py consolidate ... | export-hf ...)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in ("consolidate", "export-hf"):
        print("usage: python checkpoint.py consolidate OUT_DIR FILE | export-hf OUT_DIR HF_DIR",
              file=sys.stderr)
        sys.exit(2)
    cmd, src, dst = argv
    try:
        if cmd == "consolidate":
            d = consolidate(src, dst)
            print(f"{d} -> {dst} ({Path(dst).stat().st_size / 2 ** 20:.1f} MB)")
        else:
            config = export_hf(src, dst)
            print(f"{src} -> {dst}/config.json, generation_config.json, model.safetensors"
                  + ("" if "tokenizer" in config else ", the tokenizer's files"))
    except (CheckpointError, OSError) as e:
        print(f"checkpoint.py: error: {e}", file=sys.stderr)
        sys.exit(2)

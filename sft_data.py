"""sft_data.py: fine-tuning examples -> token rows with a loss mask -> padded or packed batches,
and the embedded default examples.

The loss mask: chat.py renders an example (Alpaca's ### headers, or a model folder's own chat
template) into one token sequence and marks which tokens are learned (the assistant's turns with
their end token). The label of position i is token i+1 where that token is learned, -100 elsewhere,
and the loss ignores -100: the prompt is context, never a target (tokenize).

Batches: one example per row, padded on the right to the longest row of its micro-batch (padding
labels -100). Attention is causal, so a real token never sees the padding after it, and no example
sees another, at the cost of the padded positions' compute. Examples longer than --seq-len (default:
the context) are skipped and counted, never silently truncated; a prompt that alone fills it is an
error. --pack instead places several examples in one row of --seq-len tokens (pack): each with
positions restarting at 0 and a document id, so that attention is block-diagonal causal (model.py)
and each example's loss is exactly its padded loss; a step keeps the same examples, so packed and
padded training take the same steps (SFTBatches, in batches.step_items' order).

The embedded default data: every function with a docstring (and a body beyond it) in the standard
library's own source becomes one instruction example, "Write a Python function `name(args)` that:
<docstring's first paragraph>" -> its source without the docstring, dedented. Whole modules are
held out (crc32 of the module path % SFT_VAL_EVERY == 0), so no held-out function shares a module
with a trained one. Only examples whose rendering (the Alpaca template, byte tokenizer) fits the
tiny preset's context are kept; the others are counted, not truncated. It is built once into the
data cache (data.publish_folder: one process builds, the others wait), as train.jsonl, val.jsonl
and meta.json (the counts).

Seen running: `python sft.py` (no --data: builds and uses the default); tests/test_sft.py checks the
mask, padding against packing, and the batches' order over ranks.
"""
import ast
import json
import os
import textwrap
import zlib
from pathlib import Path

import torch

from batches import step_items
from chat import encode, read_jsonl, to_messages
from data import DataError, default_data_dir, get_tokenizer, publish_folder, stdlib_documents


# ------------------------------------------------------------------------------------ the loss mask
def tokenize(examples, enc, block_size, prompt_mask=True, limit="the model's context",
             packing=False):
    """[(x, y)] lists of token ids with y = -100 where no loss is taken (the mask); and how many
    examples were skipped for being longer than block_size + 1 tokens (x and y are shifted by one).
    With packing such an example is an error: a packed row is exactly --seq-len tokens, and an
    example is never cut."""
    out, skipped = [], 0
    for where, messages in examples:
        try:
            ids, learned = encode(enc, messages)
        except DataError as e:  # a model folder's chat template that cannot render this example
            raise DataError(f"{where}: {e}") from None
        if True not in learned:
            raise DataError(f"{where}: the template leaves no token of the assistant's turns "
                            "to learn")
        first = learned.index(True)
        if first > block_size:
            raise DataError(f"{where}: the prompt is {first} tokens, longer than {limit} of "
                            f"{block_size}: shorten it or use a model with a longer block_size")
        if len(ids) - 1 > block_size and packing:
            raise DataError(f"{where}: the example is {len(ids) - 1} tokens, longer than {limit} "
                            f"of {block_size}: --pack never cuts an example; raise --seq-len (up "
                            "to the context) or drop --pack (longer examples are then skipped "
                            "and counted)")
        if len(ids) - 1 > block_size:
            skipped += 1
            continue
        # y[i] is the label for predicting ids[i+1]: kept where ids[i+1] is learned (all: no mask)
        y = [t if (l or not prompt_mask) else -100 for t, l in zip(ids[1:], learned[1:])]
        out.append((ids[:-1], y))
    return out, skipped


def collate(rows, pad_id, multiple=1):
    """Pad each example on the right to the micro-batch's longest (rounded up to `multiple`:
    sequence parallelism cuts the positions over the tp ranks): inputs with pad_id, labels -100."""
    T = -(-max(len(x) for x, _ in rows) // multiple) * multiple
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (xi, yi) in enumerate(rows):
        x[i, :len(xi)], y[i, :len(yi)] = torch.tensor(xi), torch.tensor(yi)
    return x, y


def pack(rows, pad_id, T, multiple=1):
    """Several examples per row: longest first, each placed in the first row with room left in T
    tokens (first-fit decreasing), its positions restarting at 0 (pos) and its own document id
    (doc), so that attention stays inside it (model.py) and it computes exactly what it would alone.
    A row's tail is padding (labels -100, a document of its own). Returns
    (x, y, {"pos": pos, "doc": doc}), rows as long as the longest (rounded up to `multiple`). The
    loss is a sum over tokens: the order of the examples does not change it."""
    bins = []  # [tokens used, example indices]
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i][0])):
        xi = rows[i][0]
        fit = next((b for b in bins if b[0] + len(xi) <= T), None)
        if fit is None:
            bins.append(fit := [0, []])
        fit[0] += len(xi)
        fit[1].append(i)
    width = -(-max(used for used, _ in bins) // multiple) * multiple
    x = torch.full((len(bins), width), pad_id, dtype=torch.long)
    y = torch.full((len(bins), width), -100, dtype=torch.long)
    pos, doc = torch.zeros_like(x), torch.zeros_like(x)
    for r, (used, members) in enumerate(bins):
        o = 0
        for d, i in enumerate(members):
            xi, yi = rows[i]
            x[r, o:o + len(xi)], y[r, o:o + len(xi)] = torch.tensor(xi), torch.tensor(yi)
            pos[r, o:o + len(xi)], doc[r, o:o + len(xi)] = torch.arange(len(xi)), d
            o += len(xi)
        doc[r, o:] = len(members)
    return x, y, {"pos": pos, "doc": doc}


class SFTBatches:
    """As batches.Batches, over examples: step_items picks each step's examples for this rank,
    micro-batch by micro-batch, each made into tensors by `make` (collate or pack). A pure function
    of (seed, step)."""

    def __init__(self, rows, global_batch, make, rank=0, world=1, n_micro=1, seed=0):
        if global_batch > len(rows):
            raise DataError(f"--batch-size {global_batch} is more than the {len(rows)} "
                            "training examples")
        self.rows, self.B, self.make = rows, global_batch, make
        self.rank, self.world, self.n_micro, self.seed = rank, world, n_micro, seed
        self.step = 0

    def next(self):
        chunks = step_items(self.step, len(self.rows), self.B, self.seed, self.rank, self.world,
                            self.n_micro)
        self.step += 1
        return [self.make([self.rows[i] for i in chunk]) for chunk in chunks]

    def state_dict(self):
        return {"step": self.step, "seed": self.seed, "global_batch": self.B,
                "examples": len(self.rows)}

    def load_state_dict(self, sd):
        if (sd["seed"], sd["global_batch"], sd["examples"]) != (self.seed, self.B, len(self.rows)):
            raise DataError(f"--resume: the checkpoint's data position (seed {sd['seed']}, batch "
                            f"{sd['global_batch']}, {sd['examples']} examples) does not match "
                            "this run's")
        self.step = sd["step"]


def read_examples(data, val_data):
    """(train, held-out) examples: the embedded default (built below from the standard library,
    keeping the functions whose rendering fits the tiny model's context), or --data with
    --val-data or 1 line in 10 held out."""
    enc_bytes = get_tokenizer("bytes")
    if data is None:
        train_file, val_file = ensure_sft_default_data(
            lambda ex: encode(enc_bytes, to_messages(ex, "-"))[0])
        return read_jsonl(train_file), read_jsonl(val_data or val_file)
    train_ex = read_jsonl(data)
    if val_data:
        return train_ex, read_jsonl(val_data)
    # 1 line in 10 held out, by a hash of its position; never all of them
    held = [zlib.crc32(w.encode()) % 10 == 0 for w, _ in train_ex]
    if all(held) or not any(held):
        held = [i == len(train_ex) - 1 for i in range(len(train_ex))]
    val_ex = [e for e, h in zip(train_ex, held) if h]
    return [e for e, h in zip(train_ex, held) if not h] or val_ex, val_ex


# ---------------------------------------------------------------------------- the embedded default
SFT_VAL_EVERY = 10          # held-out modules for the default data: crc32(module path) % 10 == 0
# the tiny preset's context + 1 with the byte tokenizer: what the default keeps
DEFAULT_MAX_BYTES = 257


def function_examples(name, text):
    """(instruction, response) for each function with a docstring in one module's source."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return
    lines = text.splitlines()
    for node in ast.walk(tree):
        doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
        if not doc or len(node.body) < 2:
            continue
        summary = " ".join(doc.strip().split("\n\n")[0].split())
        d = node.body[0]  # the docstring's statement: its lines are cut out of the response
        src = lines[node.lineno - 1:d.lineno - 1] + lines[d.end_lineno:node.end_lineno]
        instruction = (f"Write a Python function `{node.name}({ast.unparse(node.args)})` that: "
                       f"{summary}")
        yield instruction, textwrap.dedent("\n".join(src))


def build_default_data(docs, out, render, max_bytes=DEFAULT_MAX_BYTES):
    """Write train.jsonl and val.jsonl (held out by module) of the functions whose rendering
    (`render`: an Alpaca-style dict -> its token ids, Alpaca template, byte tokenizer) fits in
    max_bytes; the rest are counted, not truncated. meta.json, written last, holds the counts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {s: open(out / f"{s}.jsonl.tmp", "w", encoding="utf-8") for s in ("train", "val")}
    counts = {"functions": 0, "too_long": 0, "train": 0, "val": 0}
    for name, text in docs:
        split = "val" if zlib.crc32(name.encode()) % SFT_VAL_EVERY == 0 else "train"
        for instruction, response in function_examples(name, text):
            counts["functions"] += 1
            ex = {"instruction": instruction, "output": response, "module": name}
            if len(render(ex)) > max_bytes:
                counts["too_long"] += 1
                continue
            files[split].write(json.dumps(ex) + "\n")
            counts[split] += 1
    for s, f in files.items():
        f.close()
        os.replace(out / f"{s}.jsonl.tmp", out / f"{s}.jsonl")
    (out / "meta.json").write_text(json.dumps(counts))
    return counts


def ensure_sft_default_data(render):
    out = default_data_dir("bytes").parent / "sft-stdlib"
    if not (out / "meta.json").exists():
        print("building the default SFT data (standard library functions with docstrings) into "
              f"{out} (or waiting for another process that is) ...", flush=True)
        c = publish_folder(out, lambda tmp: build_default_data(stdlib_documents(), tmp, render),
                           if_missing=True)
        if c:
            print(f"  {c['functions']} functions with a docstring; {c['too_long']} skipped as "
                  f"longer than {DEFAULT_MAX_BYTES} bytes rendered; kept {c['train']} train, "
                  f"{c['val']} held-out", flush=True)
    return out / "train.jsonl", out / "val.jsonl"

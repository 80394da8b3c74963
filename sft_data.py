"""sft_data.py: the embedded default fine-tuning data, built from the Python standard library.

The idea: every function with a docstring (and a body beyond it) in the standard library's own
source becomes one instruction example, "Write a Python function `name(args)` that: <docstring's
first paragraph>" -> its source without the docstring, dedented. Whole modules are held out (crc32
of the module path % SFT_VAL_EVERY == 0), so no held-out function shares a module with a trained
one. Only examples whose rendering (sft.py's template, byte tokenizer) fits the tiny preset's
context are kept; the others are counted, not truncated.

It is built once into the data cache (data.publish_folder: one process builds, the others wait), as
train.jsonl, val.jsonl and meta.json (the counts). `python sft.py` with no --data builds and uses
it.
"""
import ast
import json
import os
import textwrap
import zlib
from pathlib import Path

from data import default_data_dir, publish_folder, stdlib_documents


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
    (`render`: an Alpaca-style dict -> its token ids with the byte tokenizer; sft.py's template)
    fits in max_bytes; the rest are counted, not truncated. meta.json, written last, holds the
    counts."""
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

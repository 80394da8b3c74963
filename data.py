"""data.py: text -> token shards on disk -> deterministic, disjoint, resumable batches for every rank.

The idea: tokenise the corpus once, ahead of training, into flat arrays of token ids on disk (np.memmap, uint16
when the vocabulary fits in 16 bits, else uint32), one end-of-text token after each document. Training never
touches text again: it reads windows of T+1 tokens straight from the memmap (inputs are the first T, targets the
last T). An epoch is a permutation of all windows, seeded by (seed, epoch); optimizer step s uses windows
[s*B, (s+1)*B) of it, and data-parallel rank r takes its own contiguous slice of those B. So the batches are a
pure function of (seed, step): ranks never overlap, and the data position in a checkpoint is one integer.

Disk: 2 bytes per token for vocabularies below 65536. The embedded default corpus (the Python standard
library's own source, tests left out: about 12 MB of real code on every machine that has Python) is prepared
on first use into a cache folder.

Tokenisers come from tiktoken. Named encodings (gpt2, cl100k_base, ...) are downloaded by tiktoken on first
use and cached; with no network they cannot load. The default `bytes` is a tiktoken Encoding built here with
one token per byte and no merges (vocabulary 256 + end-of-text): it needs no download, and on source code a
small model learns it quickly.

Instruction examples for fine-tuning (templates, loss masks, their batches) are sft.py's.

Use:
    python data.py prepare --src PATH --out DIR [--tokenizer NAME]   # a text file, a folder, or JSONL {"text"}
    python data.py stats DIR                                           # what meta.json says
"""
import argparse
import json
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import tiktoken
import torch

EOT = "<|endoftext|>"
TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".toml", ".cfg", ".ini", ".html", ".css", ".js"}
DEFAULT_TOKENIZER = "bytes"
VAL_EVERY = 50            # one document in VAL_EVERY (by a hash of its name) goes to the validation split
SHARD_TOKENS = 100_000_000


class DataError(ValueError):
    """Bad data input: the message is the one line the user sees."""


# ---------------------------------------------------------------------------------------------- tokenisers
def get_tokenizer(name):
    if name == "bytes":
        ranks = {bytes([i]): i for i in range(256)}
        return tiktoken.Encoding("bytes", pat_str=r"[\s\S]+", mergeable_ranks=ranks, special_tokens={EOT: 256})
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # unknown name, or no network to download the BPE file
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise DataError(f"--tokenizer {name!r} could not be loaded ({reason}); use --tokenizer bytes (works offline), "
                        f"or one of {', '.join(tiktoken.list_encoding_names())} with network access or a "
                        "TIKTOKEN_CACHE_DIR that holds it") from None


def eot_id(enc):
    return enc.encode(EOT, allowed_special={EOT})[0]


# ---------------------------------------------------------------------------------------------- preparing
def stdlib_documents():
    """The standard library's .py files, leaving out its test suites (they are large and repetitive)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.isdisjoint(rel.parts):
            yield str(rel), path.read_text(encoding="utf-8", errors="replace")


def source_documents(src):
    """(name, text) for a text file, a JSONL file with a "text" field per line, or a folder of text files."""
    src = Path(src)
    if not src.exists():
        raise DataError(f"--src {src}: no such file or folder")
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | {".jsonl"})
        if not files:
            raise DataError(f"--src {src}: folder holds no text files ({', '.join(sorted(TEXT_SUFFIXES))}, .jsonl)")
    else:
        files = [src]
    for path in files:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DataError(f"{path}:{lineno}: expected a JSON object with a \"text\" field") from None
                    yield f"{path.name}:{lineno}", text
        else:
            yield str(path.relative_to(src) if src.is_dir() else path.name), path.read_text("utf-8", "replace")


def write_split(tokens_iter, out, split, dtype):
    """Stream token arrays into shards of at most SHARD_TOKENS tokens: {split}_000.bin, {split}_001.bin, ..."""
    shard, buf, n, names = 0, [], 0, []

    def flush():
        nonlocal shard, buf, n
        if not buf:
            return
        arr = np.concatenate(buf).astype(dtype)
        name = f"{split}_{shard:03d}.bin"
        mm = np.memmap(out / name, dtype=dtype, mode="w+", shape=arr.shape)
        mm[:] = arr
        mm.flush()
        names.append(name)
        shard, buf, n = shard + 1, [], 0

    total = 0
    for toks in tokens_iter:
        buf.append(toks)
        n += len(toks)
        total += len(toks)
        if n >= SHARD_TOKENS:
            flush()
    flush()
    return names, total


def prepare(docs, out, tokenizer=DEFAULT_TOKENIZER, source="?"):
    """Tokenise (name, text) documents into train/val shards in `out` and write meta.json last (the marker
    that the folder is complete)."""
    enc = get_tokenizer(tokenizer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if enc.n_vocab <= 2**16 else np.uint32
    eot = eot_id(enc)
    splits = {"train": [], "val": []}
    for name, text in docs:
        split = "val" if zlib.crc32(name.encode()) % VAL_EVERY == 0 else "train"
        splits[split].append(text)
    if not splits["train"] and not splits["val"]:
        raise DataError(f"{source}: no documents found")
    if not splits["val"]:  # a tiny corpus: hold out its last document
        splits["val"].append(splits["train"].pop())
    if not splits["train"]:
        splits["train"].append(splits["val"][0])
    meta = {"tokenizer": tokenizer, "vocab_size": enc.n_vocab, "eot": eot, "dtype": np.dtype(dtype).name,
            "source": str(source), "shards": {}, "tokens": {}, "documents": {}}
    for split, texts in splits.items():
        toks = (np.array(t + [eot], dtype=np.int64) for t in enc.encode_ordinary_batch(texts, num_threads=2))
        meta["shards"][split], meta["tokens"][split] = write_split(toks, out, split, dtype)
        meta["documents"][split] = len(texts)
    (out / "meta.json.tmp").write_text(json.dumps(meta, indent=2))
    os.replace(out / "meta.json.tmp", out / "meta.json")
    return meta


def default_data_dir(tokenizer):
    cache = Path(os.environ.get("LLM_DATA_CACHE", Path.home() / ".cache" / "llm-from-scratch"))
    return cache / f"stdlib-{tokenizer}"


def ensure_default_data(tokenizer):
    """The embedded default: the standard library's source, prepared once per tokenizer into the cache."""
    out = default_data_dir(tokenizer)
    if not (out / "meta.json").exists():
        print(f"preparing the embedded default corpus (Python {sysconfig.get_python_version()} standard library) "
              f"into {out} ...", flush=True)
        prepare(stdlib_documents(), out, tokenizer, source=f"python{sysconfig.get_python_version()}-stdlib")
    return out


def load_meta(data_dir, tokenizer=None):
    """Read and check a prepared folder; a tokenizer that differs from the folder's is an error."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"--data {d}: no such folder (prepare one with: python data.py prepare --src PATH --out {d})")
    if not (d / "meta.json").exists():
        raise DataError(f"--data {d}: no meta.json, so not a prepared data folder (python data.py prepare ...)")
    meta = json.loads((d / "meta.json").read_text())
    if tokenizer is not None and tokenizer != meta["tokenizer"]:
        raise DataError(f"--data {d} was prepared with tokenizer {meta['tokenizer']!r}, not --tokenizer "
                        f"{tokenizer!r}: drop the flag or prepare the data again with it")
    for split in ("train", "val"):
        if meta["tokens"].get(split, 0) == 0:
            raise DataError(f"--data {d}: the {split} split is empty")
    return meta


# ---------------------------------------------------------------------------------------------- batches
class TokenWindows:
    """All windows of T+1 tokens (stride T) of one split, across its shards; windows never cross a shard."""

    def __init__(self, data_dir, split, seq_len):
        meta = json.loads((Path(data_dir) / "meta.json").read_text())
        self.seq_len = seq_len
        self.shards = [np.memmap(Path(data_dir) / n, dtype=meta["dtype"], mode="r") for n in meta["shards"][split]]
        counts = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.n = int(self.starts[-1])
        if self.n == 0:
            raise DataError(f"--data {data_dir}: the {split} split has fewer than --seq-len + 1 = "
                            f"{seq_len + 1} tokens")

    def get(self, indices):
        """(x, y) int64 tensors of shape (len(indices), T) for window numbers `indices`."""
        rows = []
        for i in indices:
            s = int(np.searchsorted(self.starts, i, side="right") - 1)
            off = (int(i) - int(self.starts[s])) * self.seq_len
            rows.append(np.asarray(self.shards[s][off:off + self.seq_len + 1], dtype=np.int64))
        buf = torch.from_numpy(np.stack(rows))
        return buf[:, :-1], buf[:, 1:]


class Batches:
    """Step s of training reads windows perm_epoch[s*B:(s+1)*B] (B = global batch in sequences); rank r of
    `world` takes the r-th contiguous 1/world of them, cut into `micro_steps` micro-batches.

    The whole state is the step counter: batches are a pure function of (seed, step), so resuming restores
    the exact stream, and a checkpoint's `state_dict()` is tiny."""

    def __init__(self, data_dir, seq_len, global_batch, rank=0, world=1, micro_steps=1, seed=0, split="train"):
        self.windows = TokenWindows(data_dir, split, seq_len)
        if global_batch % (world * micro_steps):
            raise DataError(f"--batch-size {global_batch} does not divide into {world} ranks x {micro_steps} "
                            "micro-steps of equal size")
        if global_batch > self.windows.n:
            raise DataError(f"--batch-size {global_batch} is more than the {self.windows.n} windows of "
                            f"{seq_len + 1} tokens in the {split} split")
        self.B, self.rank, self.world, self.micro, self.seed = global_batch, rank, world, micro_steps, seed
        self.steps_per_epoch = self.windows.n // global_batch
        self.step = 0
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch):
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.windows.n)
            self._perm_epoch = epoch
        return self._perm

    def next(self):
        """The micro-batches of this rank for the next optimizer step: a list of `micro_steps` (x, y) pairs."""
        epoch, s = divmod(self.step, self.steps_per_epoch)
        idx = self._permutation(epoch)[s * self.B:(s + 1) * self.B]
        per_rank = self.B // self.world
        mine = idx[self.rank * per_rank:(self.rank + 1) * per_rank]
        self.step += 1
        return [self.windows.get(chunk) for chunk in np.split(mine, self.micro)]

    def state_dict(self):
        return {"step": self.step, "seed": self.seed, "global_batch": self.B, "windows": self.windows.n}

    def load_state_dict(self, sd):
        if (sd["seed"], sd["global_batch"], sd["windows"]) != (self.seed, self.B, self.windows.n):
            raise DataError(f"checkpoint data position (seed {sd['seed']}, batch {sd['global_batch']}, "
                            f"{sd['windows']} windows) does not match this run's (seed {self.seed}, batch {self.B}, "
                            f"{self.windows.n} windows)")
        self.step = sd["step"]


def eval_batches(data_dir, seq_len, global_batch, n_batches, rank=0, world=1):
    """A fixed validation set: the first n_batches*B windows of the val split, in order, split over ranks."""
    windows = TokenWindows(data_dir, "val", seq_len)
    n_batches = max(1, min(n_batches, windows.n // global_batch))
    per_rank = global_batch // world
    out = []
    for b in range(n_batches):
        idx = np.arange(b * global_batch, (b + 1) * global_batch) % windows.n
        out.append(windows.get(idx[rank * per_rank:(rank + 1) * per_rank]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenise a text file, folder or JSONL into train/val shards")
    p.add_argument("--src", help="text file, folder of text files, or JSONL with a 'text' field "
                                 "(default: the Python standard library)")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    s = sub.add_parser("stats", help="print a prepared folder's meta.json")
    s.add_argument("dir")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "prepare":
            docs = source_documents(args.src) if args.src else stdlib_documents()
            meta = prepare(docs, args.out, args.tokenizer, source=args.src or "stdlib")
        else:
            meta = load_meta(args.dir)
    except DataError as e:
        ap.exit(2, f"data.py: error: {e}\n")
    print(json.dumps({k: meta[k] for k in ("tokenizer", "vocab_size", "tokens", "documents", "source")}, indent=1))


if __name__ == "__main__":
    main()

"""data.py: text -> token shards on disk, prepared once for every rank, checked before use.

The idea: tokenise the corpus once, ahead of training, into flat arrays of token ids on disk
(np.memmap, uint16 when the vocabulary fits in 16 bits, else uint32), one end-of-text token after
each document. Training never touches text again: batches.py reads windows of tokens straight from
the memmap, in an order that is a pure function of (seed, step).

Disk: 2 bytes per token for vocabularies below 65536. The embedded default corpus (the Python
standard library's own source, tests left out: about 12 MB of real code on every machine that has
Python) is prepared on first use into a cache folder. Every rank of a first run asks for it at once:
one process prepares it into a private temporary folder while the others wait on a file lock
(fcntl), and it appears by rename, meta.json last, so no process ever reads a half-written or
truncated shard. A folder is checked before training reads it: meta.json's keys and types, the dtype
(uint16/uint32) against each shard's size and the token counts, and the largest token id (recorded
at prepare time) against the vocabulary.

Tokenisers are tiktoken Encodings: named ones (gpt2, cl100k_base, ...) downloaded on first use and
cached; the default `bytes`, built here with one token per byte, no merges (256 + end-of-text), no
download, quickly learned; a model folder's tokenizer.json (byte-level BPE) or Llama 3
tokenizer.model, converted offline by bpe.py.

Instruction examples for fine-tuning (loss masks, their batches, the embedded default built from
the same standard library) are sft_data.py's; their templates are chat.py's.

Use:
    python data.py prepare --src PATH --out DIR [--tokenizer NAME]  # a text file, folder or JSONL
    python data.py stats DIR                                          # what meta.json says
"""
import argparse
import contextlib
import fcntl
import json
import os
import shutil
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import tiktoken

import bpe

EOT = "<|endoftext|>"
TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".toml", ".cfg", ".ini",
                 ".html", ".css", ".js"}
DEFAULT_TOKENIZER = "bytes"
# one document in VAL_EVERY (by a hash of its name) goes to the validation split
VAL_EVERY = 50
SHARD_TOKENS = 100_000_000


class DataError(ValueError):
    """Bad data input: the message is the one line the user sees."""


# --------------------------------------------------------------------------------------- tokenisers
def get_tokenizer(name):
    if name == "bytes":
        ranks = {bytes([i]): i for i in range(256)}
        return tiktoken.Encoding("bytes", pat_str=r"[\s\S]+", mergeable_ranks=ranks,
                                 special_tokens={EOT: 256})
    if Path(name).is_dir() and name not in tiktoken.list_encoding_names():
        try:
            return bpe.load_folder(str(Path(name).resolve()))
        except bpe.TokenizerError as e:
            raise DataError(f"tokenizer {e}") from None
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # unknown name, or no network to download the BPE file
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise DataError(f"--tokenizer {name!r} could not be loaded ({reason}); use --tokenizer "
                        "bytes (works offline), one of "
                        f"{', '.join(tiktoken.list_encoding_names())} with network access or a "
                        "TIKTOKEN_CACHE_DIR that holds it, or a folder with a "
                        "tokenizer.json") from None


def eot_id(enc):
    if isinstance(enc, bpe.FolderEncoding):  # a model folder's own eos_token
        return enc.eos_id
    return enc.encode(EOT, allowed_special={EOT})[0]


# ---------------------------------------------------------------------------------------- preparing
def stdlib_documents():
    """The standard library's .py files, leaving out its test suites (large and repetitive)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.isdisjoint(rel.parts):
            yield str(rel), path.read_text(encoding="utf-8", errors="replace")


def text_lines(path):
    """(line number, text) per line of a UTF-8 file; a non-UTF-8 byte is an error at file:line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1} is not UTF-8; save the file as UTF-8") from None


def source_documents(src):
    """(name, text) of a text file, a JSONL file ("text" field per line), or a folder of them."""
    src = Path(src)
    if not src.exists():
        raise DataError(f"--src {src}: no such file or folder")
    if src.is_dir():
        files = sorted(p for p in src.rglob("*")
                       if p.is_file() and p.suffix in TEXT_SUFFIXES | {".jsonl"})
        if not files:
            raise DataError(f"--src {src}: folder holds no text files "
                            f"({', '.join(sorted(TEXT_SUFFIXES))}, .jsonl)")
    else:
        files = [src]
    for path in files:
        if path.suffix == ".jsonl":
            for lineno, line in text_lines(path):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path}:{lineno}: expected a JSON object with a "
                                    "\"text\" field") from None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: \"text\" must be a string")
                yield f"{path.name}:{lineno}", text
        else:
            yield str(path.relative_to(src) if src.is_dir() else path.name), text_of(path)


def text_of(path):
    """A whole text file; a binary one (a NUL byte, or bytes that are not UTF-8) is an error at
    file:line, with the byte and its column."""
    raw = Path(path).read_bytes()
    try:
        if (i := raw.find(b"\0")) >= 0:
            raise UnicodeDecodeError("utf-8", raw, i, i + 1, "NUL")
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = raw.count(b"\n", 0, e.start) + 1, e.start - raw.rfind(b"\n", 0, e.start)
        raise DataError(f"{path}:{line}: byte 0x{raw[e.start]:02x} at column {col} is not text "
                        "(UTF-8 without NUL bytes): give a text file") from None


def write_split(tokens_iter, out, split, dtype):
    """Stream token arrays into shards of at most SHARD_TOKENS tokens: {split}_000.bin,
    {split}_001.bin, ..."""
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


def prepare(docs, out, tokenizer=DEFAULT_TOKENIZER, source="?", if_missing=False):
    """Tokenise (name, text) documents into train/val shards in `out`; meta.json is written last
    (the marker that the folder is complete). Safe when many processes prepare the same folder at
    once (publish_folder); with if_missing, a folder that is already complete is left as it is."""
    enc = get_tokenizer(tokenizer)
    built = publish_folder(out, lambda tmp: _prepare_into(docs, tmp, enc, tokenizer, source),
                           if_missing)
    return built or json.loads((Path(out) / "meta.json").read_text())


def _prepare_into(docs, out, enc, tokenizer, source):
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
    meta = {"tokenizer": tokenizer, "vocab_size": enc.n_vocab, "eot": eot,
            "dtype": np.dtype(dtype).name, "source": str(source), "shards": {}, "tokens": {},
            "documents": {}, "max_id": eot}
    for split, texts in splits.items():
        toks = [np.array(t + [eot], dtype=np.int64)
                for t in enc.encode_ordinary_batch(texts, num_threads=2)]
        # Every id must fit the vocabulary (and the dtype): checked here once, recorded, and checked
        # against the model at the start of every run.
        meta["max_id"] = max(meta["max_id"], max(int(t.max()) for t in toks))
        meta["shards"][split], meta["tokens"][split] = write_split(iter(toks), out, split, dtype)
        meta["documents"][split] = len(texts)
    if meta["max_id"] >= enc.n_vocab:
        raise DataError(f"tokenizer {tokenizer!r} produced id {meta['max_id']}, outside its "
                        f"vocabulary of {enc.n_vocab}")
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


# --------------------------------------------------------------------------------------- publishing
@contextlib.contextmanager
def folder_lock(out):
    """An exclusive lock on folder `out` (fcntl, on a file next to it): other processes wait here.
    The kernel drops it when its holder dies, so a killed preparer never blocks the others."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def publish_folder(out, build, if_missing=False):
    """Build a data folder so that concurrent processes (every rank of a first run, started on an
    empty cache) all see the same complete data: one process builds while the others wait on the
    lock, then find meta.json. `build(tmp)` writes into a private temporary folder next to `out`,
    meta.json last; its files are then moved into `out` with rename, which never truncates a file
    another process has open (it replaces the name, the reader keeps the old inode). meta.json is
    removed first and moved last, so `out` is never a mix that looks complete. Returns build's
    result, or None if `if_missing` and `out` was already complete."""
    out = Path(out)
    if if_missing and (out / "meta.json").exists():
        return None
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file: give a folder for the shards and meta.json")
    with folder_lock(out):
        if if_missing and (out / "meta.json").exists():  # another process built it while we waited
            return None
        # temporary folders left by a killed builder (safe to remove: we hold the lock)
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        tmp.mkdir()
        try:
            result = build(tmp)
            if not out.exists():
                os.rename(tmp, out)  # the whole folder appears at once
                return result
            (out / "meta.json").unlink(missing_ok=True)
            for f in sorted(tmp.iterdir(), key=lambda f: f.name == "meta.json"):
                os.replace(f, out / f.name)
            return result
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def default_data_dir(tokenizer):
    cache = Path(os.environ.get("LLM_DATA_CACHE", Path.home() / ".cache" / "llm-from-scratch"))
    # a tokenizer folder: its name and a hash of its path (two folders may share a name)
    name = (f"{Path(tokenizer).name}-{zlib.crc32(tokenizer.encode()):08x}" if "/" in tokenizer
            else tokenizer)
    return cache / f"stdlib-{name}"


def ensure_default_data(tokenizer):
    """The embedded default: the standard library's source, prepared once per tokenizer (cached)."""
    out = default_data_dir(tokenizer)
    if not (out / "meta.json").exists():
        print(f"preparing the embedded default corpus (Python {sysconfig.get_python_version()} "
              f"standard library) into {out} (or waiting for another process that is) ...",
              flush=True)
        prepare(stdlib_documents(), out, tokenizer,
                source=f"python{sysconfig.get_python_version()}-stdlib", if_missing=True)
    return out


def load_meta(data_dir, tokenizer=None):
    """Read and check a prepared folder; a tokenizer that differs from the folder's is an error."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"--data {d}: no such folder (prepare one with: python data.py prepare "
                        f"--src PATH --out {d})")
    if not (d / "meta.json").exists():
        raise DataError(f"--data {d}: no meta.json, so not a prepared data folder "
                        "(python data.py prepare ...)")
    try:
        meta = json.loads((d / "meta.json").read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{d / 'meta.json'}: not valid JSON ({str(e)[:80]}); "
                        "prepare the folder again") from None
    check_meta(d, meta)
    if tokenizer is not None and tokenizer != meta["tokenizer"]:
        raise DataError(f"--data {d} was prepared with tokenizer {meta['tokenizer']!r}, not "
                        f"--tokenizer {tokenizer!r}: drop the flag or "
                        "prepare the data again with it")
    return meta


META_TYPES = {"tokenizer": str, "vocab_size": int, "eot": int, "dtype": str, "shards": dict,
              "tokens": dict}
# the shard dtypes, and the vocabulary each can hold
DTYPE_VOCAB = {"uint16": 2 ** 16, "uint32": 2 ** 32}


def check_meta(d, meta):
    """Everything the batches will trust: keys and types, the dtype, each shard's size (against the
    dtype and the token count), the largest id (recorded at prepare time) against the vocabulary."""
    where = d / "meta.json"
    if not isinstance(meta, dict):
        raise DataError(f"{where}: expected a JSON object with keys {', '.join(META_TYPES)}")
    for key, kind in META_TYPES.items():
        if key not in meta:
            raise DataError(f"{where}: missing key {key!r}; prepare the folder again "
                            "(python data.py prepare)")
        if not isinstance(meta[key], kind) or (kind is int and isinstance(meta[key], bool)):
            raise DataError(f"{where}: {key!r} must be a {kind.__name__}, got "
                            f"{json.dumps(meta[key])[:40]}")
    if meta["dtype"] not in DTYPE_VOCAB:
        raise DataError(f"{where}: dtype {meta['dtype']!r} is not a shard dtype: uint16 or uint32")
    if not 0 < meta["vocab_size"] <= DTYPE_VOCAB[meta["dtype"]]:
        raise DataError(f"{where}: vocab_size {meta['vocab_size']} does not fit dtype "
                        f"{meta['dtype']}")
    max_id = meta.get("max_id", meta["eot"])
    if not isinstance(max_id, int) or isinstance(max_id, bool):
        raise DataError(f"{where}: 'max_id' must be an int, got {json.dumps(max_id)[:40]}")
    if not 0 <= max(max_id, meta["eot"]) < meta["vocab_size"]:
        raise DataError(f"{where}: token ids up to {max(max_id, meta['eot'])} (max_id, eot) do "
                        f"not fit vocab_size {meta['vocab_size']}: a model of this vocabulary "
                        "would index past its embedding")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        names, count = meta["shards"].get(split), meta["tokens"].get(split)
        listed = isinstance(names, list) and all(isinstance(n, str) for n in names)
        if not listed or not isinstance(count, int):
            raise DataError(f"{where}: shards[{split!r}] must be a list of file names and "
                            f"tokens[{split!r}] a count")
        if count == 0:
            raise DataError(f"--data {d}: the {split} split is empty")
        total = 0
        for name in names:
            f = d / name
            if not f.is_file():
                raise DataError(f"{f}: shard listed in meta.json is missing; "
                                "prepare the folder again")
            size = f.stat().st_size
            if size == 0 or size % itemsize:
                raise DataError(f"{f}: {size} bytes is not a whole number of {meta['dtype']} "
                                f"tokens ({itemsize} bytes each) or is empty: the shard is "
                                "damaged; prepare the folder again")
            total += size // itemsize
        if total != count:
            raise DataError(f"--data {d}: the {split} shards hold {total} {meta['dtype']} "
                            f"tokens, meta.json says {count}: the dtype or a shard is wrong; "
                            "prepare the folder again")
    # a folder from before max_id was recorded: look once (a pass over the shards)
    if "max_id" not in meta:
        seen = max(int(np.memmap(d / n, dtype=meta["dtype"], mode="r").max()) for n in
                   meta["shards"]["train"] + meta["shards"]["val"])
        if seen >= meta["vocab_size"]:
            raise DataError(f"--data {d}: the shards hold id {seen}, outside vocab_size "
                            f"{meta['vocab_size']}")
        meta["max_id"] = max(seen, meta["eot"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare",
                       help="tokenise a text file, folder or JSONL into train/val shards")
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
    print(json.dumps({k: meta[k] for k in ("tokenizer", "vocab_size", "tokens", "documents",
                                           "source")}, indent=1))


if __name__ == "__main__":
    main()

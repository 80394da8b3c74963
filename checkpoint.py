"""checkpoint.py: checkpoints that outlive their layout: resume on any world size, tp, pp, ep, ZeRO.

The idea: describe every saved tensor by what it is, not by who held it (reshard.py). A rank's
tensors are pieces of the full model's parameters: a tensor-parallel box, a pipeline stage's blocks
under their full names, an expert-parallel rank's experts, a ZeRO flat range [a, b). So each rank
writes, for every piece it is the first holder of, the 16-bit weights ("param"), the fp32 master
("master", under mixed precision), AdamW's exp_avg and exp_avg_sq (and its step), each tagged
(name, full shape, box, flat range). A new layout computes the pieces it holds, and copies in the
overlap of every saved piece of the same name, rectangle by rectangle. Files are memory-mapped
(torch.load(mmap=True)): a rank reads the pages of the pieces it needs, not the whole model (and
weights_only=True: no code ever runs).

One step, one folder: out/step_000200/ holds rank{r}.pt per rank and rank 0's meta.json (step, data
position, model config, tokenizer, loss scale, arguments, the layout, each file's size, CRC-32 and
pieces, and the CRC-32 of all that). Every rank writes into step_000200.tmp/; after all have written
(an all-gather of their outcomes, so a rank whose disk is full fails the save on every rank, in one
line), rank 0 writes meta.json, renames the folder into place and then moves the `latest` pointer
(write and rename, atomic on POSIX). A crash anywhere before leaves the previous step whole and
pointed to; stale .tmp folders are removed by the next save; the two newest complete steps are kept,
and a resume that finds the newest damaged (a checksum or size that differs, an edited meta.json, a
file that is not tensors and plain values) falls back to the previous one, on every rank, with a
warning line.

Cost, for Psi parameters under mixed-precision Adam: 2 + 4 + 4 + 4 = 14 bytes per parameter written
in all (fp32 training: 12), each byte by one rank only (replicas write nothing): 14 Psi / N per rank
for N ranks that shard everything. Resuming, a rank reads the checksum of about one file
(14 Psi / N) and the pieces it holds.

Run:
    python checkpoint.py consolidate out/pretrain model.pt  # one whole-model file, for --init
    python checkpoint.py export-hf out/pretrain hf/         # a Hugging Face Llama folder (hf.py)
"""
import json
import os
import pickle
import random
import re
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import reshard

FORMAT = 2  # format 1: one ckpt.rank{r}.pt per rank, readable only by the layout that wrote it
KEEP = 2    # complete steps kept on disk


class CheckpointError(ValueError):
    """A missing, damaged or mismatched checkpoint, or a failed save: the one line the user sees."""


def rng_state():
    """torch's, numpy's and Python's random streams as tensors and plain values, and this rank's own
    CUDA device's only (a resume may see fewer or more GPUs than the save did: each rank's stream
    lives on its own device)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda = torch.cuda.get_rng_state() if on_cuda else None
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(gauss)],
            "python": [version, torch.tensor(internal, dtype=torch.int64), gauss_next]}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((s["python"][0], tuple(s["python"][1].tolist()), s["python"][2]))
    # (saved on CUDA, resumed on CUDA: the current device)
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def safe_load(path, mmap=True):
    """torch.load that runs no code (weights_only=True): a file that pickles anything but tensors
    and plain values (an older version's numpy objects, a file made to run code) is refused in one
    line, never unpickled."""
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds pickled objects other than tensors and plain values "
                              "(an older version's, or not this project's): not loaded, as "
                              "unpickling them could run code") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # (not a file torch.save wrote)
        raise CheckpointError(f"{path} is not a checkpoint file ({type(e).__name__})") from None


# ----------------------------------------------------------------------------- saving one step
def step_dir(out, step):
    return Path(out) / f"step_{step:06d}"


class _Checksummed:
    """A file that sums the CRC-32 and size of what torch.save writes through it (no re-read)."""

    def __init__(self, f):
        self.f, self.crc, self.size = f, 0, 0

    def write(self, b):
        self.crc, self.size = zlib.crc32(b, self.crc), self.size + len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def _all_gather(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _write_text(path, text):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(out, step, model, opt, topo, meta):
    """Write step `step` as a complete folder and point `latest` at it (every rank calls this).
    `meta`: what the trainer needs back (JSON: step, data position, config, tokenizer, args and
    layout)."""
    out, rank = Path(out), topo.rank
    tmp = out / f"step_{step:06d}.tmp"
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
            tmp.mkdir(parents=True)
        except OSError as e:
            error = f"{tmp}: {e.strerror or e}"
    # (also the barrier: the folder exists before anyone writes into it)
    if _all_gather(error)[0] is None:
        records, tensors = [], []
        for piece in reshard.held_pieces(model, opt, topo):
            if piece["writer"]:
                kinds = {}
                for kind, t in piece["tensors"].items():
                    kinds[kind] = len(tensors)
                    # a copy: a view would save its whole storage
                    tensors.append(t.detach().to("cpu", copy=True))
                records.append({k: piece[k] for k in ("name", "shape", "box", "flat",
                                                      "adam_step")} | {"kinds": kinds})
        path = tmp / f"rank{rank}.pt"
        try:
            with open(path, "wb") as f:
                w = _Checksummed(f)
                torch.save({"tensors": tensors, "rng": rng_state()}, w)
                f.flush()
                os.fsync(f.fileno())
            mine = {"file": path.name, "size": w.size, "crc32": w.crc, "pieces": records}
        except OSError as e:
            mine = {"error": f"{path}: {e.strerror or e}"}
    else:
        mine = {"error": error}
    files = _all_gather(mine)
    failed = [f["error"] for f in files if "error" in f]
    if rank == 0 and not failed:
        try:
            write_meta(tmp, dict(meta, format=FORMAT, step=step, scaler=opt.scaler.state_dict(),
                                 files=files))
            final = step_dir(out, step)
            # a step of an abandoned history (a resume from an earlier step): replaced
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_text(out / "latest", final.name + "\n")
            _prune(out, step)
        except OSError as e:
            failed.append(f"{e.filename or out}: {e.strerror or e}")
    failed = _all_gather(failed)[0]
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        last = latest_step(out)
        raise CheckpointError(f"could not save step {step}: {failed[0]}; "
                              + (f"the last complete checkpoint, {last}, is kept" if last
                                 else "no checkpoint kept"))


def _prune(out, latest):
    """Keep the KEEP newest complete steps up to `latest`; remove older ones, later ones (an
    abandoned history) and stale temporary folders."""
    kept = 0
    for d in sorted(out.glob("step_*"), key=_step_of, reverse=True):
        if re.fullmatch(r"step_\d+", d.name) and _step_of(d) <= latest and kept < KEEP:
            kept += 1
            continue
        shutil.rmtree(d, ignore_errors=True)


# -------------------------------------------------------------------------- finding a complete step
def latest_step(out):
    """The step folder `latest` points to (None without one)."""
    p = Path(out) / "latest"
    name = p.read_text().strip() if p.is_file() else ""
    return Path(out) / name if re.fullmatch(r"step_\d+", name) else None


# (the text meta.json's CRC-32 is of: sorted keys, after a round trip, as a reader sees it)
def _canonical(meta):
    return json.dumps(json.loads(json.dumps(meta, default=str)), sort_keys=True)


def write_meta(d, meta):
    """d/meta.json with "meta_crc32", the CRC-32 of the rest: a hand edit or a garbled write is
    damage, not a change."""
    text = _canonical(meta)
    _write_text(Path(d) / "meta.json",
                json.dumps(json.loads(text) | {"meta_crc32": zlib.crc32(text.encode())}))


def read_meta(d):
    p = Path(d) / "meta.json"
    try:
        meta = json.loads(p.read_text())
        assert (isinstance(meta, dict) and meta.get("format") == FORMAT
                and isinstance(meta.get("files"), list))
    except (OSError, ValueError, AssertionError):
        raise CheckpointError(f"{p}: missing or not a checkpoint index "
                              f"of format {FORMAT}") from None
    if (crc := meta.pop("meta_crc32", None)) != zlib.crc32(_canonical(meta).encode()):
        raise CheckpointError(f"{p} " + ("has no CRC-32 of its own (an older version's)"
                                         if crc is None else
                                         "is damaged or was edited (its CRC-32 differs from the "
                                         "one written)"))
    if re.fullmatch(r"step_\d+", Path(d).name) and meta.get("step") != _step_of(d):
        raise CheckpointError(f"{p} says step {meta.get('step')}, its folder {Path(d).name}")
    return meta


def complete_steps(path):
    """The complete step folders under `path`, newest first (or `path` itself if it is one): a step
    folder renamed into place with its meta.json, at or before the step `latest` points to."""
    path = Path(path)
    if (path / "meta.json").exists():
        return [path]
    last = latest_step(path)
    steps = [d for d in path.glob("step_*") if re.fullmatch(r"step_\d+", d.name)
             and (d / "meta.json").is_file()]
    return sorted((d for d in steps if last is None or _step_of(d) <= _step_of(last)),
                  key=_step_of, reverse=True)


def _step_of(d):
    m = re.match(r"step_(\d+)", Path(d).name)
    return int(m.group(1)) if m else -1


def damage(d, files, crc=True):
    """The first problem of step folder d's listed files (missing, resized; with crc: CRC-32,
    safe_load), or None."""
    for f in files:
        p = Path(d) / f["file"]
        if not p.is_file() or p.stat().st_size != f["size"]:
            return (f"{p} is missing" if not p.is_file()
                    else f"{p} is truncated ({f['size']} bytes were written)")
        value = 0
        with open(p, "rb") as fh:
            while crc and (chunk := fh.read(1 << 24)):
                value = zlib.crc32(chunk, value)
        if crc and value != f["crc32"]:
            return f"{p} is damaged (its CRC-32 differs from the one written)"
        try:
            crc and safe_load(p)  # (its pickle only: the tensors are memory-mapped, not read)
        except CheckpointError as e:
            return str(e)
    return None


def find(path, crc=False):
    """The newest complete step under `path` whose files are whole (their sizes; with crc, their
    CRC-32s too, which reads them): (folder, meta, why each newer step was passed over), or
    (None, None, why)."""
    skipped = []
    for d in complete_steps(path):
        try:
            meta = read_meta(d)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        if problem := damage(d, meta["files"], crc):
            skipped.append(problem)
            continue
        return d, meta, skipped
    return None, None, skipped


# -------------------------------------------------------------------------- loading onto any layout
def _adam_state(optimizer, key):
    """AdamW's state for `key`, created (zeros, step 0) if the optimizer has not stepped yet."""
    state = optimizer.state[key]
    if not state:
        on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
        # the step's dtype, as torch makes it
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        state["step"] = torch.zeros((), dtype=scalar, device=key.device if on_device else "cpu")
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(key), torch.zeros_like(key)
    return state


def load(path, model, opt, topo):
    """Resume from the newest complete, undamaged step under `path` onto this layout (every rank
    calls it): each rank checks the checksums of about 1/world of the files, then reads the pieces
    it holds. A damaged step falls back to the previous complete one (with a warning line). Returns
    the step's meta.json."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    problems = []
    for d in complete_steps(path):
        try:
            meta = read_meta(d)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        found = [p for p in _all_gather(damage(d, meta["files"][topo.rank::world])) if p]
        if not found:
            _load_step(d, meta, model, opt, topo)
            if problems and topo.rank == 0:
                print(f"warning: resuming from step {meta['step']} ({d}), the newest undamaged "
                      f"one: {problems[0]}", file=sys.stderr, flush=True)
            return meta
        problems.append(found[0])
    raise CheckpointError(f"no complete undamaged checkpoint in {path}"
                          + (f": {problems[0]}" if problems else "")
                          + ": give --fresh to start over (the folder is moved aside)")


def _load_step(d, meta, model, opt, topo):
    by_name, opened = {}, {}
    for f in meta["files"]:
        for r in f["pieces"]:
            by_name.setdefault(r["name"], []).append((f["file"], r))

    def tensor(file, i):
        # memory-mapped: only the pages of the pieces read here are read from disk
        if file not in opened:
            opened[file] = safe_load(d / file)
        return opened[file]["tensors"][i]

    fallback = {"param": ("param", "master"), "master": ("master", "param")}
    with torch.no_grad():
        for piece in reshard.held_pieces(model, opt, topo):
            saved = by_name.get(piece["name"], [])
            if piece["key"] is not None and any("exp_avg" in r["kinds"] for _, r in saved):
                state = _adam_state(opt.optimizer, piece["key"])
                piece["tensors"].update(exp_avg=state["exp_avg"].view(-1),
                                        exp_avg_sq=state["exp_avg_sq"].view(-1))
                state["step"].fill_(next(r["adam_step"] for _, r in saved
                                         if r["adam_step"] is not None))
            mine = reshard.rects(piece["box"], piece["flat"])
            for kind, dst in piece["tensors"].items():
                src_kind = next((k for k in fallback.get(kind, (kind,))
                                 if any(k in r["kinds"] for _, r in saved)), None)
                if src_kind is None and kind.startswith("exp_avg"):
                    # saved before the optimizer's first step: it starts from zeros, as then
                    continue
                n = sum(reshard.copy_overlap(dst, mine, tensor(f, r["kinds"][src_kind]),
                                             reshard.rects(r["box"], r["flat"]))
                        for f, r in saved if src_kind in r["kinds"])
                if n != dst.numel():
                    raise CheckpointError(f"{d}: {kind} of {piece['name']}: the checkpoint's "
                                          f"pieces cover {n} values of the {dst.numel()} this "
                                          "rank holds (missing, or saved twice)")
    opt.scaler.load_state_dict(meta["scaler"])
    opt.after_load()
    rank_file = d / f"rank{topo.rank}.pt"
    set_rng_state(safe_load(rank_file if rank_file.exists() else d / "rank0.pt")["rng"])


# ----------------------------------------------------------------------------- start or resume
# Which settings make a run the same run: a checkpoint of another model, data, tokenizer or schedule
# is not resumed silently; the layout (world size, --tp, --pp, --ep, --zero, micro-batching) may
# change freely.
REASONS = {"batch_size": "the data position and the schedule count steps of this many sequences",
           "seq_len": "the data position counts windows of this many tokens"}


def find_resume(out, resume=False, fresh=False, rank=0):
    """Start or resume, decided before any process group exists: (the newest complete step folder in
    `out`, its meta.json) to resume from, or None to start fresh. --resume: a checkpoint must be
    there. --fresh: rank 0 moves the old run aside first (the other ranks never look at it)."""
    if fresh:
        if rank == 0 and Path(out).exists():
            print(f"--fresh: the previous run in {out} moved to {move_aside(out)}", flush=True)
        return None
    d, meta, skipped = find(out)
    if d is None and not skipped and any(Path(out).glob("ckpt*.pt")):
        skipped = [f"{next(Path(out).glob('ckpt*.pt'))} is of format 1, readable only by an "
                   "older version"]
    if d is None and (resume or skipped):
        raise CheckpointError(f"{'--resume: ' if resume else ''}no complete checkpoint in {out}"
                              + (f" ({skipped[0]})" if skipped else "")
                              + ("" if resume else
                                 ": give --fresh to start over (the folder is moved aside)"))
    return (d, meta) if d is not None else None


def check_same_run(out, meta, identity):
    """The settings in `identity` must be the saved run's (model, data, tokenizer, schedule, ...):
    one line naming every one that differs, so that a single rerun can fix them all."""
    saved, diffs = meta.get("identity", {}), []
    for key, now in identity.items():
        was = saved.get(key)
        if was == now:
            continue
        # the model config: name each field that differs
        if isinstance(now, dict) and isinstance(was, dict):
            diffs += [f"{key.replace('_', ' ')} {k} {was.get(k)}, not {now.get(k)}"
                      for k in sorted(set(now) | set(was)) if now.get(k) != was.get(k)]
        else:
            diffs.append(f"--{key.replace('_', '-')} {was}, not {now}"
                         + (f" ({REASONS[key]})" if key in REASONS else ""))
    if diffs:
        raise CheckpointError(f"{out} holds another run ({'; '.join(diffs)}): resume with the "
                              "same settings, or give --fresh (the old run is moved aside) or "
                              "another --out")


def move_aside(out):
    """--fresh: the old run's folder becomes OUT.1 (or .2, ...): nothing is overwritten."""
    out = Path(out)
    if out.exists():
        n = 1
        while Path(f"{out}.{n}").exists():
            n += 1
        os.replace(out, f"{out}.{n}")
        return Path(f"{out}.{n}")


def truncate_metrics(path, step):
    """metrics.jsonl keeps one history: the records past the resumed step are dropped, and so is a
    last line cut short by a kill. Returns the elapsed seconds of the last record kept (0 without
    one), where the run's clock goes on."""
    path, keep, elapsed = Path(path), [], 0.0
    if path.exists():
        for line in path.read_text().splitlines(keepends=True):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
                elapsed = record.get("elapsed", elapsed)
        _write_text(path, "".join(keep))
    return elapsed


if __name__ == "__main__":
    # (the command line is weights.py's: it imports this file as `checkpoint`, so that there is
    # one CheckpointError class, the one it catches)
    import weights
    weights.main()

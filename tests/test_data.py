import json
import re

import numpy as np
import pytest

import batches
import data


@pytest.fixture
def text_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(60):
        (src / f"doc{i}.txt").write_text(f"document {i}: " + "hello world. " * (20 + i))
    return src


def test_prepare_a_folder_writes_shards_and_meta(text_dir, tmp_path):
    meta = data.prepare(data.source_documents(text_dir), tmp_path / "out", "bytes", source=text_dir)
    assert meta["tokenizer"] == "bytes" and meta["dtype"] == "uint16" and meta["vocab_size"] == 257
    assert (meta["documents"]["train"] + meta["documents"]["val"] == 60
            and meta["documents"]["val"] >= 1)
    train = np.memmap(tmp_path / "out" / meta["shards"]["train"][0], dtype=np.uint16, mode="r")
    assert len(train) == meta["tokens"]["train"]
    # every document ends with end-of-text, and the bytes decode back to the text
    assert (train == meta["eot"]).sum() == meta["documents"]["train"]
    first = bytes(train[:train.tolist().index(meta["eot"])].astype(np.uint8)).decode()
    assert first.startswith("document ")


def test_prepare_jsonl_and_a_single_file(tmp_path):
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"row {i} " * 30}) for i in range(10)) + "\n")
    meta = data.prepare(data.source_documents(jl), tmp_path / "a", "bytes")
    assert meta["documents"]["train"] + meta["documents"]["val"] == 10
    one = tmp_path / "one.txt"
    one.write_text("x = 1\n" * 200)
    meta = data.prepare(data.source_documents(one), tmp_path / "b", "bytes")
    assert meta["tokens"]["train"] > 0 and meta["tokens"]["val"] > 0


def test_malformed_jsonl_names_file_and_line(tmp_path):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{"txt": "no text field"}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: expected a JSON object"):
        list(data.source_documents(jl))


def test_unknown_or_unavailable_tokenizer_says_what_to_use():
    with pytest.raises(data.DataError, match="use --tokenizer bytes"):
        data.get_tokenizer("no-such-encoding")


def test_load_meta_errors(tmp_path, text_dir):
    with pytest.raises(data.DataError, match="no such folder"):
        data.load_meta(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no meta.json"):
        data.load_meta(tmp_path / "empty")
    data.prepare(data.source_documents(text_dir), tmp_path / "p", "bytes")
    with pytest.raises(data.DataError, match="prepared with tokenizer 'bytes', "
                                             "not --tokenizer 'gpt2'"):
        data.load_meta(tmp_path / "p", "gpt2")


def test_ranks_get_disjoint_slices_of_the_same_global_batch(stdlib_data):
    one = batches.Batches(stdlib_data, 32, global_batch=8, seed=3)
    ranks = [batches.Batches(stdlib_data, 32, global_batch=8, rank=r, world=2, n_micro=2, seed=3)
             for r in range(2)]
    for _ in range(3):
        (x, y), = one.next()
        parts = [m for b in ranks for m in b.next()]   # rank 0's two micro-batches, then rank 1's
        assert all(p[0].shape == (2, 32) for p in parts)
        assert np.array_equal(np.concatenate([p[0] for p in parts]), x.numpy())
        assert np.array_equal(np.concatenate([p[1] for p in parts]), y.numpy())
    assert np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())  # targets are inputs shifted by one


def test_batches_resume_exactly_and_differ_by_seed(stdlib_data):
    a = batches.Batches(stdlib_data, 16, global_batch=4, seed=1)
    for _ in range(5):
        a.next()
    state = a.state_dict()
    expected = [a.next()[0][0] for _ in range(3)]
    b = batches.Batches(stdlib_data, 16, global_batch=4, seed=1)
    b.load_state_dict(state)
    assert all(np.array_equal(e, b.next()[0][0]) for e in expected)
    c = batches.Batches(stdlib_data, 16, global_batch=4, seed=2)
    with pytest.raises(data.DataError, match="does not match"):
        c.load_state_dict(state)


def test_epochs_wrap_with_a_new_order(tmp_path, text_dir):
    data.prepare(data.source_documents(text_dir), tmp_path / "p", "bytes")
    b = batches.Batches(tmp_path / "p", 64, global_batch=2, seed=0)
    n = b.steps_per_epoch
    first = [b.next()[0][0] for _ in range(n)]
    second = [b.next()[0][0] for _ in range(n)]
    key = lambda xs: sorted(bytes(x.numpy().astype(np.uint16).tobytes()) for batch in xs
                            for x in batch)
    assert key(first) == key(second)         # the same windows each epoch
    assert any(not np.array_equal(f, s) for f, s in zip(first, second))  # in another order


# ---------------------------------------------------------------------------------- damaged folders
def _edit_meta(**changes):
    def edit(d):
        meta = json.loads((d / "meta.json").read_text())
        meta.update(changes)
        (d / "meta.json").write_text(json.dumps(meta))
    return edit


def _drop(key):
    def edit(d):
        meta = json.loads((d / "meta.json").read_text())
        del meta[key]
        (d / "meta.json").write_text(json.dumps(meta))
    return edit


def _shard(fn):
    def edit(d):
        fn(d / json.loads((d / "meta.json").read_text())["shards"]["train"][0])
    return edit


def _poke_300(f):
    shard = np.memmap(f, dtype=np.uint16, mode="r+")
    shard[5] = 300
    shard.flush()


DAMAGE = {
    "invalid JSON": (lambda d: (d / "meta.json").write_text("{tokenizer: bytes"),
                     "meta.json: not valid JSON"),
    "not an object": (lambda d: (d / "meta.json").write_text("[1, 2]"), "expected a JSON object"),
    "missing key": (_drop("dtype"), "missing key 'dtype'"),
    "wrong type": (_edit_meta(vocab_size="257"), "'vocab_size' must be a int"),
    "uint8": (_edit_meta(dtype="uint8"), "dtype 'uint8' is not a shard dtype: uint16 or uint32"),
    "dtype against sizes": (_edit_meta(dtype="uint32"), "meta.json says"),
    "vocabulary below the ids": (_edit_meta(vocab_size=200), "do not fit vocab_size 200"),
    "missing shard": (_shard(lambda f: f.unlink()), "shard listed in meta.json is missing"),
    "0-byte shard": (_shard(lambda f: f.write_bytes(b"")), "0 bytes is not a whole number"),
    "odd-size shard": (_shard(lambda f: open(f, "ab").write(b"\0")),
                       "is not a whole number of uint16 tokens"),
    "an id past the vocabulary, no max_id": (lambda d: (_drop("max_id")(d), _shard(_poke_300)(d)),
                                             "the shards hold id 300, outside vocab_size 257"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_data_folder_is_one_line_before_any_work(tmp_path, text_dir, case):
    d = tmp_path / "p"
    data.prepare(data.source_documents(text_dir), d, "bytes")
    damage, message = DAMAGE[case]
    damage(d)
    with pytest.raises(data.DataError, match=re.escape(message)) as e:
        data.load_meta(d)
    assert "\n" not in str(e.value)


def test_prepare_into_a_file_is_one_line(tmp_path, text_dir, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--src", str(text_dir), "--out", str(tmp_path / "f")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == (f"data.py: error: --out {tmp_path / 'f'} is a file: "
                                         "give a folder for the shards and meta.json")


def test_prepare_records_the_largest_id(tmp_path, text_dir):
    meta = data.prepare(data.source_documents(text_dir), tmp_path / "p", "bytes")
    shard = np.memmap(tmp_path / "p" / meta["shards"]["train"][0], dtype=np.uint16, mode="r")
    assert meta["max_id"] == max(int(shard.max()), meta["eot"]) == 256


def test_a_binary_file_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "blob.txt").write_bytes(b"text first\nthen\x00\x01\x02")
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--src", str(tmp_path / "blob.txt"), "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == (f"data.py: error: {tmp_path / 'blob.txt'}:2: byte 0x00 "
                                         "at column 5 is not text (UTF-8 without NUL bytes): "
                                         "give a text file\n") and not (tmp_path / "d").exists()


def test_a_byte_that_is_not_utf8_names_file_and_line(tmp_path):
    jl = tmp_path / "docs.jsonl"
    jl.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(data.DataError, match=r"docs.jsonl:2: byte 0xe9 at column 14 is not UTF-8"):
        list(data.source_documents(jl))


# ---------------------------------------------------------------------------------- first-run races
def _first_run(cache, barrier, result_file):
    """One process of a first run: wait for the others, ask for the default data, read all of it."""
    import hashlib
    import os
    os.environ["LLM_DATA_CACHE"] = str(cache)
    barrier.wait()
    d = data.ensure_default_data("bytes")
    meta = data.load_meta(d)
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in meta["shards"]["train"] + meta["shards"]["val"]:
        h.update(np.memmap(d / name, dtype=meta["dtype"], mode="r").tobytes())
    result_file.write_text(h.hexdigest())


def start_together(tmp_path, n):
    """n processes started at once on an empty cache: their exit codes and what each one read."""
    import multiprocessing as mp
    # no CUDA here; fork starts in milliseconds, so the processes truly overlap
    ctx = mp.get_context("fork")
    cache, barrier = tmp_path / "cache", ctx.Barrier(n)
    procs = [ctx.Process(target=_first_run, args=(cache, barrier, tmp_path / f"r{i}"))
             for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return [p.exitcode for p in procs], [(tmp_path / f"r{i}").read_text()
                                         if (tmp_path / f"r{i}").exists() else None
                                         for i in range(n)]


@pytest.mark.parametrize("trial", range(2))
def test_four_processes_on_an_empty_cache_all_see_the_same_data(tmp_path, trial):
    codes, digests = start_together(tmp_path, 4)
    assert codes == [0] * 4 and digests[0] is not None and len(set(digests)) == 1, (codes, digests)
    # no temporary folder left
    assert [p.name for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name] == []


def test_a_killed_preparer_leaves_no_half_folder(tmp_path, monkeypatch):
    """A build that fails half-way leaves nothing that looks prepared; what a killed one left (its
    temporary folder, or an older version's shard without meta.json) is cleaned up or completed by
    the next run."""
    cache = tmp_path / "cache"
    out = cache / "stdlib-bytes"

    def dying(tmp):
        (tmp / "train_000.bin").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        data.publish_folder(out, dying)
    assert not out.exists() and [p.name for p in cache.iterdir()] == [".stdlib-bytes.lock"]
    (cache / ".stdlib-bytes.tmp-999-dead").mkdir()          # as a SIGKILL would leave them
    out.mkdir()
    (out / "train_000.bin").write_bytes(b"\0" * 10)
    monkeypatch.setenv("LLM_DATA_CACHE", str(cache))
    monkeypatch.setattr(data, "stdlib_documents",
                        lambda: [(f"m{i}.py", "x = 1\n" * 50) for i in range(60)])
    assert data.load_meta(data.ensure_default_data("bytes"))["tokens"]["train"] > 0
    assert sorted(p.name for p in cache.iterdir()) == [".stdlib-bytes.lock", "stdlib-bytes"]


if __name__ == "__main__":  # the long form: PYTHONPATH=. python tests/test_data.py TRIALS
    import sys
    import tempfile
    from pathlib import Path
    trials, bad = int(sys.argv[1]) if len(sys.argv) > 1 else 10, 0
    for t in range(trials):
        with tempfile.TemporaryDirectory() as tmp:
            codes, digests = start_together(Path(tmp), 4)
            ok = codes == [0] * 4 and None not in digests and len(set(digests)) == 1
            bad += not ok
            print(f"trial {t + 1}: exit codes {codes}, {len(set(digests))} distinct data digests: "
                  f"{'ok' if ok else 'FAILED'}", flush=True)
    print(f"{trials - bad} of {trials} trials: 4 processes on an empty cache all read the same "
          "complete data")

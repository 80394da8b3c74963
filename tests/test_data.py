import json

import numpy as np
import pytest

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
    assert meta["documents"]["train"] + meta["documents"]["val"] == 60 and meta["documents"]["val"] >= 1
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
    with pytest.raises(data.DataError, match="prepared with tokenizer 'bytes', not --tokenizer 'gpt2'"):
        data.load_meta(tmp_path / "p", "gpt2")


def test_ranks_get_disjoint_slices_of_the_same_global_batch(stdlib_data):
    one = data.Batches(stdlib_data, 32, global_batch=8, seed=3)
    ranks = [data.Batches(stdlib_data, 32, global_batch=8, rank=r, world=2, n_micro=2, seed=3) for r in range(2)]
    for _ in range(3):
        (x, y), = one.next()
        parts = [m for b in ranks for m in b.next()]   # rank 0's two micro-batches, then rank 1's
        assert all(p[0].shape == (2, 32) for p in parts)
        assert np.array_equal(np.concatenate([p[0] for p in parts]), x.numpy())
        assert np.array_equal(np.concatenate([p[1] for p in parts]), y.numpy())
    assert np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())  # targets are inputs shifted by one


def test_batches_resume_exactly_and_differ_by_seed(stdlib_data):
    a = data.Batches(stdlib_data, 16, global_batch=4, seed=1)
    for _ in range(5):
        a.next()
    state = a.state_dict()
    expected = [a.next()[0][0] for _ in range(3)]
    b = data.Batches(stdlib_data, 16, global_batch=4, seed=1)
    b.load_state_dict(state)
    assert all(np.array_equal(e, b.next()[0][0]) for e in expected)
    c = data.Batches(stdlib_data, 16, global_batch=4, seed=2)
    with pytest.raises(data.DataError, match="does not match"):
        c.load_state_dict(state)


def test_epochs_wrap_with_a_new_order(tmp_path, text_dir):
    data.prepare(data.source_documents(text_dir), tmp_path / "p", "bytes")
    b = data.Batches(tmp_path / "p", 64, global_batch=2, seed=0)
    n = b.steps_per_epoch
    first = [b.next()[0][0] for _ in range(n)]
    second = [b.next()[0][0] for _ in range(n)]
    key = lambda xs: sorted(bytes(x.numpy().astype(np.uint16).tobytes()) for batch in xs for x in batch)
    assert key(first) == key(second)         # the same windows each epoch
    assert any(not np.array_equal(f, s) for f, s in zip(first, second))  # in another order

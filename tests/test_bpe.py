"""bpe.py: a Hugging Face tokenizer folder, as a tiktoken Encoding, gives a textbook BPE's ids.

Small tokenizer.json files are written here in four styles (GPT-2, Llama 3, Qwen2, SmolLM), from
merges learned on a small corpus; the reference is written here from the definition: cut out the
added tokens, normalise, pre-tokenise step by step as the pre-tokenizer's list says (not as one
regex), map bytes to GPT-2's characters, then merge the adjacent pair of lowest merge rank until
none is left."""
import base64
import json
import unicodedata
from pathlib import Path

import pytest
import regex

import bpe
import data

GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
          r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
         r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see, won't "
               "we? THE END'S near.",
    "code": "def f(x):\n    return x**2 + 1  # square\n\n\tif a != b:\n\t\tprint(f\"{a!r}\")\n"
            "{'k': [1, 2]}\n",
    "digits": "123 4567 89012345 x  42   7\n  8 3.14159 1,000,000 x2y 2024-01-31 ²½ ٣٤٥ 𝟙𝟚",
    "unicode": "naïve café Straße 日本語のテキスト Ελληνικά русский текст e\u0301 A\u030a Å ﬁ "
               "中文测试：你好，世界！ 한국어 العربية हिन्दी ไทย Tiếng Việt",
    "emoji": "👍🏽 🇫🇷 👨‍👩‍👧 🙂🙂 ok👍",
    "whitespace": "a  b   c\n\n\n  d\t\t e \r\n f     \n    \u00a0 \u3000x  ",
}
CORPUS = "\n".join(list(TEXTS.values()) * 3) + Path(bpe.__file__).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------ the reference
def split_isolated(piece, pattern):
    """Matches of `pattern` and the text between, in order (a Split pre-tokenizer, Isolated)."""
    out, at = [], 0
    for m in regex.finditer(pattern, piece):
        if m.start() == m.end():
            continue
        out += [piece[at:m.start()]] if m.start() > at else []
        out.append(m.group())
        at = m.end()
    return out + ([piece[at:]] if at < len(piece) else [])


def pre_tokenize(step, pieces):
    kind = step["type"]
    if kind == "ByteLevel":
        return [w for p in pieces
                for w in (regex.findall(GPT2, p) if step.get("use_regex", True) else [p])]
    if kind == "Split":
        return [w for p in pieces for w in split_isolated(p, step["pattern"]["Regex"])]
    if kind == "Digits":
        return [w for p in pieces
                for w in split_isolated(p, r"\p{N}" if step["individual_digits"] else r"\p{N}+")]
    raise AssertionError(kind)


def reference_bpe(word, merge_rank, vocab, ignore_merges):
    """Merge the adjacent pair of lowest rank (leftmost first) until no pair has a merge."""
    if ignore_merges and word in vocab:
        return [vocab[word]]
    parts = list(word)
    while True:
        ranked = [(merge_rank[pair], i) for i, pair in enumerate(zip(parts, parts[1:]))
                  if pair in merge_rank]
        if not ranked:
            return [vocab[p] for p in parts]
        _, i = min(ranked)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def reference_ids(tj, text):
    model, b2u = tj["model"], bpe.bytes_to_unicode()
    merge_rank = {}
    for r, m in enumerate(model["merges"]):
        merge_rank.setdefault(tuple(m.split(" ", 1)), r)
    added = {t["content"]: t["id"] for t in tj["added_tokens"]}
    steps = (tj["pre_tokenizer"]["pretokenizers"] if tj["pre_tokenizer"]["type"] == "Sequence"
             else [tj["pre_tokenizer"]])
    ids = []
    cut = "(" + "|".join(regex.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    for i, segment in enumerate(regex.split(cut, text) if added else [text]):
        if i % 2 and added:
            ids.append(added[segment])
            continue
        if tj.get("normalizer"):
            segment = unicodedata.normalize("NFC", segment)
        pieces = [segment] if segment else []
        for step in steps:
            pieces = pre_tokenize(step, pieces)
        for p in pieces:
            ids += reference_bpe("".join(b2u[b] for b in p.encode()), merge_rank, model["vocab"],
                                 model.get("ignore_merges", False))
    return ids


# ------------------------------------------------------------------------------------- the fixtures
MERGES = bpe.learn_merges(CORPUS, 400)


def with_specials(tj, specials):
    n = len(tj["model"]["vocab"])
    tj["added_tokens"] = [{"id": n + i, "content": t, "special": True}
                          for i, t in enumerate(specials)]
    return tj


def gpt2_style():
    return bpe.gpt2_style_json(MERGES, added=("<|endoftext|>",))


def every_split(vocab):
    """Llama 3's merge list: for each token, in id order, every way to cut it into two tokens."""
    merges = []
    for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        cuts = [(token[:k], token[k:]) for k in range(1, len(token))]
        merges += sorted((f"{a} {b}" for a, b in cuts
                          if vocab.get(a, i) < i and vocab.get(b, i) < i),
                         key=lambda m: [vocab[x] for x in m.split(" ")])
    return merges


def llama3_style():
    tj = gpt2_style()
    tj["model"].update(merges=every_split(tj["model"]["vocab"]), ignore_merges=True)
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    return with_specials(tj, bpe.LLAMA3_SPECIALS)


def qwen2_style():
    tj = gpt2_style()
    tj["normalizer"] = {"type": "NFC"}
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
         "use_regex": False}]}
    return with_specials(tj, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])


def smollm_style():
    """Special tokens first (ids 0..2), the byte alphabet in character order, a token per merge."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for c in sorted(bpe.bytes_to_unicode().values()):
        vocab[c] = len(vocab)
    for a, b in MERGES:
        vocab.setdefault(a + b, len(vocab))
    return {"added_tokens": [{"id": i, "content": t, "special": True}
                             for i, t in enumerate(specials)],
            "normalizer": None, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": True}]},
            "model": {"type": "BPE", "dropout": None, "vocab": vocab,
                      "merges": [f"{a} {b}" for a, b in MERGES]}}


def letters_split_style():
    """A Split regex that leaves text between its matches (kept as pieces, as the library does)."""
    tj = gpt2_style()
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r" ?\p{L}+"}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    return tj


def contiguous_digits_style():
    tj = smollm_style()
    tj["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] = False
    return tj


STYLES = {"gpt2": gpt2_style, "llama3": llama3_style, "qwen2": qwen2_style, "smollm": smollm_style,
          "split-gaps": letters_split_style, "digit-runs": contiguous_digits_style}


def write_folder(folder, tj, **files):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    for name, obj in files.items():
        (folder / f"{name}.json").write_text(json.dumps(obj), encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("style", STYLES)
def test_ids_equal_the_textbook_merge_loop(tmp_path, style):
    tj = STYLES[style]()
    enc = data.get_tokenizer(str(write_folder(tmp_path / style, tj)))
    specials = "".join(t["content"] for t in tj["added_tokens"][:3])
    texts = {**TEXTS, "specials": f"{specials}user\nhi{specials[::-1]}{specials}",
             "all": "\n".join(TEXTS.values())}
    for name, text in texts.items():
        ids = enc.encode(text, allowed_special="all")
        assert ids == reference_ids(tj, text), (style, name)
        assert enc.decode(ids) == (unicodedata.normalize("NFC", text) if tj.get("normalizer")
                                   else text)
    # Merges really happen (not one token per byte), on every kind of text.
    assert all(len(enc.encode_ordinary(t)) < len(t.encode()) for t in TEXTS.values())


def test_ignore_merges_takes_a_whole_piece_that_is_a_token(tmp_path):
    """Llama 3's ignore_merges: a piece that is in the vocabulary is that token, even one that no
    merge makes; without it, such a token is never produced."""
    tj = llama3_style()
    n = len(tj["model"]["vocab"])
    tj["model"]["vocab"]["Ġzzzz"] = n  # after the merges were listed: none makes it
    tj = with_specials(tj, bpe.LLAMA3_SPECIALS)
    text = "a zzzz b zzzzz zzzz"
    ids = data.get_tokenizer(str(write_folder(tmp_path / "a", tj))).encode_ordinary(text)
    assert ids == reference_ids(tj, text) and ids.count(n) == 2
    tj["model"]["ignore_merges"] = False
    ids = data.get_tokenizer(str(write_folder(tmp_path / "b", tj))).encode_ordinary(text)
    assert ids == reference_ids(tj, text) and n not in ids


def test_the_reference_can_tell_them_apart(tmp_path):
    """The comparison above can fail: the same vocabulary with the pre-tokenizer's list taken as
    GPT-2's alone (Digits left out) gives other ids on digits, and merge ranks shuffled give other
    ids on English."""
    tj = smollm_style()
    enc = data.get_tokenizer(str(write_folder(tmp_path / "s", tj)))
    tj["pre_tokenizer"] = tj["pre_tokenizer"]["pretokenizers"][1]
    assert enc.encode_ordinary(TEXTS["digits"]) != reference_ids(tj, TEXTS["digits"])
    tj = gpt2_style()
    enc = data.get_tokenizer(str(write_folder(tmp_path / "g", tj)))
    tj["model"]["merges"] = tj["model"]["merges"][::-1]
    assert enc.encode_ordinary(TEXTS["english"]) != reference_ids(tj, TEXTS["english"])


def test_llama3_tiktoken_model_file(tmp_path):
    """Llama 3's tokenizer.model ("base64 rank" lines) gives the ids of the same vocabulary's
    tokenizer.json, and Llama 3's special tokens after the vocabulary."""
    tj = llama3_style()
    (tmp_path / "tokenizer.model").write_text("".join(
        f"{base64.b64encode(bpe.token_bytes(t, '-')).decode()} {i}\n"
        for t, i in tj["model"]["vocab"].items()))
    enc = data.get_tokenizer(str(tmp_path))
    n = len(tj["model"]["vocab"])
    text = "<|begin_of_text|>" + "\n".join(TEXTS.values()) + "<|eot_id|>"
    assert enc.encode(text, allowed_special="all") == reference_ids(tj, text)
    assert enc.encode_single_token("<|eot_id|>") == n + 9 and enc.n_vocab == n + 256
    assert data.eot_id(enc) == n + 1  # <|end_of_text|>: no tokenizer_config.json says otherwise


def test_end_of_sequence_comes_from_the_folder(tmp_path):
    tj = qwen2_style()
    im_end = next(t["id"] for t in tj["added_tokens"] if t["content"] == "<|im_end|>")
    enc = data.get_tokenizer(str(write_folder(tmp_path / "a", tj,
                                              tokenizer_config={"eos_token": "<|im_end|>"})))
    assert data.eot_id(enc) == im_end
    enc = data.get_tokenizer(str(write_folder(tmp_path / "b", tj, tokenizer_config={
        "eos_token": {"content": "<|im_end|>", "special": True}})))
    assert data.eot_id(enc) == im_end
    enc = data.get_tokenizer(str(write_folder(tmp_path / "c", tj,
                                              generation_config={"eos_token_id": [im_end, 0]})))
    assert data.eot_id(enc) == im_end and enc.stop_ids == {im_end, 0}
    enc = data.get_tokenizer(str(write_folder(tmp_path / "d", tj)))
    assert data.eot_id(enc) == enc.encode_single_token("<|endoftext|>")


def refusal(tmp_path, tj=None, model=None, **files):
    folder = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
    if tj is not None:
        write_folder(folder, tj, **files)
    folder.mkdir(exist_ok=True)
    if model is not None:
        (folder / "tokenizer.model").write_bytes(model)
    with pytest.raises(data.DataError) as e:
        data.get_tokenizer(str(folder))
    assert "\n" not in str(e.value) and str(folder) in str(e.value)
    return str(e.value)


def edit(tj, path, value):
    *keys, last = path.split(".")
    d = tj
    for k in keys:
        d = d[k]
    d[last] = value
    return tj


@pytest.mark.parametrize("change, said", [
    (("model.type", "Unigram"), "model type Unigram is not read"),
    (("model.type", "WordPiece"), "model type WordPiece is not read"),
    (("model.byte_fallback", True), "BPE with byte_fallback True is not read"),
    (("normalizer", {"type": "Lowercase"}), "normalizer Lowercase is not read"),
    (("pre_tokenizer", {"type": "Metaspace", "replacement": "▁"}), "does not end in ByteLevel"),
    (("pre_tokenizer", None), "does not end in ByteLevel"),
    (("pre_tokenizer.add_prefix_space", True), "add_prefix_space true is not read"),
    (("pre_tokenizer", {"type": "Sequence",
                        "pretokenizers": [{"type": "WhitespaceSplit"}, {"type": "ByteLevel"}]}),
     "pre_tokenizer sequence ['WhitespaceSplit', 'ByteLevel'] is not read"),
])
def test_unsupported_tokenizer_json_is_one_line(tmp_path, change, said):
    assert said in refusal(tmp_path, edit(gpt2_style(), *change))


def test_other_refusals_are_one_line(tmp_path):
    tj = gpt2_style()  # SentencePiece-style tokens (no byte alphabet): not byte-level
    tj["model"]["vocab"] = {"▁the": 0, "<unk>": 1}
    assert "lacks byte token" in refusal(tmp_path, tj)
    tj = gpt2_style()  # ids against the merge order: tiktoken's ranks are ids
    vocab = tj["model"]["vocab"]
    a, b = (x.replace(" ", "") for x in tj["model"]["merges"][:2])
    vocab[a], vocab[b] = vocab[b], vocab[a]
    assert "ids must follow the merge order" in refusal(tmp_path, tj)
    protobuf = (b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02"
                b"\n\x0b\n\x03<s>\x15\x00\x00\x00\x00\x18\x03")
    assert "SentencePiece model" in refusal(tmp_path, model=protobuf)
    assert "no tokenizer.json or tokenizer.model" in refusal(tmp_path)
    tj = edit(gpt2_style(), "added_tokens", [])
    assert "no end-of-sequence token" in refusal(tmp_path, tj,
                                                 tokenizer_config={"eos_token": "</s>"})


def test_a_tokenizer_folder_gets_its_own_data_cache(tmp_path):
    a, b = (data.default_data_dir(str(tmp_path / "x" / "tok")),
            data.default_data_dir(str(tmp_path / "y" / "tok")))
    assert (a != b and a.parent == b.parent == data.default_data_dir("bytes").parent
            and a.name.startswith("stdlib-tok-"))

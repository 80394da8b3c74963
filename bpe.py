"""bpe.py: a pretrained model's Hugging Face tokenizer folder, read offline as a tiktoken Encoding.

The idea: byte-level BPE (GPT-2, Radford et al. 2019; Sennrich et al. 2016 for BPE on words) cuts
text in three steps. (1) A regex splits it into pieces ("pre-tokens": words with their leading
space, numbers, punctuation runs, whitespace runs), so that no token ever spans two of them.
(2) Each piece becomes its UTF-8 bytes. (3) Starting from one token per byte, the adjacent pair
whose merge was learned first is merged, again and again, until no adjacent pair has a learned
merge. Training learned the merges in order (the most frequent pair of the corpus, merged
everywhere, then the next): merge i, learned i-th, has rank i, and the lowest rank goes first.

tiktoken runs step (3) on ranks attached to tokens, not to pairs: it merges the adjacent pair whose
concatenation is the token of lowest rank, and a token's rank is its id. A tokenizer.json gives a
vocabulary {token: id} and a list of merges "a b" in learned order; so the ranks are the ids, which
is exact when the merge that makes each token comes in the order of the ids (true of every BPE
trained the usual way: token 256 + i is what merge i made, after the bytes, or after a few special
tokens placed first; checked here), and when the merge listed for each token is the pair that
merging by rank reaches inside it: so for the BPEs that tests/test_bpe.py trains, and for files
converted from tiktoken, which list every pair (Llama 3's). That is not checked (seconds per load):
a file whose merges list other pairs encodes differently from the Hugging Face library. Tokens that
no merge makes and that are not bytes are unreachable by BPE and are left out, unless ignore_merges
(Llama 3) says a piece that is a whole token is that token, as tiktoken does.

GPT-2's byte-to-unicode map: tokenizer.json stores tokens as text, each byte written as one
printable character: the 188 printable bytes (! to ~, ¡ to ¬, ® to ÿ) as themselves, the other 68
(control bytes, space, ...) as chr(256 + n) in byte order, so a space is "Ġ" and a newline "Ċ".
Reading a token is mapping each character back to its byte.

The pre-tokenizer becomes tiktoken's one regex: ByteLevel's own (GPT-2's pattern), a Split regex
(Llama 3, Qwen2: a pattern that matches every character), or Digits (SmolLM: every numeric character
alone) before GPT-2's pattern, written as one pattern where a digit ends a whitespace run as the end
of the text would. A Split keeps the text between matches as pieces: the pattern gets
"|(?:(?!R)[\\s\\S])+" for them. An NFC normalizer (Qwen2) is applied before encoding; any other
normalizer, a prefix space, SentencePiece-style BPE (byte_fallback, "▁" for spaces), Unigram or
WordPiece is refused in one line. Added tokens (<|endoftext|>, <|im_start|>, ...) become tiktoken's
special tokens: text that contains them encodes them with allowed_special.

Llama 3's tokenizer.model is tiktoken's own format (one "base64(token) rank" per line) with
Llama 3's regex and 256 special tokens after the vocabulary; a SentencePiece tokenizer.model
(protobuf: Llama 2, Mistral) is refused. The end-of-sequence token is the folder's eos_token
(tokenizer_config.json, else generation_config.json or config.json's eos_token_id); chat.py finds
the chat template (tokenizer_config.json's chat_template or chat_template.jinja) on the Encoding.

Run: `python bpe.py FOLDER "some text"` prints the ids and pieces; `python bpe.py` learns 300 merges
on this file's source, writes them as a GPT-2-style tokenizer.json into a temporary folder and
encodes with it.
"""
import base64
import binascii
import collections
import functools
import json
import re
import sys
import tempfile
import unicodedata
from pathlib import Path

import regex  # tiktoken's own dependency: \p{L} and friends, for the demo's training
import tiktoken

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                  r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                   + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>",
                      "<|eot_id|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])


class TokenizerError(ValueError):
    """A tokenizer folder this project cannot read: the one line the user sees."""


@functools.cache
def bytes_to_unicode():
    """GPT-2's map from each byte to the printable character standing for it in tokenizer.json."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


@functools.cache
def unicode_to_bytes():
    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(token, where):
    try:
        return bytes(map(unicode_to_bytes().__getitem__, token))
    except KeyError:
        raise TokenizerError(f"{where}: token {token!r} is not byte-level (GPT-2's "
                             "byte-to-unicode characters); only byte-level BPE is read") from None


class FolderEncoding(tiktoken.Encoding):
    """A tiktoken Encoding that also knows its folder's end-of-sequence token, stop tokens, BOS and
    chat template; with an NFC normalizer, text is normalized before it is encoded."""

    def __init__(self, folder, *, pat_str, mergeable_ranks, special_tokens, eos_token, bos_token="",
                 stop_ids=(), chat_template=None, nfc=False):
        super().__init__(Path(folder).name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                         special_tokens=special_tokens)
        self.folder, self.eos_token, self.bos_token = folder, eos_token, bos_token
        self.chat_template, self.nfc = chat_template, nfc
        self.eos_id = self.encode_single_token(eos_token)
        self.stop_ids = frozenset({self.eos_id, *stop_ids})

    def __reduce__(self):  # pickled (e.g. to another process) as the folder it comes from
        return load_folder, (self.folder,)

    def encode_ordinary(self, text):
        return super().encode_ordinary(unicodedata.normalize("NFC", text) if self.nfc else text)

    def encode(self, text, **kwargs):
        return super().encode(unicodedata.normalize("NFC", text) if self.nfc else text, **kwargs)


# ----------------------------------------------------------------------------------- tokenizer.json
def ranks_from_merges(model, where):
    """{token bytes: id} for the 256 bytes and every token a merge makes; ids follow merge order."""
    vocab, ranks = model.get("vocab"), {}
    if not isinstance(vocab, dict) or not isinstance(model.get("merges"), list):
        raise TokenizerError(f"{where}: model.vocab must be an object and model.merges a list")
    for c in bytes_to_unicode().values():
        if c not in vocab:
            raise TokenizerError(f"{where}: the vocabulary lacks byte token {c!r}: not a "
                                 "byte-level BPE")
        ranks[token_bytes(c, where)] = vocab[c]
    last = -1
    for i, merge in enumerate(model["merges"]):
        # "a b" (older files) or ["a", "b"]
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        made = token_bytes(a + b, where)
        if made in ranks:
            # A token several merges make (Llama 3 lists every split): its first merge ranks it.
            continue
        if a + b not in vocab:
            raise TokenizerError(f"{where}: merge {i} ({a!r} {b!r}) makes {a + b!r}, which is "
                                 "not in the vocabulary")
        if vocab[a + b] <= last:
            raise TokenizerError(f"{where}: merge {i} makes id {vocab[a + b]}, below an earlier "
                                 f"merge's {last}: tiktoken ranks tokens by id, so the ids must "
                                 "follow the merge order")
        ranks[made] = last = vocab[a + b]
    return ranks


def split_pattern(p, where):
    """A Split pre-tokenizer as a findall pattern (matches isolated, the text between as pieces)."""
    pat = p.get("pattern") or {}
    r = pat.get("Regex") if "Regex" in pat else re.escape(pat.get("String", ""))
    if not r or p.get("behavior") != "Isolated" or p.get("invert"):
        raise TokenizerError(f"{where}: Split pre-tokenizer {json.dumps(p)[:100]} is not read "
                             "(only a pattern with behavior Isolated, not inverted)")
    return f"(?:{r})|(?:(?!(?:{r}))[\\s\\S])+"


def pattern(pre, where):
    """The pre-tokenizer as one regex (ByteLevel, Split + ByteLevel, or Digits + ByteLevel)."""
    steps = (pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence"
             else [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if not steps or kinds[-1] != "ByteLevel":
        raise TokenizerError(f"{where}: pre_tokenizer {kinds or None} does not end in ByteLevel: "
                             "only byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM styles) is read")
    byte_level = steps[-1]
    if byte_level.get("add_prefix_space"):
        raise TokenizerError(f"{where}: ByteLevel add_prefix_space true is not read "
                             "(tiktoken adds no space)")
    own = byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"]:
        return GPT2_PATTERN if own else r"[\s\S]+"
    if kinds == ["Split", "ByteLevel"] and not own:
        return split_pattern(steps[0], where)
    if kinds == ["Digits", "ByteLevel"] and own:
        # Digits cuts out numeric characters (each alone, or runs); GPT-2's pattern runs between
        # them, where a numeric character ends a whitespace run as the end of the text does:
        # (?!\S) becomes (?![^\s\p{N}]).
        digits = r"\p{N}" if steps[0].get("individual_digits") else r"\p{N}+"
        return digits + (r"""|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+"""
                         r"""|\s+(?![^\s\p{N}])|\s+""")
    raise TokenizerError(f"{where}: pre_tokenizer sequence {kinds} is not read (ByteLevel, "
                         "Split + ByteLevel without its regex, or Digits + ByteLevel)")


def read_tokenizer_json(path):
    """tokenizer.json -> (pattern, mergeable ranks, {added token: id}, nfc)."""
    where = str(path)
    try:
        tj = json.loads(Path(path).read_text(encoding="utf-8"))
        model = tj["model"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise TokenizerError(f"{where}: not a tokenizer.json "
                             "(a JSON object with a \"model\")") from None
    kind = model.get("type") or ("BPE" if "merges" in model else "?")
    if kind != "BPE":
        raise TokenizerError(f"{where}: model type {kind} is not read (only byte-level BPE)")
    for key in ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise TokenizerError(f"{where}: BPE with {key} {model[key]!r} is not read "
                                 "(only plain byte-level BPE)")
    norm = tj.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise TokenizerError(f"{where}: normalizer {norm.get('type')} is not read "
                             "(it changes the text; only none or NFC)")
    pat = pattern(tj.get("pre_tokenizer"), where)
    ranks = ranks_from_merges(model, where)
    contents = {t["content"] for t in tj.get("added_tokens") or []}
    # ignore_merges (Llama 3): a piece that is a whole token is that token, made by a merge or not.
    if model.get("ignore_merges"):
        for token, i in model["vocab"].items():
            if token not in contents:
                ranks.setdefault(token_bytes(token, where), i)
    # An added token BPE already makes is just a token.
    added = {t["content"]: t["id"] for t in tj.get("added_tokens") or []
             if t["content"].encode() not in ranks}
    return pat, ranks, added, norm is not None


# ---------------------------------------------------------------------------------- tokenizer.model
def read_tiktoken_model(path, added):
    """Llama 3's tokenizer.model: "base64(token) rank" lines; its specials follow (from
    tokenizer_config.json's added_tokens_decoder, or Llama 3's own list)."""
    raw = Path(path).read_bytes()
    ranks = {}
    try:
        for lineno, line in enumerate(raw.decode("ascii").splitlines(), 1):
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (UnicodeDecodeError, ValueError, binascii.Error):
        raise TokenizerError(f"{path}: not tiktoken's format (\"base64 rank\" lines): a "
                             "SentencePiece model (Llama 2, Mistral) is not read; give a folder "
                             "with a byte-level BPE tokenizer.json")
    if not ranks:
        raise TokenizerError(f"{path}: empty")
    n = max(ranks.values()) + 1
    return LLAMA3_PATTERN, ranks, added or {t: n + i for i, t in enumerate(LLAMA3_SPECIALS)}, False


# --------------------------------------------------------------------------------------- the folder
def read_json(path):
    try:
        obj = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (UnicodeDecodeError, ValueError):
        raise TokenizerError(f"{path}: not valid JSON") from None
    if not isinstance(obj, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return obj


def token_text(t):
    # "<|im_end|>" or {"content": "<|im_end|>", ...}
    return t.get("content") if isinstance(t, dict) else t


def chat_template(folder, tc):
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or named ones)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    t = tc.get("chat_template")
    if isinstance(t, list):
        t = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}.get("default")
    return t if isinstance(t, str) else None


def ids_of(value):
    return ([value] if isinstance(value, int)
            else [v for v in value if isinstance(v, int)] if value else [])


@functools.cache
def load_folder(folder):
    """A Hugging Face tokenizer folder -> FolderEncoding (the argument: a resolved path string)."""
    f = Path(folder)
    tc = read_json(f / "tokenizer_config.json")
    if (f / "tokenizer.json").is_file():
        pat, ranks, specials, nfc = read_tokenizer_json(f / "tokenizer.json")
    elif (f / "tokenizer.model").is_file():
        added = {t.get("content"): int(i)
                 for i, t in (tc.get("added_tokens_decoder") or {}).items()}
        pat, ranks, specials, nfc = read_tiktoken_model(f / "tokenizer.model", added)
    else:
        raise TokenizerError(f"{f}: no tokenizer.json or tokenizer.model")
    names = {i: t for t, i in specials.items()}
    gen, cfg = read_json(f / "generation_config.json"), read_json(f / "config.json")
    stop_ids = ids_of(gen.get("eos_token_id")) + ids_of(cfg.get("eos_token_id"))
    candidates = [token_text(tc.get("eos_token"))] + [names.get(i) for i in stop_ids] + \
                 ["<|endoftext|>", "<|end_of_text|>"]
    eos = next((t for t in candidates if t in specials), None)
    if eos is None:
        raise TokenizerError(f"{f}: no end-of-sequence token: set eos_token in "
                             "tokenizer_config.json to one of the added tokens "
                             f"({', '.join(list(specials)[:5]) or 'none'})")
    bos = token_text(tc.get("bos_token")) or ""
    n = max(max(ranks.values()), max(specials.values(), default=0)) + 1
    return FolderEncoding(folder, pat_str=pat, mergeable_ranks=ranks, special_tokens=specials,
                          eos_token=eos, bos_token=bos if bos in specials else "",
                          stop_ids=[i for i in stop_ids if 0 <= i < n],
                          chat_template=chat_template(f, tc), nfc=nfc)


# ----------------------------------------------------------------------------------------- the demo
def learn_merges(text, n_merges, pat=GPT2_PATTERN):
    """Textbook BPE training: count the pieces, then n times merge the most frequent adjacent pair
    everywhere (ties: the first seen). Returns the merges in learned order (byte-to-unicode)."""
    b2u = bytes_to_unicode()
    words = collections.Counter(tuple(b2u[b] for b in w.encode()) for w in regex.findall(pat, text))
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merges.append((a, b))
        new = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += n
        words = new
    return merges


def gpt2_style_json(merges, added=("<|endoftext|>",)):
    """A GPT-2-style tokenizer.json: the 256 bytes in order, a token per merge, the added tokens."""
    vocab = {c: b for b, c in bytes_to_unicode().items()}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    added_tokens = [{"id": len(vocab) + i, "content": t, "special": True}
                    for i, t in enumerate(added)]
    return {"version": "1.0", "added_tokens": added_tokens, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "model": {"type": "BPE", "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]}}


def main(argv):
    if len(argv) == 2:
        folder, text = Path(argv[0]), argv[1]
    else:
        folder = Path(tempfile.mkdtemp(prefix="bpe-demo-"))
        merges = learn_merges(Path(__file__).read_text(encoding="utf-8"), 300)
        (folder / "tokenizer.json").write_text(json.dumps(gpt2_style_json(merges)))
        text = "def merge(pair, rank): return the byte pair of lowest rank  # 42 é 🙂<|endoftext|>"
        print(f"learned {len(merges)} merges on {Path(__file__).name}; first ten: {merges[:10]}")
    try:
        enc = load_folder(str(folder.resolve()))
    except TokenizerError as e:
        sys.exit(f"bpe.py: error: {e}")
    ids = enc.encode(text, allowed_special="all")
    print(f"{folder}: {enc.n_vocab} ids, end of sequence {enc.eos_token!r} = {enc.eos_id}")
    print(f"{len(text)} characters, {len(text.encode())} bytes -> {len(ids)} tokens")
    print("ids:   ", ids)
    print("pieces:", [enc.decode_single_token_bytes(i).decode("utf-8", "backslashreplace")
                      for i in ids])


if __name__ == "__main__":
    main(sys.argv[1:])

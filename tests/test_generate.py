"""Generation with the KV cache (kv_cache.py, model.py's Transformer.stream) and generate.py's
command line: the cached tokens are the uncached ones, the cached logits the full forward's,
sampling keeps what it should."""
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import generate
import tensor_parallel
from model import PRESETS, Transformer, sample, top_p_mask
from tests.distributed import run_distributed
from tests.sft_fixtures import CFG as SFT_CFG
from tests.sft_fixtures import make_init
from topology import Topology

ROOT = Path(__file__).resolve().parent.parent
CFG = replace(PRESETS["tiny"], n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96, block_size=48)


def build(cfg=CFG, dtype=torch.float64, seed=0):
    """Weights larger than the training init (std 0.02), so that every token's logits depend on the
    context: a model at init repeats one token whatever it attends to, hiding a wrong cache."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    for p in model.parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=0.2)
    return model.to(dtype).eval()


# ------------------------------------------------------------------------------- the cache is exact
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_greedy_with_the_cache_equals_greedy_without(dtype, n_kv_head):
    """Token for token, to the end of the context and 7 tokens past it (where both slide a window of
    block_size tokens); n_kv_head < n_head is grouped-query attention."""
    model = build(replace(CFG, n_kv_head=n_kv_head), dtype)
    prompt = torch.randint(0, CFG.vocab_size, (2, 7))
    cached = model.generate(prompt, CFG.block_size, temperature=0)
    uncached = model.generate(prompt, CFG.block_size, temperature=0, use_cache=False)
    assert cached.shape == (2, CFG.block_size + 7) and torch.equal(cached, uncached)
    # varied text, not one token repeated
    assert min(len(set(row[7:].tolist())) for row in cached) > 10


@pytest.mark.parametrize("backend", ["naive", "sdpa", "flash"])  # flash: on a CPU its PyTorch twin
def test_cached_logits_equal_the_full_forward(backend):
    """A prefill of 9, a chunk of 6 more on top of the cache (queries offset against the keys), then
    one token at a time: every position's logits, in float64, as one forward over the whole
    sequence gives them."""
    model = build(replace(CFG, n_kv_head=1))
    for b in model.blocks:
        b.attn.backend = backend
    idx = torch.randint(0, CFG.vocab_size, (2, 24))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache()
        parts = [model(idx[:, :9], cache=cache)[0], model(idx[:, 9:15], cache=cache)[0]]
        parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(15, 24)]
    assert cache[0].len == 24 and cache[0].k.shape == (2, 1, CFG.block_size, CFG.head_dim)
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-12


def test_the_cache_refuses_more_than_it_holds():
    model = build()
    cache = model.new_cache(max_len=8)
    model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KV cache of 8 positions cannot take 1 more after 8"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def _tp_generation(rank, world):
    """The same model and seed on `world` tensor-parallel ranks (local heads); each generates."""
    model = build(replace(CFG, n_head=4, n_kv_head=2))
    tensor_parallel.parallelize(model, Topology(tp=world))
    tensor_parallel.set_gather_output(model, True)
    prompt = torch.randint(0, CFG.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    greedy = model.generate(prompt, 30, temperature=0)
    torch.manual_seed(2)
    sampled = model.generate(prompt, 30, temperature=0.8, top_k=50, top_p=0.9)
    return greedy, sampled


def test_tensor_parallel_generation_equals_one_process():
    """tp 2 (two heads, one KV head per rank and cache) against one process: greedy, sampled."""
    one = _tp_generation(0, 1)
    for greedy, sampled in run_distributed(_tp_generation, 2):
        assert torch.equal(greedy, one[0]) and torch.equal(sampled, one[1])


# ----------------------------------------------------------------------------------- sampling
def test_top_p_keeps_the_smallest_set_that_reaches_p():
    # sorted: 0.5 (id 1), 0.25 (id 3), then the two 0.125
    probs = torch.tensor([[0.125, 0.5, 0.125, 0.25]])
    kept = lambda p: set(top_p_mask(probs, p)[0].nonzero().flatten().tolist())  # noqa: E731
    assert kept(0.5) == {1} and kept(0.7) == kept(0.75) == {1, 3}
    assert len(kept(0.76)) == 3 and kept(1.0) == {0, 1, 2, 3}
    torch.manual_seed(0)
    draws = sample(probs.log().expand(500, 4), temperature=1.0, top_p=0.7)
    assert set(draws.flatten().tolist()) == {1, 3}  # only the nucleus is ever drawn


def test_temperature_zero_is_the_argmax_and_top_k_limits_the_draws():
    torch.manual_seed(0)
    logits = torch.randn(64, 10)
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1, keepdim=True))
    draws = sample(logits, temperature=1.0, top_k=2)
    assert (draws == logits.topk(2).indices).any(-1).all()


class ScriptedHead(nn.Module):
    """An lm_head whose last position's logits make greedy decoding say `script`, one token per
    call; the padded vocabulary's rows (>= n_vocab) get the largest logits, yet are never drawn."""

    def __init__(self, script, vocab, n_vocab):
        super().__init__()
        self.script, self.vocab, self.n_vocab, self.calls = script, vocab, n_vocab, 0

    def forward(self, x):
        logits = torch.zeros(*x.shape[:-1], self.vocab, dtype=x.dtype)
        logits[..., self.n_vocab:] = 100.0
        logits[..., -1, self.script[self.calls]] = 10.0
        self.calls += 1
        return logits


@pytest.mark.parametrize("no_cache", [False, True])
def test_generation_stops_at_end_of_text(no_cache):
    model = build(SFT_CFG, torch.float32)
    # the byte tokenizer's end-of-text, and its vocabulary (the model's is 320)
    eos, n_vocab = 256, 257
    model.lm_head = ScriptedHead([ord("h"), ord("i"), eos, ord("x")], SFT_CFG.vocab_size, n_vocab)
    args = generate.build_parser().parse_args(["x", "--prompt", "p", "--temperature", "0"]
                                              + ["--no-cache"] * no_cache)
    new, _, _, hit_eos = generate.generate(model, [1, 2, 3], args, {eos}, n_vocab)
    # nothing after end-of-text
    assert new == [ord("h"), ord("i")] and hit_eos and model.lm_head.calls == 3


# --------------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    # a consolidated file, byte tokenizer, context 128
    return make_init(tmp_path_factory.mktemp("gen"))


def cli(*args):
    return subprocess.run([sys.executable, "generate.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


STATS = re.compile(r"^prefill (\d+) tokens: [\d,.]+ tokens/s"
                   r" \| decode (\d+) tokens: [\d,.]+ tokens/s"
                   r" \| (KV cache of (\d+) positions: ([\d,]+) bytes|no cache)"
                   r" \| stopped at --max-new-tokens$")


def test_the_command_line_with_and_without_the_cache(tiny_file):
    """Greedy: the same text both ways; the text starts with the prompt; the last line is the
    tokens/s line, with the KV cache's bytes as the formula has them:
    2 * L * T * n_kv_head * head_dim * 4 (fp32)."""
    outs = [cli(tiny_file, "--prompt", "def f(", "--temperature", "0", "--max-new-tokens", "12",
                *extra)
            for extra in ([], ["--no-cache"])]
    for p in outs:
        assert p.returncode == 0 and p.stderr == "", p.stderr
    (text, stats), (text_nc, stats_nc) = (p.stdout.rstrip("\n").rsplit("\n", 1) for p in outs)
    assert text == text_nc and text.startswith("def f(")
    m, m_nc = STATS.match(stats), STATS.match(stats_nc)
    assert m and m_nc and m_nc.group(3) == "no cache", (stats, stats_nc)
    assert m.group(1, 2, 4) == ("6", "11", "17")  # the last token drawn never enters the cache
    cfg = SFT_CFG
    formula = 2 * cfg.n_layer * 17 * cfg.n_kv_head * cfg.head_dim * 4
    assert int(m.group(5).replace(",", "")) == formula


def test_chat_and_int8_run(tiny_file):
    """--chat prints the answer alone (here: not the template); --int8 runs through INT8 linears."""
    p = cli(tiny_file, "--prompt", "Reverse the word.", "--chat", "--int8", "--max-new-tokens", "5",
            "--top-p", "0.9")
    assert (p.returncode == 0 and "Instruction" not in p.stdout
            and " | int8 | " in p.stdout), p.stdout + p.stderr


@pytest.mark.parametrize("flags, message", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be >= 0 (0: greedy), got -1.0"),
    (["--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--prompt", "x", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--prompt", "x" * 128], "--prompt is 128 tokens; the model's context is 128: at most 127"),
])
def test_bad_input_is_one_line(tiny_file, flags, message):
    with pytest.raises(generate.GenerateError, match=re.escape(message)):
        generate.main([str(tiny_file), *flags])


def test_a_folder_without_a_checkpoint_is_one_line(tmp_path):
    with pytest.raises(generate.GenerateError,
                       match=f"^{re.escape(str(tmp_path))}: no complete checkpoint in"):
        generate.main([str(tmp_path), "--prompt", "x"])


def test_bad_input_exits_2_with_one_line(tmp_path):
    p = cli(tmp_path / "none", "--prompt", "x")
    assert p.returncode == 2 and p.stdout == "" and len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"generate.py: {tmp_path / 'none'}: "
                               "no such file or folder"), p.stderr

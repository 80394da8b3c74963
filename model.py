"""model.py: a decoder-only transformer in the Llama style, written to be cut up from outside.

The idea: a stack of identical blocks, each `x = x + attn(norm(x)); x = x + mlp(norm(x))`, between a
token embedding and a linear head that predicts the next token. Llama's choices: RMSNorm (no mean,
no bias), rotary position embeddings applied to queries and keys (no learned positions), a SwiGLU
MLP `w2(silu(w1 x) * w3 x)`, grouped-query attention (n_kv_head <= n_head key/value heads shared by
groups of query heads), no biases, untied input and output embeddings (so a pipeline's first and
last stages share no weight). For imported Hugging Face models (hf.py): Llama 3.1's long-context
RoPE scaling (llama3_frequencies) and a head width of their own (ModelConfig.head_dim_override).

Formulas, per token, for L layers of width d, context T and N parameters in matrix multiplies:
    training FLOPs  ~ 6 N + 6 L d T    (forward 2N + 2LdT, multiply-adds counted as 2 FLOPs;
                                        backward twice that; the attention term counts the causal
                                        half of the T x T scores)
    activations     ~ L T d (34 + 5 a T / d) bytes in half precision without checkpointing
                      (Korthikanti et al.); with --activation-checkpointing only each block's
                      input is kept: 2 L T d bytes, at the cost of one more forward per block
                      in the backward.

Generation (generate.py) keeps each layer's past keys and values (kv_cache.py): they never change
in a causal model, so each new token is one forward of that token alone, its query against the
cached keys (Transformer.stream).

The parallel files change this model from outside, never from within: tensor_parallel.py swaps the
Linear layers and embedding for sharded ones and shrinks `n_head`/`n_kv_head` to the local heads;
pipeline.py keeps a slice of `blocks` and calls `embed`, `body` and `head` separately; moe.py swaps
a block's `mlp`; lora.py wraps Linears. That is why attention reshapes with -1 heads and why the
forward is three small methods. And why the initial values are drawn by parameter name (init.py: one
generator per block of rows of a parameter, seeded by the model's seed and the parameter's name in
the whole model): a rank can build its own stage, slices and experts on their own
(stack.build_model, on the meta device first), equal to the same part of the whole model.

Demo: `python model.py` prints the presets with their parameter counts and FLOPs per token, then
checks that the naive and SDPA attention backends agree.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from init import init_seed, init_values, materialize, whole
from kv_cache import KVCache


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2
    d_model: int = 128
    d_ff: int = 384              # SwiGLU hidden width (about 8/3 d, rounded, as in Llama)
    vocab_size: int = 256        # set from the tokenizer when training, padded to a multiple of 64
    block_size: int = 256        # the longest context the model is built for
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    attn: str = "sdpa"           # naive | sdpa | flash
    activation_checkpointing: bool = False
    # Two fields only some imported Hugging Face models need (hf.py), left out of config_dict at
    # their defaults:
    head_dim_override: int = 0   # HF's head_dim, for n_head * head_dim != d_model; 0: d / n_head
    # Llama 3.1's long-context RoPE: {"rope_type": "llama3", "factor", "low_freq_factor",
    #                                 "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None

    @property
    def head_dim(self):
        return self.head_dim_override or self.d_model // self.n_head


ADDED_FIELDS = {"head_dim_override": 0, "rope_scaling": None}  # (their defaults)


def config_dict(cfg):
    """A model config as checkpoints record and compare it (part of a run's identity): the fields
    of a ModelConfig (or such a dict), less ADDED_FIELDS while at their defaults, so that a config
    recorded before those fields existed reads, compares and builds (ModelConfig(**d)) as it did."""
    d = asdict(cfg) if not isinstance(cfg, dict) else dict(cfg)
    return {k: v for k, v in d.items() if not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])}


PRESETS = {
    # CPU-sized: trains to Python-looking samples in a few minutes on 2 cores (byte tokenizer).
    "tiny": ModelConfig(n_layer=4, n_head=4, n_kv_head=2, d_model=128, d_ff=384, vocab_size=256,
                        block_size=256),
    "small": ModelConfig(n_layer=6, n_head=6, n_kv_head=2, d_model=384, d_ff=1024, vocab_size=256,
                         block_size=512),
    # GPT-2 small's shape in Llama-style blocks: 12 layers, d=768, 12 heads, T=1024, vocab 50304.
    "gpt2-124m": ModelConfig(n_layer=12, n_head=12, n_kv_head=12, d_model=768, d_ff=2048,
                             vocab_size=50304, block_size=1024),
    # Llama-3.2-1B's shape with the GPT-2 vocabulary: about 1.2B parameters.
    "1b": ModelConfig(n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_ff=8192, vocab_size=50304,
                      block_size=2048),
}
ATTN_BACKENDS = ("naive", "sdpa", "flash")


def pad_vocab(n, multiple=64):
    """Round the vocabulary up so the head's matmul has friendly shapes (GPT-2: 50257 -> 50304)."""
    return (n + multiple - 1) // multiple * multiple


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # The mean of squares is taken in at least fp32: in bf16 it loses the small components of x.
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.to(h.dtype)).to(x.dtype)


def rope_tables(head_dim, max_len, theta, scaling=None):
    """cos and sin of position * frequency, frequencies theta^(-2i/d): shape (max_len, head_dim/2).
    With `scaling` (ModelConfig.rope_scaling), Llama 3.1's long-context ones: llama3_frequencies."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is not None:
        inv_freq = llama3_frequencies(inv_freq,
                                      **{k: v for k, v in scaling.items() if k != "rope_type"})
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def llama3_frequencies(inv_freq, factor, low_freq_factor, high_freq_factor,
                       original_max_position_embeddings):
    """Llama 3.1's RoPE scaling (Meta, "The Llama 3 Herd of Models", 2024): a model pretrained on
    contexts of L = original_max_position_embeddings stretches its slow rotations by `factor` and
    keeps its fast ones. With wavelength w = 2 pi / f:
        w < L / high_freq_factor (many turns within L):    f unchanged
        w > L / low_freq_factor (less than a turn or so):  f / factor
        in between, a blend:                               (1 - s) f / factor + s f
    with s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)."""
    L, wavelen = original_max_position_embeddings, 2 * math.pi / inv_freq
    s = ((L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    blended = (1 - s) * inv_freq / factor + s * inv_freq
    return torch.where(wavelen < L / high_freq_factor, inv_freq,
                       torch.where(wavelen > L / low_freq_factor, inv_freq / factor, blended))


def apply_rope(x, cos, sin):
    """Rotate each (x1, x2) pair of half-vectors by its angle: relative positions survive q.k."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def packed_mask(doc):
    """(B, 1, T, T) True where query i may attend to key j: j <= i, both in one example (doc id)."""
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :])).unsqueeze(1)


def causal_mask(Tq, Tk, device):
    """(Tq, Tk) True where query i may attend to key j. The queries are the last Tq of Tk positions
    (Tq < Tk when a KV cache holds the earlier ones), so query i sits at position Tk - Tq + i and
    sees keys 0..Tk - Tq + i."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(Tk - Tq)


def naive_attention(q, k, v, doc=None):
    """softmax(q k^T / sqrt(d) + mask) v with the whole T x T matrix: the O(T^2) memory baseline."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    mask = causal_mask(q.shape[2], k.shape[2], q.device) if doc is None else packed_mask(doc)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)),
                          dim=-1).to(q.dtype)
    return probs @ v


def attention(q, k, v, backend, doc=None):
    """Causal attention over (B, H, T, D) queries and (B, H_kv, T, D) keys/values. With `doc`
    (B, T), the document id of each position in packed rows (non-decreasing along a row), a query
    attends only to keys of its own document: a block-diagonal causal mask, so that packed examples
    never see each other. Keys longer than queries come from a KV cache: the queries are the newest
    positions (causal_mask)."""
    if q.shape[2] != k.shape[2]:
        return cached_attention(q, k, v, backend)
    # set from outside by a parallel file (context_parallel.py's ring attention)
    if callable(backend):
        return backend(q, k, v, doc)
    if backend == "naive":
        return naive_attention(q, k, v, doc)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, doc)
    if backend == "flash":
        # imported late: Triton is only needed when asked for
        from flash_attn import flash_attention
        return (flash_attention(q, k, v, causal=True) if doc is None
                else flash_attention(q, k, v, causal=True, doc=doc))
    raise ValueError(f"--attn must be one of {', '.join(ATTN_BACKENDS)}, got {backend!r}")


def cached_attention(q, k, v, backend):
    """New queries (B, H, Tq, D) against all the keys and values so far (B, H_kv, Tk, D), Tq < Tk.
    One decoding step (Tq = 1) sees every key: no mask. SDPA (or the naive reference) serves every
    backend here: a single query row is a memory-bound matrix-vector product, where a tiled kernel
    has nothing to save."""
    if backend == "naive":
        return naive_attention(q, k, v)
    mask = None if q.shape[2] == 1 else causal_mask(q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                          enable_gqa=q.shape[1] != k.shape[1])


# SDPA's flash kernel on CUDA takes these dtypes only, and no attn_mask (GQA: enable_gqa).
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def sdpa_attention(q, k, v, doc=None):
    """torch's SDPA, called so that on CUDA a kernel with O(T) memory serves every form the model
    asks for; any call it cannot serve falls to the math backend, which builds the T x T fp32 scores
    of every head:
      - 16-bit causal rows (with GQA or not): the flash kernel;
      - 16-bit packed rows: their block-diagonal mask is one the flash kernel cannot take, so they
        go to flash_attn.py's document path, which never builds it (and skips the other
        documents' tiles);
      - fp32 (--amp fp32; a CPU's default): the memory-efficient kernel takes fp32 and masks but
        not enable_gqa, so on CUDA K and V are first expanded to the query heads.
    On a CPU the flash kernel serves every form in any dtype: fp32 and fp64 calls are as they
    always were."""
    gqa = q.shape[1] != k.shape[1]
    if doc is not None and q.dtype in FLASH_DTYPES:
        # imported late: Triton is only needed when asked for
        from flash_attn import HEAD_DIMS, flash_attention
        if HEAD_DIMS[0] <= q.shape[-1] <= HEAD_DIMS[1]:
            return flash_attention(q, k, v, causal=True, doc=doc)
    if gqa and q.is_cuda and q.dtype not in FLASH_DTYPES:
        groups = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), False
    if doc is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=packed_mask(doc), enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd = cfg.head_dim
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, hd
        self.backend = cfg.attn
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * hd, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=False)
        self.wo = nn.Linear(cfg.n_head * hd, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, doc=None, cache=None):
        B, T, _ = x.shape
        # positions 0..T-1: the tables may be longer (under sequence parallelism x is gathered here)
        if cos.dim() == 2:
            cos, sin = cos[:T], sin[:T]
        # -1 heads: under tensor parallelism the local linears are narrower, this rank's heads only.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # keys and values of the earlier positions join the new ones
            k, v = cache.append(k, v)
        y = attention(q, k, v, self.backend, doc)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), w1 the gate, w3 the up projection, w2 the down projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, doc=None, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, doc, cache)
        return x + self.mlp(self.mlp_norm(x))


def cross_entropy(logits, targets, reduction="mean"):
    """Loss of (..., V) logits, in fp32 or better; labels of -100 are ignored (padding, prompts)."""
    flat = logits.view(-1, logits.shape[-1])
    return F.cross_entropy(flat.to(torch.promote_types(flat.dtype, torch.float32)),
                           targets.reshape(-1), ignore_index=-100, reduction=reduction)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # One number from the global random stream (torch.manual_seed first): every parameter's
        # values come from it and the parameter's name (init_values), so they do not depend on what
        # else is built, nor where.
        self.init_seed = init_seed()
        # the caller's default device: under torch.device("meta") nothing is made
        device = torch.empty(0).device
        # A plain function, not a module: tensor_parallel.py swaps in its vocabulary-parallel one.
        self.loss_fn = cross_entropy
        with torch.device("meta"):  # shapes only; materialize allocates and fills them once
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.set_rope_tables(device)
        if device.type != "meta":
            materialize(self, device,
                        lambda name, p: init_values(name, p.shape, whole(p.shape), self.init_seed,
                                                    cfg.n_layer, p.dtype, device))

    def set_rope_tables(self, device=None):
        """The rotary tables, on `device` (again after a meta-device build: stack.build_model)."""
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.block_size, self.cfg.rope_theta,
                               self.cfg.rope_scaling)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    # The forward in three parts, so that pipeline stages can run only theirs.
    def embed(self, idx):
        return self.tok_emb(idx)

    def body(self, x, pos=None, doc=None, cache=None):
        """`pos` (B, T): each token's position for RoPE (packed rows restart at every example;
        default 0..T-1); `doc` (B, T): its example's id in a packed row (attention stays inside it),
        or None; `cache`: one KVCache per block (new_cache) holding the earlier positions, so x's
        tokens sit at positions len..len+T-1."""
        # whole tables: each attention takes the first T rows it needs
        cos, sin = self.rope_cos, self.rope_sin
        # (B, 1, T, head_dim/2): the rows of the given positions, for every head
        if pos is not None:
            cos, sin = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
        if cache is not None:  # rotary angles of the absolute positions, after the cached ones
            assert pos is None and doc is None, "a KV cache holds one unpacked sequence per row"
            start = cache[0].len
            cos, sin = cos[start:start + x.shape[1]], sin[start:start + x.shape[1]]
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, cos, sin, None, cache[i])
            elif self.cfg.activation_checkpointing and torch.is_grad_enabled():
                # Keep only the block's input; recompute its insides during backward.
                x = checkpoint(block, x, cos, sin, doc, use_reentrant=False)
            else:
                x = block(x, cos, sin, doc)
        return x

    def head(self, x, targets=None, reduction="mean"):
        """Logits, and with targets the cross-entropy (labels -100 ignored: padding, prompts)."""
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits, None
        return logits, self.loss_fn(logits, targets, reduction)

    def forward(self, idx, targets=None, reduction="mean", pos=None, doc=None, cache=None):
        # A pipeline stage (pipeline.py) may lack the embedding (it receives activations instead of
        # token ids) or the head (it returns its activations, to be sent on, and no loss).
        x = self.body(self.embed(idx) if self.tok_emb is not None else idx, pos, doc, cache)
        return self.head(x, targets, reduction) if self.lm_head is not None else (x, None)

    def new_cache(self, max_len=None):
        """An empty KV cache: one KVCache per block, for up to max_len (block_size) positions."""
        return [KVCache(max_len or self.cfg.block_size) for _ in self.blocks]

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, n_vocab=None, top_p=None,
               use_cache=True, agree=None):
        """Yield the next (B, 1) tokens one at a time. With the cache: one prefill forward over the
        prompt, then one decoding forward per token, of that token alone, while the context has
        room; past block_size, and without the cache, each token is a forward over the last
        block_size tokens (a sliding window, whose positions shift every step, so nothing cached
        stays valid). `n_vocab`: the tokenizer's real vocabulary, so that the padding ids (never
        seen in training) are never drawn. `agree`: makes ranks that generate together take one
        token (topology.rank0_token)."""
        # Room for the prompt and new tokens only: a Hugging Face model's context may be 128k long.
        cache = (self.new_cache(min(self.cfg.block_size, idx.shape[1] + max_new_tokens))
                 if use_cache else None)
        for _ in range(max_new_tokens):
            # the context is full: slide from here on
            if cache is not None and idx.shape[1] > cache[0].max_len:
                cache = None
            if cache is None:
                logits, _ = self(idx[:, -self.cfg.block_size:])
            else:  # the first step prefills the whole prompt; each later one feeds the newest token
                logits, _ = self(idx[:, cache[0].len:], cache=cache)
            nxt = sample(logits[:, -1, :n_vocab], temperature, top_k, top_p)
            if agree is not None:
                nxt = agree(nxt)
            idx = torch.cat([idx, nxt], dim=1)
            yield nxt

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, n_vocab=None, top_p=None,
                 use_cache=True, agree=None):
        """The prompt and max_new_tokens sampled tokens after it (stream)."""
        tokens = self.stream(idx, max_new_tokens, temperature, top_k, n_vocab, top_p, use_cache,
                             agree)
        return torch.cat([idx, *tokens], 1)


def top_p_mask(probs, top_p):
    """Nucleus sampling (Holtzman et al., 2019): True for the smallest set of most likely tokens
    whose probabilities sum to at least top_p: a token stays if the tokens more likely than it sum
    to less than top_p."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep_sorted = sorted_probs.cumsum(-1) - sorted_probs < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sample(logits, temperature=1.0, top_k=None, top_p=None):
    """(B, 1) next tokens from (B, V) logits: the argmax at temperature 0; else
    softmax(logits / temperature) over the top_k most likely tokens and within the top_p nucleus."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        probs = probs * top_p_mask(probs, top_p)
    return torch.multinomial(probs, 1)


def num_params(model, matmul_only=False):
    """All parameters, or only those in matrix multiplies (the embedding is a lookup: no FLOPs)."""
    total = sum(p.numel() for p in model.parameters())
    if matmul_only and getattr(model, "tok_emb", None) is not None:
        total -= model.tok_emb.weight.numel()
    return total


def flops_per_token(cfg: ModelConfig, n_matmul_params, seq_len=None):
    """Training FLOPs per token: 6N for the weights (2 forward, 4 backward) + 6 L d T for attention:
    Q K^T and P V over all T x T pairs would be 12 L d T (PaLM's count), but a causal model needs
    only the pairs below the diagonal, half of them, and the causal kernels (flash_attn.py, SDPA)
    skip the rest."""
    T = seq_len or cfg.block_size
    # (the attention width n_head * head_dim is d, but for head_dim_override)
    return 6 * n_matmul_params + 6 * cfg.n_layer * cfg.n_head * cfg.head_dim * T


if __name__ == "__main__":
    print(f"{'preset':<10} {'params':>14} {'matmul params':>14} {'FLOPs/token':>14}")
    for name, cfg in PRESETS.items():
        with torch.device("meta"):  # count without allocating: the 1b preset would take 5 GB
            m = Transformer(cfg)
        n, nm = num_params(m), num_params(m, matmul_only=True)
        print(f"{name:<10} {n:>14,} {nm:>14,} {flops_per_token(cfg, nm):>14.3e}")
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    m = Transformer(cfg).double()
    idx = torch.randint(0, cfg.vocab_size, (2, 64))
    outs = {}
    for backend in ("naive", "sdpa"):
        for blk in m.blocks:
            blk.attn.backend = backend
        outs[backend] = m(idx)[0]
    print("max |naive - sdpa| logits (float64):", (outs["naive"] - outs["sdpa"]).abs().max().item())

"""kv_cache.py: past positions' keys and values, kept so that each generated token is fed alone.

The idea: in a causal model the keys and values of past positions never change (no position sees
a later one), so keep them; each new token then costs one row of attention, its query against the
T cached keys, O(T), instead of running the whole prefix again: O(T^2) attention, and every weight
once per past token. Generation runs in two phases: a prefill forward over the prompt fills the
cache, then one decoding forward per new token appends one position. One KVCache per block
(Transformer.new_cache); Attention.forward appends the new keys and values and attends over all
of them (model.cached_attention), with rotary angles of the absolute positions (Transformer.body).

Its size, per sequence:
    2 (K and V) * n_layer * T * n_kv_head * head_dim * bytes per value
Grouped-query attention's few KV heads make it n_head / n_kv_head times smaller.

See it run: `python generate.py out/pretrain --prompt "def "` prints the cache's size in bytes
and the prefill and decode tokens/s; with `--no-cache` the same tokens come without it.
"""


class KVCache:
    """One layer's keys and values of all positions so far, preallocated for max_len of them."""

    def __init__(self, max_len):
        self.max_len, self.len, self.k, self.v = max_len, 0, None, None

    def append(self, k, v):
        """Write the new positions' k, v (B, H_kv, T, D) after the held ones; return all held."""
        B, H, T, D = k.shape
        # allocated at the first write: under tensor parallelism H is this rank's heads only
        if self.k is None:
            self.k, self.v = k.new_zeros(B, H, self.max_len, D), v.new_zeros(B, H, self.max_len, D)
        if self.len + T > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot take {T} more after "
                             f"{self.len}")
        self.k[:, :, self.len:self.len + T], self.v[:, :, self.len:self.len + T] = k, v
        self.len += T
        return self.k[:, :, :self.len], self.v[:, :, :self.len]

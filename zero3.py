"""zero3.py: ZeRO stage 3 (Rajbhandari et al., 2020): the 16-bit weights partitioned too, gathered
per layer.

zero.py tells the story of the stages and holds what they share; this is the stage that also
shards the weights. On top of stage 2 (gradients reduce-scattered per unit as backward produces
them), each rank keeps only its slice of every unit's 16-bit weights (`shard16`), and a unit is
whole only while it computes:
  - forward: a unit is all-gathered just before its forward (the next unit's gather is launched
    at the same time: prefetch, so communication overlaps compute) and freed right after;
  - backward: it is gathered again when backward reaches it (a hook on its output's gradient,
    which also prefetches the unit before it) and freed once its gradients are reduce-scattered.
The root (embedding, final norm, head) is used at both ends of the forward: it stays gathered from
the start of the forward until its gradients are reduce-scattered at the end of backward. Freeing
shrinks the flat buffer's storage to nothing; the parameters stay views of it, so the tensors
autograd saved for backward see the re-gathered weights. After a step, each rank's updated slice
is its shard16: nothing is gathered before the next forward.
Memory per rank: (2 + 2 + K) Psi / N_d, plus the units gathered at the time (estimate.py).

Demo: `torchrun --nproc_per_node 2 zero.py` (every stage, this one included).
"""
import contextlib

import torch

from zero import Zero2, all_gather_single


class Zero3(Zero2):
    """Stage 3: Zero2's sharded gradients and optimizer states, and the 16-bit weights sharded,
    gathered per unit by hooks around its forward and backward."""
    stage = 3

    def __init__(self, model, *args):
        super().__init__(model, *args)
        for u in self.units:
            if u.shard16 is None:
                u.shard16 = u.full[u.lo:u.hi].clone()
            self._free(u)
        self.root = next((u for u in self.units if u.module is model and not u.local), None)
        blocks = [u for u in self.units if u is not self.root]
        for i, u in enumerate(blocks):
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            prev = blocks[i - 1] if i else None
            u.module.register_forward_pre_hook(
                lambda m, args, u=u, nxt=nxt: self._before_forward(u, nxt))
            u.module.register_forward_hook(
                lambda m, args, out, u=u, prev=prev: self._after_forward(u, prev, out))
        first = blocks[0] if blocks else None
        model.register_forward_pre_hook(lambda m, args: self._before_forward(self.root, first))
        if self.root is not None:
            model.register_forward_hook(lambda m, args, out: self._after_root_forward(out))

    @staticmethod
    def _master_is_model(u):
        u.shard16 = u.master  # an fp32 model: the slice kept between gathers is the master

    # -------------------------------------------------------------- gathering and freeing a unit
    def _gather(self, u):
        """Launch the all-gather of u's weights into its (re-grown) flat buffer, unless gathered
        or on the way."""
        if u.gathered or u.pending is not None:
            return
        u.full.untyped_storage().resize_(u.nbytes(u.full))
        u.pending = all_gather_single(u.full, u.shard16, group=self.group, async_op=True)

    def _wait_gathered(self, u):
        self._gather(u)
        if u.pending is not None:
            u.pending.wait()
            u.pending, u.gathered = None, True

    @staticmethod
    def _free(u):
        u.full.untyped_storage().resize_(0)
        u.gathered = False

    # -------------------------------------------------------------- the hooks
    def _before_forward(self, u, nxt):
        if u is None:
            return
        self._wait_gathered(u)
        if nxt is not None and not self.in_backward:  # (activation checkpointing: in backward)
            self._gather(nxt)

    def _after_forward(self, u, prev, out):
        if self.in_backward:
            return  # a recomputation inside backward: u stays gathered for its backward
        self._free(u)
        if torch.is_grad_enabled() and out.requires_grad:
            out.register_hook(lambda grad: self._before_backward(u, prev))

    def _after_root_forward(self, out):
        if not torch.is_grad_enabled():
            self._free(self.root)
            return
        # A pipeline stage (pipeline.py) may run several micro-batches' forwards before their
        # backwards, and the root is freed after each backward's reduce-scatter: gather it again
        # when a backward reaches the output.
        t = out[0] if isinstance(out, tuple) else out
        if t.requires_grad:
            t.register_hook(lambda grad: self._wait_gathered(self.root))

    def _before_backward(self, u, prev):
        """Runs when the gradient of u's output is ready, i.e. just before u's own backward."""
        self.in_backward = True
        self._wait_gathered(u)
        if prev is not None:
            self._gather(prev)

    def _reduce_scatter(self, u):
        super()._reduce_scatter(u)
        self._free(u)  # its backward is done: every use of the weights came before its gradients

    # -------------------------------------------------------------- the weights: whole, or a slice
    @contextlib.contextmanager
    def gathered(self):
        """Every weight whole for a while (to read or save the full model)."""
        for u in self.units:
            self._wait_gathered(u)
        try:
            yield
        finally:
            for u in self.units:
                self._free(u)

    def _publish(self):
        """The updated slices are the weights kept between gathers: nothing to gather now."""
        for u in self.units:
            if u.shard16 is not u.master:
                u.shard16.copy_(u.master)

    @staticmethod
    def weight_slice(u):
        return u.shard16

    def _held(self):
        params = sum(u.nbytes(u.shard16) + (u.nbytes(u.full) if u.gathered else 0)
                     for u in self.units)
        grads = sum(u.nbytes(u.grad_shard) for u in self.units if u.grad_shard is not None)
        return params, grads

"""The pipeline schedules under NCCL's point-to-point semantics, reproduced on CPU gloo.

NCCL: a send completes only once the peer has posted the matching receive, and a rank's operations
run in the order they were posted; the sends and receives of one dist.batch_isend_irecv are posted
together. gloo buffers sends, so a schedule that deadlocks on GPUs passes on CPU. `Rendezvous`
replaces dist.batch_isend_irecv in the test processes by NCCL's behaviour: every receive is
announced in a shared store when posted, every send waits for the announcement of its matching
receive (the n-th send from a to b matches b's n-th receive from a), and each call completes before
the next is posted. A rank that waits on a peer that waits on it (a cycle of waiting senders, stable
for half a second) raises Deadlock instead of hanging.

With grouped=False each operation of a batch is posted alone, one after the other (send first): that
is the order pipeline.py used before it grouped them, so the old order stays testable.
"""
import time
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

import pipeline
from model import PRESETS, Transformer
from tests.distributed import run_distributed
from topology import Topology

CFG = replace(PRESETS["tiny"], n_layer=4, d_model=32, n_head=4, n_kv_head=2, d_ff=64, vocab_size=64,
              block_size=8)


class Deadlock(RuntimeError):
    pass


class _Done:
    def wait(self):
        return True


class Rendezvous:
    def __init__(self, store, rank, world, prefix, grouped, timeout=60.0):
        self.store, self.rank, self.world, self.prefix = store, rank, world, prefix
        self.grouped, self.timeout = grouped, timeout
        self.n_recv, self.n_send = {}, {}
        self.batch_isend_irecv = dist.batch_isend_irecv  # the real one, which does the transfers

    def key(self, what, *parts):
        return f"{self.prefix}/{what}/" + "/".join(map(str, parts))

    def __call__(self, ops):
        works = []
        for group in [ops] if self.grouped else [[op] for op in ops]:
            for op in group:
                if op.op is dist.irecv:  # posted: its sender may go ahead
                    n = self.n_recv[op.peer] = self.n_recv.get(op.peer, -1) + 1
                    self.store.set(self.key("recv", op.peer, self.rank, n), "1")
            for op in group:
                if op.op is dist.isend:
                    n = self.n_send[op.peer] = self.n_send.get(op.peer, -1) + 1
                    self.wait_for(self.key("recv", self.rank, op.peer, n), op.peer)
            for w in self.batch_isend_irecv(group):  # the call completes before the next is posted
                w.wait()
            works += [_Done()] * len(group)  # (a gloo receive waited on twice would hang)
        return works

    def wait_for(self, key, peer):
        self.store.set(self.key("waits", self.rank), str(peer))
        start, cycle_since = time.monotonic(), None
        while not self.store.check([key]):
            cycle = self.cycle()
            cycle_since = (cycle_since or time.monotonic()) if cycle else None
            if cycle and time.monotonic() - cycle_since > 0.5:
                raise Deadlock(" -> ".join(map(str, cycle)) + " each wait to send to the next")
            if time.monotonic() - start > self.timeout:
                raise Deadlock(f"rank {self.rank} waited {self.timeout} s for rank {peer} "
                               "to post a receive")
            time.sleep(0.01)
        self.store.set(self.key("waits", self.rank), "-1")

    def cycle(self):
        """[rank, a, ..., rank] if the waiting senders form a cycle through this rank, else None."""
        path, r = [self.rank], self.rank
        for _ in range(self.world):
            k = self.key("waits", r)
            r = int(self.store.get(k)) if self.store.check([k]) else -1
            if r < 0:
                return None
            path.append(r)
            if r == self.rank:
                return path
        return None


def _stage(topo):
    torch.manual_seed(0)
    return pipeline.keep_stage(Transformer(CFG).double(), topo)


def _batches(m):
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, CFG.vocab_size, (m, 2, CFG.block_size + 1), generator=g)
    return [(s[:, :-1], s[:, 1:]) for s in seq]


def _run_cases(rank, world, store_path, cases):
    """Each case (schedule, m, grouped): one step with dist's own batch_isend_irecv (gloo: never
    blocks), then one under Rendezvous. Returns per case ("ok", |loss diff|, max |grad diff|) or
    ("deadlock", message)."""
    store = dist.FileStore(store_path, world)
    topo = Topology(pp=world)
    out = []
    for c, (schedule, m, grouped) in enumerate(cases):
        model, batches = _stage(topo), _batches(m)
        ref_loss = pipeline.run_pipeline(model, batches, topo, schedule)
        ref_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        real = dist.batch_isend_irecv
        dist.batch_isend_irecv = Rendezvous(store, rank, world, f"case{c}", grouped)
        try:
            loss = pipeline.run_pipeline(model, batches, topo, schedule)
        except Deadlock as e:
            out.append(("deadlock", str(e)))
            continue
        finally:
            dist.batch_isend_irecv = real
        diff = max((p.grad - g).abs().max().item() for p, g in zip(model.parameters(), ref_grads))
        out.append(("ok", (loss - ref_loss).abs().item(), diff))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_both_schedules_complete_under_blocking_sends(tmp_path, world):
    cases = [("1f1b", 6, True), ("gpipe", 3, True)]
    for rank_out in run_distributed(_run_cases, world, str(tmp_path / "store"), cases):
        for case, result in zip(cases, rank_out):
            assert result == ("ok", 0.0, 0.0), (world, case, result)


def test_the_old_order_deadlocks_1f1b_and_not_gpipe(tmp_path):
    """Each op posted alone, send before receive: 1F1B's steady state deadlocks on 2 stages (stage 0
    sends activation 1 before receiving gradient 0, stage 1 sends gradient 0 before receiving
    activation 1); GPipe's all-forwards-then-all-backwards order never has two neighbours sending to
    each other at once."""
    cases = [("gpipe", 3, False), ("1f1b", 3, False)]
    for rank, (gpipe, one_f_one_b) in enumerate(run_distributed(_run_cases, 2,
                                                                str(tmp_path / "store"), cases)):
        assert gpipe == ("ok", 0.0, 0.0), gpipe
        assert (one_f_one_b[0] == "deadlock"
                and one_f_one_b[1].startswith(f"{rank} -> {1 - rank} -> {rank}")), one_f_one_b

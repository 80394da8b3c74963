import pytest
import torch
import torch.distributed as dist

from topology import Topology, TopologyError, check_layout
from tests.distributed import run_distributed


def test_layout_errors_before_any_group():
    assert check_layout(8, tp=2, pp=2) == 2
    with pytest.raises(TopologyError, match="not divisible by --tp 2 x --pp 2"):
        check_layout(6, tp=2, pp=2)
    with pytest.raises(TopologyError, match="--tp must be at least 1"):
        check_layout(4, tp=0)


def _groups(rank, world):
    topo = Topology(tp=2, pp=2)
    # Each group reduces exactly its own members: sum the ranks over each axis.
    sums = {}
    for axis in ("tp", "pp", "dp"):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=getattr(topo, f"{axis}_group"))
        sums[axis] = t.item()
    return topo.dp_rank, topo.pp_rank, topo.tp_rank, topo.tp_ranks, topo.pp_ranks, topo.dp_ranks, sums


def test_eight_ranks_tensor_innermost():
    res = run_distributed(_groups, 8)
    assert res[5][:3] == (1, 0, 1)          # rank 5 = (dp 1, pp 0, tp 1)
    assert res[5][3:6] == ([4, 5], [5, 7], [1, 5])
    for rank, r in enumerate(res):
        assert r[6] == {"tp": sum(r[3]), "pp": sum(r[4]), "dp": sum(r[5])}

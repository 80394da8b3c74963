import pytest
import torch
import torch.distributed as dist

import topology
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
    return (topo.dp_rank, topo.pp_rank, topo.tp_rank,
            topo.tp_ranks, topo.pp_ranks, topo.dp_ranks, sums)


def test_eight_ranks_tensor_innermost():
    res = run_distributed(_groups, 8)
    assert res[5][:3] == (1, 0, 1)          # rank 5 = (dp 1, pp 0, tp 1)
    assert res[5][3:6] == ([4, 5], [5, 7], [1, 5])
    for rank, r in enumerate(res):
        assert r[6] == {"tp": sum(r[3]), "pp": sum(r[4]), "dp": sum(r[5])}


def _ep_groups(rank, world):
    # world 8: dp 4 per tp coordinate, ep groups from runs of 2 dp ranks
    topo = Topology(tp=2, ep=2)
    sums = {}
    for axis in ("ep", "expert_dp"):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=getattr(topo, f"{axis}_group"))
        sums[axis] = t.item()
    return topo.ep_rank, topo.expert_dp_rank, topo.ep_ranks, topo.expert_dp_ranks, sums


def test_expert_parallel_groups_come_from_the_data_parallel_ranks():
    with pytest.raises(TopologyError, match="--ep 3 does not divide the 4 data-parallel ranks"):
        check_layout(8, tp=2, ep=3)
    one = Topology()  # ep 1 (the default): no expert groups
    assert one.ep == 1 and one.ep_group is None and one.expert_dp_group is None
    res = run_distributed(_ep_groups, 8)
    # rank 5 = (dp 2, tp 1): dp group {1,3,5,7}; ep group = dp ranks {2,3} = {5,7};
    # replicas: dp {0,2} = {1,5}
    assert res[5][:4] == (0, 1, [5, 7], [1, 5])
    assert res[6][:4] == (1, 1, [4, 6], [2, 6])
    for r in res:
        assert r[4] == {"ep": sum(r[2]), "expert_dp": sum(r[3])}


def _cp_groups(rank, world):
    topo = Topology(tp=2, cp=2)  # world 8: dp 2 x cp 2 x tp 2
    sums = {}
    for axis in ("tp", "cp", "dp", "dp_cp"):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=getattr(topo, f"{axis}_group"))
        sums[axis] = t.item()
    return (topo.dp_rank, topo.cp_rank, topo.tp_rank), [topo.tp_ranks, topo.cp_ranks, topo.dp_ranks,
                                                         topo.dp_cp_ranks], sums


def test_context_parallel_sits_between_data_and_tensor():
    with pytest.raises(TopologyError, match="not divisible by --tp 2 x --pp 1 x --cp 3 = 6"):
        check_layout(8, tp=2, cp=3)
    one = Topology()  # cp 1: the gradient group is the data-parallel one
    assert one.cp == 1 and one.cp_group is None and one.dp_cp_group is one.dp_group
    res = run_distributed(_cp_groups, 8)
    # rank 5 = (dp 1, cp 0, tp 1): r = (dp_rank * cp + cp_rank) * tp + tp_rank
    assert res[5][:2] == ((1, 0, 1), [[4, 5], [5, 7], [1, 5], [1, 3, 5, 7]])
    assert res[2][0] == (0, 1, 0)
    for coords, groups, sums in res:
        assert sums == {axis: float(sum(g)) for axis, g in zip(("tp", "cp", "dp", "dp_cp"), groups)}


def _end(rank, world):
    x = torch.full((1000,), float(rank))
    dist.all_reduce(x)  # a collective whose tensors a gloo worker lets go of after it completes
    topology.end_process_group()
    kept = topology._LAST_BARRIER[-1]
    topology.end_process_group()  # a second call (the test harness makes one) does nothing
    return (dist.is_initialized(), len(topology._LAST_BARRIER), kept.is_completed(),
            x[0].item())


def test_end_process_group_keeps_the_last_barrier_and_destroys_the_group():
    """The group is gone on every rank, and the last barrier's handle is held to the end of the
    process, so no gloo worker is the one to let go of it (topology.end_process_group: why)."""
    assert run_distributed(_end, 2) == [(False, 1, True, 1.0)] * 2

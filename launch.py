"""launch.py: how a run starts under a launcher: its --out folder locked, its process group joined.

One run per folder. Two runs writing one --out would delete each other's steps and temporary folders
and lose each other's metrics.jsonl records; so rank 0 takes an exclusive lock on OUT/.lock (flock,
without waiting) before any other work, and a second run is refused in one line naming the holder.
The kernel releases the lock when its process dies, however it dies: a crash never leaves a stale
lock behind.

Restarts. `torchrun --max-restarts N` stops every worker when one dies and starts them all again.
The workers of every attempt meet in the launcher's TCP store (MASTER_ADDR:MASTER_PORT), which
outlives them, so the keys that a killed attempt left there (each rank's gloo address, the count of
the init barrier) were read by the next one as its own: a restarted rank connected to a dead rank's
port and failed, or waited for the 30-minute default timeout. Each attempt's rank 0 therefore serves
a store of its own, empty, and the group is built in it; joining gives up after --dist-timeout
seconds in one line.

Run: not on its own; training.py (lock_run) and stack.py (join_process_group) call them before any
process group exists (tests/test_launch.py kills a worker under torchrun and checks that the
restarted run continues bit for bit).
"""
import atexit
import errno
import fcntl
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from flags import ConfigError
from topology import TopologyError


_MADE = set()  # the folders lock_run made
# folder -> the open lock file: the lock lasts as long as it stays open (the process's life)
_LOCKS = {}


def lock_run(out):
    """Lock `out` for this process until it ends (an exclusive flock on OUT/.lock, not waiting), and
    write there who holds it (pid, host, start time, command line): what a second run, refused,
    names in its one line. Only rank 0 of a run takes it, so its other ranks are never refused; when
    rank 0 is, torchrun stops the others."""
    out = Path(out)
    held = _LOCKS.get(out.resolve())
    if held and (out / ".lock").exists() and os.path.samestat(os.fstat(held.fileno()),
                                                              os.stat(out / ".lock")):
        return  # this process holds it already (a second run in one Python process: the tests)
    try:
        # a start refused later (bad data, say) leaves no folder behind: release
        if not out.exists():
            _MADE.add(out.resolve())
            atexit.register(release, out)
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / ".lock", "a+")
    except OSError as e:
        raise ConfigError(f"{out / '.lock'}: {e.strerror or e}: "
                          "the run cannot lock its folder") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        # e.g. ENOLCK: a file system without locks
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            f.close()
            raise ConfigError(f"{out / '.lock'}: {e.strerror}: "
                              "the run cannot lock its folder") from None
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its name yet"
        f.close()
        raise ConfigError(f"{out} is in use by another run ({holder}): wait for it to end, or "
                          "give another --out") from None
    f.truncate(0)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}: "
            f"{' '.join(sys.argv)}\n")
    f.flush()
    _LOCKS[out.resolve()] = f
    if held:  # the folder was moved aside (--fresh) with the lock file in it: this one replaces it
        held.close()


def release(out):
    """A run refused after it locked `out` (the entry points' one-line errors; at exit too): the
    lock is let go, and the folder removed if the run made it and wrote only the lock there."""
    if out is None:
        return
    out = Path(out)
    f = _LOCKS.pop(out.resolve(), None)
    if f is None:
        return
    f.close()
    try:
        if [p.name for p in out.iterdir()] == [".lock"] and out.resolve() in _MADE:
            (out / ".lock").unlink()
            out.rmdir()
    except OSError:
        pass


def join_process_group(device, seconds):
    """init_process_group (gloo on CPU, nccl on CUDA) that a torchrun restart can repeat: under
    torchrun, in a store of this attempt's own (attempt_store); one line if the group is not whole
    within `seconds`."""
    timeout, cuda = timedelta(seconds=seconds), device.type == "cuda"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    try:
        store = (attempt_store(rank, world, timeout)
                 if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else None)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank,
                                world_size=world, timeout=timeout,
                                device_id=device if cuda else None)
    except (RuntimeError, ValueError, TimeoutError) as e:
        # (torch's DistError and gloo's errors are RuntimeErrors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopologyError(f"rank {rank} could not join the other {world - 1} rank(s) through "
                            f"{where} within --dist-timeout {timeout.total_seconds():g} s: "
                            f"{first}") from None


def attempt_store(rank, world, timeout):
    """This attempt's own TCPStore: rank 0 serves one on a free port and publishes the port in the
    launcher's store; every other rank connects to the port it reads there. A port left by a crashed
    attempt has no server behind it any more (torchrun stops every worker before it starts new
    ones): the connection is refused within a second, and the rank reads the key again until the
    live rank 0's port is there."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    launcher = dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
    if rank == 0:
        own = dist.TCPStore(addr, 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        launcher.set("launch/store_port", str(own.port))
        return own
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        try:
            own = dist.TCPStore(addr, int(launcher.get("launch/store_port")), world,
                                is_master=False, timeout=timedelta(seconds=1))
            own.set_timeout(timeout)
            return own
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)

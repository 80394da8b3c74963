"""pretrain.py with one worker killed: under torchrun, rank 1 of the first attempt kills itself
(SIGKILL, as the kernel's OOM killer or a lost node would) at the start of step 6; a restarted
attempt runs pretrain.py unchanged. It takes pretrain.py's flags:

    torchrun --nproc_per_node 2 --max-restarts 1 tests/killed_worker.py --max-steps 8 --save-every 2
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pretrain  # noqa: E402
import training  # noqa: E402

real_step = training.train_step


def step_or_die(run):
    if (run.step == 5 and os.environ["RANK"] == "1"
            and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(run)


if __name__ == "__main__":
    training.train_step = step_or_die
    pretrain.main()

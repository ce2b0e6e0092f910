"""A clean stop on SIGTERM or SIGINT: finish the step in progress, write a checkpoint, exit 143 or 130.

The handlers only take note; `StopOnSignal` acts at the next optimizer step's end, where every process of a
distributed run agrees (one all-reduce) so that they all save the same step. A second signal of the same kind stops
the process at once: the first one restores the default action, which the kernel carries out even while the
process waits in a collective.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from collections.abc import Sequence

import torch
from transformers import TrainerCallback

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Within ``with``: SIGTERM/SIGINT set `signum` (the first one received) instead of ending the process."""

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        # A launcher passes a terminal's Ctrl-C on as SIGTERM: only a repeat of the same signal stops at once.
        signal.signal(signum, signal.SIG_DFL)
        if self.signum is not None:
            return
        self.signum = signum
        if self.announce:
            name = signal.Signals(signum).name
            message = f"{name} received: finishing this step and saving a checkpoint; {name} again stops at once\n"
            os.write(2, message.encode())  # print() is not safe inside a signal handler

    def agreed(self, args) -> int | None:
        """The signal that stops the run, if any process received one (every process must call this in step)."""
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([self.signum or 0], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and self.signum is None:
                self.signum = int(flag.item())
        return self.signum


class StopOnSignal(TrainerCallback):
    """Once `GracefulStop` caught a signal: save a checkpoint at the end of the current step and stop training."""

    def __init__(self, stop: GracefulStop):
        self.stop = stop
        self.saved_step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.agreed(args):
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        # a signal that came while this checkpoint was written: it is the one to stop at
        if self.stop.agreed(args):
            control.should_training_stop = True
            self.saved_step = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.saved_step == state.global_step:
            control.should_save = False  # saved already (save_strategy epoch would write it again)


def continue_command(argv: Sequence[str], program: Sequence[str] | None = None) -> str:
    """The command that continues this run: how it was started (``program``, by default this script or comm-train,
    with the options ``argv``, under the launcher that started it), with ``--resume_from_checkpoint auto``."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--resume_from_checkpoint", "--local_rank"):
            skip = True
        elif not arg.startswith(("--resume_from_checkpoint=", "--local_rank=")):
            args.append(arg)
    if program is None:
        script = sys.argv[0]
        program = ["python", script] if script.endswith(".py") else ["comm-train"]
    program = list(program)
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        launcher = ["torchrun", "--nproc_per_node", env.get("LOCAL_WORLD_SIZE", "?")]
        program = program[1:] if program[0] == "python" else ["--no-python", *program]
    elif "LOCAL_SIZE" in env and "CROSS_SIZE" in env:  # set by the deepspeed launcher
        launcher = ["deepspeed", "--num_gpus", env["LOCAL_SIZE"]]
        if env["CROSS_SIZE"] != "1":
            launcher += ["--num_nodes", env["CROSS_SIZE"], "--hostfile", "HOSTFILE"]
        program = program[1:] if program[0] == "python" else ["--no_python", *program]
    else:
        launcher = []
    return shlex.join([*launcher, *program, *args, "--resume_from_checkpoint", "auto"])

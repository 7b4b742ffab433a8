"""The ranks of a multi-process run (torchrun; forge.distributed): rank 0 runs the Pipeline and announces each
phase it executes; every other rank `follow`s, running the same phase on the models rank 0 loaded (read back
from their checkpoints, hash-checked) with the same config and seeds, so the phase's collectives (DDP gradients,
sharded evaluation, Newton-Schulz shares) meet. What a follower computes is thrown away: its phase folder is a
scratch folder, its tracker records nothing, its console is silent; rank 0 alone saves and registers.
"""
from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path

import torch

from forge import distributed
from forge.pipeline.controller import LoadedModel, PhaseContext, PipelineError


class SilentTracker:
    """The tracker of a follower: accepts every call, records nothing."""

    def log(self, *args, **kwargs) -> None:
        return None

    def __getattr__(self, name):
        return self.log


_followers = {"in_phase": False}   # rank 0's view: are the followers running a phase's code right now?


def announce_phase(session_id: str, phase: int, config, inputs: list[LoadedModel], run_dir: Path) -> None:
    """Rank 0, before it executes `phase`: tell the followers what to run, on which models."""
    distributed.broadcast({"phase": phase, "session_id": session_id, "config": config.to_dict(),
                           "inputs": [item.record for item in inputs], "run_dir": str(run_dir)})
    _followers["in_phase"] = True


def phase_done() -> None:
    """Rank 0, after a phase's code returned: the followers finished it too and wait for the next message."""
    _followers["in_phase"] = False


def release_followers(error: str | None) -> None:
    """Rank 0, when its run or resume ends: tell the waiting followers (`error` None: success). Followers inside a
    phase that failed are not waiting: they failed with it, or died, which is what failed it."""
    if _followers["in_phase"]:
        return
    try:
        distributed.broadcast({"end": True, "error": error})
    except RuntimeError:   # a follower is gone: torchrun reports it
        pass


def stop_on_sigterm() -> None:
    """torchrun stops the other ranks with SIGTERM when one dies: raise, so rank 0 records why its session ended."""
    def handler(signum, _frame):
        raise PipelineError("stopped by torchrun (SIGTERM): another rank of this run failed or was killed")

    signal.signal(signal.SIGTERM, handler)


def follow(open_registry) -> int:
    """A follower's life: run each phase rank 0 announces until it announces the end. Returns the exit code. The
    registry (opened at the first phase, to read the input models' records) is closed however the life ends."""
    registry = None
    try:
        while True:
            message = distributed.broadcast()
            if message.get("end"):
                if message["error"]:
                    print(f"rank {distributed.launched().rank}: rank 0 ended the run: {message['error']}",
                          file=sys.stderr)
                return 1 if message["error"] else 0
            registry = registry or open_registry()
            try:
                _run_phase(message, registry)
            except Exception as error:
                raise PipelineError(f"rank {distributed.launched().rank}, phase {message['phase']}: "
                                    f"{type(error).__name__}: {distributed.explain(error)}") from error
    finally:
        if registry is not None:
            registry.close()


def _run_phase(message: dict, registry) -> None:
    from forge.pipeline.config import PipelineConfig
    from forge.pipeline.devices import training_precision
    from forge.pipeline.orchestrator import load_record, pick_device
    from forge.pipeline.phases import load_controller_class

    config, phase = PipelineConfig.model_validate(message["config"]), message["phase"]
    if config.hardware.threads:   # as rank 0's Pipeline does
        torch.set_num_threads(config.hardware.threads)
    controller = load_controller_class(phase)()
    device = distributed.local_device(pick_device(config.hardware.device))
    inputs = [load_record(record).on(device) for record in message["inputs"]]
    with tempfile.TemporaryDirectory(prefix=f"forge-rank{distributed.launched().rank}-") as scratch:
        ctx = PhaseContext(message["session_id"], phase, config, config.phase(phase), Path(message["run_dir"]),
                           Path(scratch), registry, SilentTracker(), inputs, lambda *_: None, config.seed, device)
        torch.manual_seed(config.seed + phase)
        with distributed.phase_scope(), training_precision(config.hardware.precision, device):
            controller.validate_input(ctx)
            result = controller.execute(ctx)
            controller.validate_output(result, ctx)

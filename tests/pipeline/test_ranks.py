"""forge.pipeline.ranks on a real gloo process group of 2: a follower runs what rank 0 announces, and closes the
registry it opened however its life ends."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from forge.pipeline.controller import PipelineError
from forge.pipeline.ranks import follow
from forge.registry import ModelRegistry

pytestmark = pytest.mark.distributed


def _worker(rank, init_file, out_dir, registry_path):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")     # what torchrun sets (forge.distributed.launched)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        if rank == 0:     # a phase message whose config does not validate: the follower's phase fails
            dist.broadcast_object_list([{"phase": 1, "session_id": "s", "config": {"no_such_field": 1},
                                         "inputs": [], "run_dir": out_dir}], src=0)
            return
        opened = []

        def open_registry():
            opened.append(ModelRegistry(registry_path))
            return opened[-1]
        try:
            follow(open_registry)
            outcome = "returned"
        except PipelineError as error:
            outcome = str(error)
        torch.save({"outcome": outcome, "opened": len(opened), "closed": opened[0]._conn is None},
                   os.path.join(out_dir, "follower.pt"))
    finally:
        dist.destroy_process_group()


def test_a_follower_whose_phase_fails_says_so_and_closes_its_registry(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), str(tmp_path / "registry.db")), nprocs=2,
             join=True)
    got = torch.load(tmp_path / "follower.pt")
    assert got["outcome"].startswith("rank 1, phase 1: ValidationError") and "no_such_field" in got["outcome"]
    assert got["opened"] == 1 and got["closed"]

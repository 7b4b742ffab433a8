"""Under DDP (gloo, 2 CPU processes) each rank orthogonalizes half the matrices and all-gathers:
the parameters come out as in one process, and the Newton-Schulz work is split."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import forge.optim.functional as functional
from forge.optim import MuonGrokfast, muon_param_groups

STEPS, WORLD = 3, 2


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16),
                         nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)


def train(model, optimizer, rank=0, world=1):
    for step in range(STEPS):
        x, y = data(step)
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
        optimizer.step()


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = MuonGrokfast(muon_param_groups(model), lr=0.05, adamw_lr=1e-2, grokfast_lamb=0.5)
        counted = []
        real_ns = functional.newton_schulz

        def counting_ns(G, *args, **kwargs):
            counted.append(G.shape[0] if G.dim() == 3 else 1)
            return real_ns(G, *args, **kwargs)

        functional.newton_schulz = counting_ns
        train(ddp, optimizer, rank, WORLD)
        torch.save({"params": [p.detach() for p in model.parameters()], "ns_matrices": sum(counted)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        # both ranks leave their last collective before either tears gloo down: a rank that destroyed
        # the group while its peer still talked to it aborted once in CI ("terminate called without
        # an active exception", SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    model = make_model()
    optimizer = MuonGrokfast(muon_param_groups(model), lr=0.05, adamw_lr=1e-2, grokfast_lamb=0.5)
    train(model, optimizer)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r in results:
        for p, q in zip(model.parameters(), r["params"]):
            # DDP averages per-rank gradients, one process averages one batch: rounding differs at 1e-7,
            # and Newton-Schulz amplifies it in small singular directions
            torch.testing.assert_close(q, p, rtol=1e-4, atol=2e-5)
    # Muon matrices: one 16x8, three 16x16 (padded to 4: 2 a rank), one 4x16. The lone shapes go one to
    # each rank, so each rank orthogonalizes 3 a step instead of all 5.
    assert [r["ns_matrices"] for r in results] == [STEPS * 3] * WORLD

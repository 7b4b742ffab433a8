"""FSDP2 (`fully_shard`) on real gloo process groups (2 CPU processes): the shared training loop with
hardware.distributed.fsdp trains the model DDP and one process train, and MuonGrokfast steps a DTensor-sharded
parameter (uneven rows, 1 x n, n x 1, conv-shaped, 1-D AdamW) as it steps the whole tensor."""
import contextlib
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _gloo import one_thread
from test_data_parallel import _curriculum, _rl_training, _thought_training
from torch import nn

from forge import distributed
from forge.data import CharTokenizer, evaluate, make_examples
from forge.nn import Transformer, TransformerConfig
from forge.optim import MuonGrokfast
from forge.pipeline.config import ConfigError, DistributedConfig, OptimizerConfig, load_config
from forge.pipeline.training import make_optimizer, train_on_examples

pytestmark = pytest.mark.distributed
TASKS = {"addition": 1.0, "reversal": 1.0}
WORLD = 2


def _spawn(worker, tmp_path) -> list[dict]:
    """Run `worker(rank)` on 2 gloo ranks; what each saved."""
    mp.spawn(_run_worker, args=(worker, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _run_worker(rank, worker, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))   # a rank left waiting fails instead of hanging
    try:
        torch.set_num_threads(1)
        torch.save(worker(rank), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# -- the shared training loop ---------------------------------------------------------------------

def _train(optimizer_settings: OptimizerConfig) -> dict:
    """Two train_on_examples calls sharing one optimizer (its state goes into the sharded copy and back), the
    second with an evaluation after each step (the model must hold the weights trained so far)."""
    tokenizer = CharTokenizer()
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, max_len=32))
    optimizer = make_optimizer(model, optimizer_settings, 0.01)
    train, val = make_examples(TASKS, 400, "train", 1), make_examples(TASKS, 16, "val", 1)
    first = train_on_examples(model, optimizer, train, tokenizer, steps=3, batch_size=12, max_len=32, seed=3)
    second = train_on_examples(model, optimizer, train, tokenizer, steps=2, batch_size=12, max_len=32, seed=4,
                               evaluate=lambda m: evaluate(m, val, tokenizer, 32, batch_size=8), eval_every=1)
    names = {p: name for name, p in model.named_parameters()}
    return {"losses": first.losses + second.losses, "evals": second.evals, "clips": optimizer.get_qk_clip_count(),
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "plain": all(type(p) is nn.Parameter for p in model.parameters())
            and all(type(v) is torch.Tensor for s in optimizer.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor)),
            "own_params": all(p in names for g in optimizer.param_groups for p in g["params"])
            and all(p in names for p in optimizer.state) and set(optimizer._attention_modules) <= set(model.modules()),
            "moments": {f"{names[p]}/{k}": v.clone() for p, s in optimizer.state.items() for k, v in s.items()
                        if isinstance(v, torch.Tensor)}}


PLAIN = OptimizerConfig()                                                    # tau 30: QK-clip never fires here
CLIPPING = OptimizerConfig(qk_clip_threshold=0.02, grokfast="ma")            # fires at every step; Grokfast ring


def _interrupted() -> dict:
    """A sharded_training block that steps the copy once and then raises: the model and its optimizer (state from
    one earlier step) must be left exactly as they were on entry."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=CharTokenizer().vocab_size, dim=16, n_layers=2, n_heads=2,
                                          max_len=16))
    optimizer = make_optimizer(model, PLAIN, 0.01)
    tokens = torch.randint(4, CharTokenizer().vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    model(tokens).sum().backward()
    optimizer.step()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {p: dict(s) for p, s in optimizer.state.items()}
    values = {(p, k): v.clone() for p, s in state.items() for k, v in s.items() if isinstance(v, torch.Tensor)}
    try:
        with distributed.sharded_training(model, optimizer) as sharded:
            sharded(tokens).sum().backward()
            optimizer.step()
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    return {"weights": _max_diff(weights, model.state_dict()),
            "same_state": {id(p) for p in optimizer.state} == {id(p) for p in state}
            and all(optimizer.state[p][k] is v for p, s in state.items() for k, v in s.items()),
            "state_values": max(float((optimizer.state[p][k] - v).abs().max()) for (p, k), v in values.items()),
            "own_params": {p for g in optimizer.param_groups for p in g["params"]} == set(model.parameters())
            and set(optimizer._attention_modules) <= set(model.modules())}


def _training_worker(rank) -> dict:
    out = {}
    with distributed.phase_scope():
        out["interrupted"] = _interrupted()
    for name, fsdp, settings in (("ddp", False, PLAIN), ("fsdp", True, PLAIN), ("fsdp_clip", True, CLIPPING),
                                 ("ddp_clip", False, CLIPPING)):
        distributed.init(DistributedConfig(fsdp=fsdp), torch.device("cpu"))   # stores the setting (group is up)
        with distributed.phase_scope():
            out[name] = _train(settings)
    distributed.init(DistributedConfig(), torch.device("cpu"))
    return out


@contextlib.contextmanager
def _sharded_copies(seen: list):
    """Record the class of every FSDP2 copy that forge.distributed.parallel_training trains (the real
    sharded_training runs; this only looks at what it yields)."""
    real = distributed.sharded_training

    @contextlib.contextmanager
    def looking(model, optimizer):
        with real(model, optimizer) as sharded:
            seen.append(type(sharded).__name__)
            yield sharded
    distributed.sharded_training = looking
    try:
        yield
    finally:
        distributed.sharded_training = real


def _phase_loops_worker(rank) -> dict:
    """The phases' own loops under DDP and under FSDP (test_data_parallel's cases): Phase 3's thought warm-up and
    reinforcement (its sampling on the model, synced before each step), Phase 5's climb (level checks and dreams
    on the model, synced before each check), its uniform control and Phase 6's row training."""
    out = {}
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        distributed.init(DistributedConfig(fsdp=fsdp), torch.device("cpu"))
        copies = []
        with distributed.phase_scope(), _sharded_copies(copies):
            out[name] = {"warmup": _thought_training(4), "rl": _rl_training(3), "curriculum": _curriculum(6),
                         "copies": copies}
    distributed.init(DistributedConfig(), torch.device("cpu"))
    return out


def _worker(rank) -> dict:
    """Everything the tests below read from the ranks, in one spawn (starting 2 processes costs seconds)."""
    return {"training": _training_worker(rank), "optimizer": _optimizer_worker(rank),
            "loops": _phase_loops_worker(rank)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _spawn(_worker, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def trained(ranks):
    with one_thread():
        single = {"plain": _train(PLAIN), "clip": _train(CLIPPING)}
    return single, [out["training"] for out in ranks]


def test_fsdp_training_matches_ddp_and_one_process(trained):
    single, ranks = trained
    fsdp, ddp = ranks[0]["fsdp"], ranks[0]["ddp"]
    # every rank ends with the same full weights in the original model, plain tensors, optimizer pointing at them
    for out in ranks:
        assert _max_diff(out["fsdp"]["state"], fsdp["state"]) == 0 and out["fsdp"]["losses"] == fsdp["losses"]
        assert out["fsdp"]["plain"] and out["fsdp"]["own_params"]
    assert fsdp["clips"] == ddp["clips"] == single["plain"]["clips"] == 0
    # FSDP against DDP (the same sliced batches; reduce-scatter instead of all-reduce): measured 0.0 here
    weights = _max_diff(fsdp["state"], ddp["state"])
    losses = max(abs(a - b) for a, b in zip(fsdp["losses"], ddp["losses"]))
    moments = _max_diff(fsdp["moments"], ddp["moments"])
    assert weights <= 1e-6 and losses <= 1e-6 and moments <= 1e-6, (weights, losses, moments)
    # evaluations inside the loop see the trained weights (the model is synced before each)
    assert [s for s, _ in fsdp["evals"]] == [1, 2]
    for (_, got), (_, want) in zip(fsdp["evals"], ddp["evals"]):
        assert got["accuracy"] == want["accuracy"] and got["loss"] == pytest.approx(want["loss"], abs=1e-6)
    # and against one process on the whole batch (float summation order): measured 4.4e-6 on the weights
    weights = _max_diff(fsdp["state"], single["plain"]["state"])
    assert weights <= 2e-5, f"max |FSDP - one process| = {weights:.3g}"
    assert fsdp["losses"] == pytest.approx(single["plain"]["losses"], rel=1e-5)


def test_the_phases_own_loops_train_an_fsdp_copy_that_matches_ddp(ranks):
    """With fsdp on, Phase 3's warm-up and reinforcement, Phase 5's climb and uniform control and Phase 6's rows
    train FSDP2 copies (one per loop; none under DDP) and end where DDP ends: the same losses, level checks, dreams,
    pools and weights (measured: equal; the bound allows float summation order)."""
    for out in ranks:
        ddp, fsdp = out["loops"]["ddp"], out["loops"]["fsdp"]
        # warm-up, RL, climb, the dreams _curriculum trains after it, uniform control, Phase 6's rows
        assert ddp["copies"] == [] and fsdp["copies"] == ["FSDPTransformer"] * 6
        assert fsdp["warmup"]["losses"] == pytest.approx(ddp["warmup"]["losses"], abs=1e-6)
        for got, want in zip(fsdp["rl"]["stats"], ddp["rl"]["stats"], strict=True):
            assert got == pytest.approx(want, abs=1e-6)      # the same thoughts sampled: the same rewards
        assert fsdp["rl"]["rows"] == ddp["rl"]["rows"]
        for key in ("warmup", "rl"):
            assert _max_diff(fsdp[key]["state"], ddp[key]["state"]) <= 1e-6, key
        got, want = fsdp["curriculum"], ddp["curriculum"]
        for key in ("checks", "dreams", "table", "pools", "trained", "scored"):
            assert got[key] == want[key], key
        assert len(got["checks"]) == 4 and got["dreams"][0]["kept"] == 2
        # the checks run on the model, which holds the weights trained so far (synced before each check)
        assert not torch.equal(got["at_checks"][0], got["at_checks"][-1])
        assert max(float((a - b).abs().max()) for a, b in zip(got["at_checks"], want["at_checks"], strict=True)) <= 1e-6
        for part, expected in ((got, want), (got["uniform"], want["uniform"]), (got["rows"], want["rows"])):
            assert part["losses"] == pytest.approx(expected["losses"], abs=1e-6)
            assert _max_diff(part["state"], expected["state"]) <= 1e-6
    one, other = (out["loops"]["fsdp"]["curriculum"]["state"] for out in ranks)
    assert _max_diff(one, other) == 0      # every rank ends with the same full weights


def test_an_error_inside_sharded_training_leaves_model_and_optimizer_as_on_entry(trained):
    for out in trained[1]:
        assert out["interrupted"] == {"weights": 0.0, "same_state": True, "state_values": 0.0, "own_params": True}


def test_fsdp_qk_clip_and_grokfast_ring_match_one_process(trained):
    """QK-clip on sharded q/k weights: the heads' maxima are all-reduced, so every rank scales its rows of the
    same heads as one process does; the Grokfast ring state goes into the sharded copy and back."""
    single, ranks = trained
    clip = ranks[0]["fsdp_clip"]
    assert _max_diff(ranks[1]["fsdp_clip"]["state"], clip["state"]) == 0
    assert clip["clips"] == single["clip"]["clips"] > 5          # 2 blocks x 2 heads, clipped at most steps
    weights = _max_diff(clip["state"], single["clip"]["state"])
    assert weights <= 2e-5, f"max |FSDP - one process| with QK-clip = {weights:.3g}"
    assert clip["losses"] == pytest.approx(single["clip"]["losses"], rel=1e-5)
    assert any(k.endswith("grokfast_ring") for k in clip["moments"]) and clip["plain"]


def test_ddp_qk_clip_matches_one_process(trained):
    """With DDP each rank records the logits of its own rows; the per-head maxima are all-reduced before clipping
    (also when Newton-Schulz is not shared), so the replicas clip alike and stay equal. Without the all-reduce the
    ranks clipped 21 and 20 times and drifted 5.3e-3 apart in 8 steps."""
    single, ranks = trained
    clip = ranks[0]["ddp_clip"]
    assert _max_diff(ranks[1]["ddp_clip"]["state"], clip["state"]) == 0
    assert clip["clips"] == ranks[1]["ddp_clip"]["clips"] == single["clip"]["clips"] > 5
    weights = _max_diff(clip["state"], single["clip"]["state"])
    assert weights <= 2e-5, f"max |DDP - one process| with QK-clip = {weights:.3g}"


# -- MuonGrokfast on DTensor parameters -------------------------------------------------------------

SHAPES = {"uneven": (7, 5), "row": (1, 6), "column": (6, 1), "conv": (5, 2, 3), "bias": (7,)}
SETTINGS = [{"grokfast": "ema", "foreach": True}, {"grokfast": "ma", "grokfast_window": 2, "foreach": False},
            {"grokfast": None, "nesterov": False, "weight_decay": 0.1, "distributed": "auto"}]


def _full_values(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def _stepped(settings: dict, shard, steps: int = 3, poison: bool = False):
    """Parameters (shard: tensor -> parameter) after `steps` steps of MuonGrokfast on seeded gradients; with
    `poison`, a NaN in the last row of the uneven matrix (on rank 1 only, when sharded)."""
    params = {name: nn.Parameter(shard(value)) for name, value in _full_values(0).items()}
    groups = [{"params": [params[n] for n in SHAPES if n != "bias"], "use_muon": True},
              {"params": [params["bias"]], "use_muon": False}]
    optimizer = MuonGrokfast(groups, lr=0.05, adamw_lr=0.01, ns_dtype=torch.float32, qk_clip_threshold=None,
                             **{"distributed": False, **settings})
    for step in range(steps):
        grads = _full_values(step + 1)
        if poison:
            grads["uneven"][-1, 0] = float("nan")
        for name, p in params.items():
            p.grad = shard(grads[name])
        optimizer.step()
    return params, optimizer


def _optimizer_worker(rank) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (WORLD,))

    def shard(t):
        return distribute_tensor(t, mesh, [Shard(0)])

    out = {"diff": [], "layout": []}
    for settings in SETTINGS:
        plain, _ = _stepped({**settings, "distributed": False}, lambda t: t)
        sharded, optimizer = _stepped(settings, shard)
        out["diff"].append({n: float((sharded[n].full_tensor() - plain[n]).abs().max()) for n in SHAPES})
        out["local_rows"] = {n: sharded[n].to_local().shape[0] for n in SHAPES}
        out["layout"].append(all(isinstance(v, DTensor) and v.placements == (Shard(1 if k == "grokfast_ring" else 0),)
                                 for s in optimizer.state.values() for k, v in s.items() if k != "step"
                                 and isinstance(v, torch.Tensor)))
    for skip in (False, True):
        try:
            params, optimizer = _stepped({"skip_nonfinite": skip}, shard, steps=1, poison=True)
            out[f"nan_skip={skip}"] = (optimizer.skipped_steps, float((params["bias"].full_tensor()
                                                                        - _full_values(0)["bias"]).abs().max()))
        except ValueError as error:
            out[f"nan_skip={skip}"] = str(error)
    return out


@pytest.fixture(scope="module")
def optimizer_ranks(ranks):
    return [out["optimizer"] for out in ranks]


def test_muon_grokfast_steps_a_sharded_parameter_as_the_whole_tensor(optimizer_ranks):
    for out in optimizer_ranks:
        for settings, diffs in zip(SETTINGS, out["diff"]):
            worst = max(diffs.values())
            assert worst <= 1e-6, f"{settings}: max |sharded - whole| per parameter {diffs}"
        assert all(out["layout"])                    # state: DTensors laid out like their parameters
    # the shapes really are split unevenly (7 rows: 4 + 3; one row: 1 + 0; the 1-D AdamW bias: 4 + 3)
    assert [out["local_rows"] for out in optimizer_ranks] == [
        {"uneven": 4, "row": 1, "column": 3, "conv": 3, "bias": 4},
        {"uneven": 3, "row": 0, "column": 3, "conv": 2, "bias": 3}]


def test_a_nan_on_one_ranks_shard_stops_every_rank(optimizer_ranks):
    """The NaN sits in rows only rank 1 holds; the finite check is all-reduced, so rank 0 refuses (or skips) too."""
    for out in optimizer_ranks:
        assert "non-finite gradient (NaN or Inf) in param_groups[0]['params'][0] of shape (7, 5)" in out["nan_skip=False"]
        assert out["nan_skip=True"] == (1, 0.0)      # skipped on both ranks: no parameter changed


# -- config -----------------------------------------------------------------------------------------

def test_fsdp_setting_is_a_validated_bool_that_init_stores():
    assert load_config().hardware.distributed.fsdp is False
    assert load_config(overrides=["hardware.distributed.fsdp=true"]).hardware.distributed.fsdp is True
    for value, shown in (("maybe", "'maybe' (str)"), ("1", "1 (int)"), ("null", "null (NoneType)")):
        with pytest.raises(ConfigError) as info:
            load_config(overrides=[f"hardware.distributed.fsdp={value}"])
        assert f"hardware.distributed.fsdp: expected true or false, got {shown}" in str(info.value).splitlines()
    with pytest.raises(ConfigError, match="hardware.distributed.fsdb: unknown key"):
        load_config(overrides=["hardware.distributed.fsdb=true"])
    try:
        distributed.init(DistributedConfig(fsdp=True), torch.device("cpu"))    # one process: stores, joins nothing
        assert distributed._state["fsdp"] is True and not dist.is_initialized()
    finally:
        distributed.init(DistributedConfig(), torch.device("cpu"))
    assert distributed._state["fsdp"] is False


def test_the_repeated_blocks_are_a_transformers_blocks():
    model = Transformer(TransformerConfig(vocab_size=20, dim=16, n_layers=3, n_heads=2, max_len=8))
    assert distributed.repeated_blocks(model) == list(model.blocks)

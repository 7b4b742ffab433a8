"""forge.distributed on real gloo process groups (2 and 3 CPU processes): a batch split over ranks trains the model
one process trains on the whole batch, sharded evaluation counts what one process counts, and nothing is split
outside `phase_scope`."""
import contextlib
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _gloo import one_thread

from forge import distributed
from forge.baking import PromptBaker
from forge.data import CharTokenizer, evaluate, make_examples
from forge.nn import Transformer, TransformerConfig
from forge.nn.losses import KLRegularizer
from forge.pipeline.config import OptimizerConfig, load_config
from forge.pipeline.phases.phase3_quietstar.rl_thoughts import ThoughtTrainer
from forge.pipeline.phases.phase3_quietstar.thought_warmup import warm_up_thoughts
from forge.pipeline.phases.phase3_quietstar.thoughts import ThoughtIds, sample_thoughts, thought_token_names
from forge.pipeline.phases.phase5_curriculum.climb import Climber, train_uniform
from forge.pipeline.phases.phase5_curriculum.curriculum import HINT, accuracy_table
from forge.pipeline.phases.phase6_baking.toolformer import train_rows
from forge.data.levels import level_examples
from forge.data.batching import prompt_ids
from forge.data.sampling import sample_answers
from forge.data.tools import add_tool_tokens, answer_with_tool, encode_rows, generate, sequence
from forge.nn.svf import add_svf, expert_of
from forge.pipeline.phases.phase7_experts.training import train_expert
from forge.pipeline.phases.phase8_compression.finetune import distill, teacher_targets
from forge.pipeline.phases.phase8_compression.stages import seedlm_stage, vptq_stage
from forge.pipeline.training import make_optimizer, train_on_examples

pytestmark = pytest.mark.distributed
TASKS = {"addition": 1.0, "reversal": 1.0}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("count", [0, 1, 2, 5, 64, 65])
def test_slices_of_the_ranks_cover_every_item_once(world, count):
    slices = [distributed.World(rank, world).slice_of(count) for rank in range(world)]
    items = [i for s in slices for i in range(count)[s]]
    assert items == list(range(count))
    assert max(len(range(count)[s]) for s in slices) - min(len(range(count)[s]) for s in slices) <= 1


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=CharTokenizer().vocab_size, dim=32, n_layers=2, n_heads=2,
                                         max_len=32))


def _oracle(tokens: torch.Tensor) -> torch.Tensor:
    """Logits that answer right exactly on the rows whose token ids sum to an even number (about half of each
    task's rows): predicts the next token, or the one after it in the vocabulary."""
    vocab = CharTokenizer().vocab_size
    nxt = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
    wrong = (tokens.sum(1, keepdim=True) % 2 == 1).long()
    return torch.nn.functional.one_hot((nxt + wrong) % vocab, vocab).float() * 5.0


def _train_and_evaluate(steps: int) -> dict:
    """A few steps of the pipeline's shared training loop and one evaluation, as a phase would run them."""
    tokenizer, model = CharTokenizer(), _model()
    train = make_examples(TASKS, 400, "train", 1)
    val = make_examples(TASKS, 37, "val", 1)   # 37: not a multiple of 2 or 3 ranks
    optimizer = make_optimizer(model, OptimizerConfig(), 0.01)
    log = train_on_examples(model, optimizer, train, tokenizer, steps=steps, batch_size=12, max_len=32, seed=3)
    return {"losses": log.losses, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "eval": evaluate(model, val, tokenizer, 32, batch_size=8),
            "oracle": evaluate(_oracle, val, tokenizer, 32, batch_size=8)}


def _thought_training(steps: int) -> dict:
    """Phase 3's warm-up (two batches a step: with thoughts and plain) on a model with the thought tokens."""
    tokenizer = CharTokenizer()
    tokenizer.add_special_tokens(thought_token_names(6))
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, max_len=40))
    losses = warm_up_thoughts(model, make_optimizer(model, OptimizerConfig(), 0.01),
                              make_examples(TASKS, 200, "train", 2), tokenizer, ThoughtIds.from_tokenizer(tokenizer),
                              steps=steps, batch_size=10, plain_weight=0.5, seed=4)
    return {"losses": losses, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _rl_training(steps: int) -> dict:
    """Phase 3's reinforcement (ThoughtTrainer) with a KL term to a frozen copy: 5 inputs (uneven over 2 and 3
    ranks), 2 sampled thoughts each."""
    tokenizer = CharTokenizer()
    tokenizer.add_special_tokens(thought_token_names(6))
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, max_len=40))
    cfg = load_config(overrides=["phases.phase3.batch_size=5", "phases.phase3.num_thoughts=2",
                                 "phases.phase3.thought_length=4"]).phases.phase3
    trainer = ThoughtTrainer(model, make_optimizer(model, OptimizerConfig(), 0.01),
                             KLRegularizer(copy.deepcopy(model).eval(), 0.1), make_examples(TASKS, 200, "train", 5),
                             tokenizer, ThoughtIds.from_tokenizer(tokenizer), cfg, seed=6)
    trained = []   # rows of the training forwards (sampling runs in eval mode)
    model.register_forward_pre_hook(lambda module, args, kwargs: trained.append(_sequences(args[0], kwargs))
                                    if module.training else None, with_kwargs=True)
    with trainer.training():
        stats = [trainer.step() for _ in range(steps)]
    return {"stats": stats, "state": {k: v.clone() for k, v in model.state_dict().items()}, "rows": sum(trained)}


def _tool_model() -> tuple[CharTokenizer, Transformer]:
    tools = CharTokenizer()
    add_tool_tokens(tools)
    torch.manual_seed(0)
    return tools, Transformer(TransformerConfig(vocab_size=tools.vocab_size, dim=32, n_layers=2, n_heads=2, max_len=32))


def _expert_base() -> dict:
    """The weights of a model that answers about 70% of 1-digit additions (so sampled answers earn both rewards)."""
    tools, model = _tool_model()
    examples = level_examples("addition", 1, 400, "train", 0)
    train_on_examples(model, make_optimizer(model, OptimizerConfig(), 0.01), examples, tools, steps=200,
                      batch_size=32, max_len=32, seed=1)
    return model.state_dict()


def _experts(base_state: dict) -> dict:
    """Phase 7's expert training, both methods, with the KL term to the base on: batches of 5 (uneven over 2 and 3
    ranks), and cross-entropy on batches of 2 too (rank 0 of 3 has no rows: its KL share is a zero on the graph);
    training rows counted (the forwards with gradients; sampling runs without)."""
    tools, base = _tool_model()
    base.load_state_dict(base_state)
    base.eval()
    cfg = load_config(overrides=["phases.phase7.svf_steps=4", "phases.phase7.eval_every=2",
                                 "phases.phase7.svf_lr=0.05"]).phases.phase7
    optimizer = cfg.optimizer.model_copy(update={"kl_coefficient": 0.1})
    train, val = level_examples("addition", 1, 40, "train", 9), level_examples("addition", 1, 10, "val", 9)
    out = {}
    for name, method, batch in (("reinforce", "reinforce", 5), ("cross_entropy", "cross_entropy", 5),
                                ("cross_entropy_few", "cross_entropy", 2)):
        cfg = cfg.model_copy(update={"optimizer": optimizer, "svf_batch_size": batch})
        svf, trained, losses = add_svf(base, 8), [], []
        svf.register_forward_pre_hook(lambda module, args: trained.append(args[0].shape[0])
                                      if torch.is_grad_enabled() else None)
        got = train_expert(svf, base, train, val, tools, cfg, method=method, seed=3,
                           true_rows=lambda exs: encode_rows([sequence(ex, tools) for ex in exs], tools.pad_id, 32),
                           on_step=lambda step, loss, reward: losses.append(loss))
        out[name] = {"expert": {n: z.clone() for n, z in expert_of(svf).items()}, "rewards": got["rewards"],
                     "losses": losses, "trained": sum(trained), "val": got["val_accuracy"], "batch": batch}
    return out


def _tool_answers(base_state: dict) -> dict:
    """Greedy answers with the calculator to 13 questions, through a plain callable (decoded by re-reading the
    batch, so its first call holds every row this process answers)."""
    tools, model = _tool_model()
    model.load_state_dict(base_state)
    fed = []

    def plain(tokens):
        fed.append(tokens.shape[0])
        return model.eval()(tokens)
    outs = answer_with_tool(plain, level_examples("addition", 1, 13, "test", 4), tools, 32)
    return {"answers": [(o.ids, o.closed, o.calls, o.errors) for o in outs], "rows": fed[0] if fed else 0}


def _distilled(base_state: dict, batch: int) -> dict:
    """Phase 8's distillation: a fresh model learns the trained one's answers (teacher_targets: its own greedy
    answers and logits, rows of the teacher's logit pass counted) in batches of `batch`, training rows counted."""
    tools, teacher = _tool_model()
    teacher.load_state_dict(base_state)
    teacher_rows = []
    teacher.register_forward_pre_hook(lambda module, args: teacher_rows.append(args[0].shape[0]))
    targets = teacher_targets(teacher, level_examples("addition", 1, 30, "train", 5), tools, 32)
    _, student = _tool_model()
    trained = []
    student.register_forward_pre_hook(lambda module, args: trained.append(args[0].shape[0]))
    losses = distill(student, list(student.parameters()), targets, steps=4, batch_size=batch, lr=0.01, seed=6)
    return {"losses": losses, "trained": sum(trained), "batch": batch, "teacher_rows": teacher_rows,
            "logits": targets[2],
            "state": {k: v.clone() for k, v in student.state_dict().items()}}


def _rows_fed(model, calls: list) -> None:
    """Record the rows of every forward pass of `model` (forward and the key/value-cached forward_at)."""
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    plain_at = model.forward_at
    model.forward_at = lambda tokens, *rest: calls.append(tokens.shape[0]) or plain_at(tokens, *rest)


@contextlib.contextmanager
def _layouts(counted: list):
    """Count forge.distributed.split_layout's calls (an all-reduce each on several ranks; the real one runs)."""
    real = distributed.split_layout

    def counting(*args):
        counted.append(args)
        return real(*args)
    distributed.split_layout = counting
    try:
        yield
    finally:
        distributed.split_layout = real


def _samplers(base_state: dict) -> dict:
    """The three samplers split over the ranks (split=True) at temperature 1: answers with the tool (7 and 2
    prompts: rank 0 of 3 holds none of the 2), answers without it (7) and thoughts (7 rows); per case the samples,
    the generator's state after and the rows of every forward pass."""
    out = {}
    for name, count in (("tool", 7), ("tool_few", 2), ("answers", 7)):
        tools, model = _tool_model()
        model.load_state_dict(base_state)
        examples, generator, calls, layouts = level_examples("addition", 1, count, "test", 11), torch.Generator(), [], []
        generator.manual_seed(5)
        _rows_fed(model, calls)
        with _layouts(layouts):
            if name == "answers":
                got = [(a.ids, a.closed, a.logprob) for a in sample_answers(
                    model, examples, tools, 32, temperature=1.0, max_new=6, generator=generator, split=True)]
            else:
                got = [(o.ids, o.closed, o.calls) for o in generate(
                    model, [prompt_ids(ex, tools) for ex in examples], tools, 32, temperature=1.0,
                    generator=generator, split=True)]
        out[name] = {"samples": got, "state": generator.get_state(), "rows": calls, "count": count,
                     "layouts": len(layouts)}
    tokenizer = CharTokenizer()
    tokenizer.add_special_tokens(thought_token_names(6))
    torch.manual_seed(0)
    thinker, calls = Transformer(TransformerConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2,
                                                   max_len=40)), []
    _rows_fed(thinker, calls)
    ids, generator = ThoughtIds.from_tokenizer(tokenizer), torch.Generator().manual_seed(6)
    prefixes = torch.tensor([prompt_ids(ex, tokenizer) + [ids.think]
                             for ex in level_examples("addition", 1, 7, "test", 12)])
    layouts = []
    with _layouts(layouts):
        got = sample_thoughts(thinker.eval(), prefixes, ids, 4, 1.0, generator, split=True)
    out["thoughts"] = {"samples": got, "state": generator.get_state(), "rows": calls, "count": 7,
                       "layouts": len(layouts)}
    return out


def _baked(base_state: dict, batch: int) -> dict:
    """A prompt bake (peft LoRA, trajectories of 4 tokens, 3 AdamW steps) in batches of `batch`: its training and
    held-out KL, the merged weights, and the rows of the forward passes with gradients (the student's training)
    and without (the teacher's sampling, the held-out KL)."""
    tools, model = _tool_model()
    model.load_state_dict(base_state)
    trained, sampled = [], []
    model.register_forward_pre_hook(lambda module, args: (trained if torch.is_grad_enabled() else sampled).append(
        args[0].shape[0]))    # wrap_lora's copy keeps the hook
    pool = torch.tensor([prompt_ids(ex, tools) for ex in level_examples("addition", 1, 20, "train", 13)])
    torch.manual_seed(1)    # the LoRA factors' initialization
    baker = PromptBaker(model, rank=4, steps=3, batch_size=batch, traj_len=4, eval_every=2, eval_size=6, seed=3)
    result = baker.bake(torch.tensor([tools.encode("add:")]), pool)
    return {"train_kl": result.train_kl, "curve": result.kl_curve, "trained": sum(trained), "batch": batch,
            "sampled": sum(sampled), "kl_after": result.kl_after,
            "state": {k: v.clone() for k, v in result.model.state_dict().items()}}


def _sequences(tokens: torch.Tensor, kwargs: dict) -> int:
    """Sequences in a forward's rows: one a row, or the segments of packed rows (forge.data.pack_batch)."""
    segments = kwargs.get("segments")
    return tokens.shape[0] if segments is None else len(set(segments.flatten().tolist()) - {-1})


def _curriculum(steps: int) -> dict:
    """Phase 5's climb (batches of 7, a level check every 3 steps), a passed level's dreams (a batch of 2: none for
    rank 0 of 3), its uniform control and its accuracy table (rows scored counted), and Phase 6's row training
    (batches of 9)."""
    tokenizer = CharTokenizer()
    tokenizer.add_special_tokens([HINT])
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, max_len=40)
    model = Transformer(config)
    uniform, trained = copy.deepcopy(model), []
    model.register_forward_pre_hook(lambda module, args, kwargs: trained.append(_sequences(args[0], kwargs))
                                    if module.training else None, with_kwargs=True)
    settings = {"steps": steps, "batch_size": 7, "num_levels": 3, "eval_every": 3, "val_questions": 9,
                "questions_per_level": 20, "dream_questions": 5, "dream_min_confidence": 0.0}
    cfg = load_config(overrides=[f"phases.phase5.{key}={value}" for key, value in settings.items()]).phases.phase5
    at_checks = []      # the head's weights the model holds at each level check
    climber = Climber(model, make_optimizer(model, OptimizerConfig(), 0.01), tokenizer, 40,
                      {"addition": 1, "reversal": 2}, cfg, seed=7,
                      on_check=lambda check: at_checks.append(model.head.weight.detach().clone()))
    climber.run()
    climber.cfg = cfg.model_copy(update={"steps": steps + 1})   # room for one more step: the dreams' batch
    with distributed.parallel_training(model, climber.optimizer) as (climber.net, _):   # as inside run()
        climber._consolidate(climber.climbs["addition"])    # dreams: sampled alike on every rank, trained in one batch
    scored, climbed = [], sum(trained)
    hook = model.register_forward_pre_hook(lambda module, args: scored.append(args[0].shape[0]))
    table = accuracy_table(model, ["addition", "reversal"], 3, 11, "test", 7, tokenizer, 40)
    hook.remove()
    pools = [(p.task, p.level, [(q.example.prompt, q.asked, q.streak) for q in p.active + p.retired])
             for p in climber.pools]
    climb = {"losses": climber.log.losses, "checks": climber.log.checks, "dreams": climber.log.dreams,
             "state": {k: v.clone() for k, v in model.state_dict().items()}, "table": table, "scored": sum(scored),
             "trained": climbed, "pools": pools, "at_checks": at_checks}
    losses = train_uniform(uniform, make_optimizer(uniform, OptimizerConfig(), 0.01), tokenizer, 40, ["addition"], cfg,
                           7, steps)
    climb["uniform"] = {"losses": losses, "state": {k: v.clone() for k, v in uniform.state_dict().items()}}
    tools, tool = _tool_model()
    rows = [sequence(ex, tools) for ex in make_examples(TASKS, 50, "train", 8)]
    losses = train_rows(tool, make_optimizer(tool, OptimizerConfig(), 0.01), rows, tools, 32, steps=steps,
                        batch_size=9, seed=2, what="rows")
    climb["rows"] = {"losses": losses, "state": {k: v.clone() for k, v in tool.state_dict().items()}}
    return climb


def _everything(expert_base: dict) -> dict:
    return {**_train_and_evaluate(steps=6), "thoughts": _thought_training(steps=4), "rl": _rl_training(3),
            "curriculum": _curriculum(6), "experts": _experts(expert_base), "answers": _tool_answers(expert_base),
            "distilled": [_distilled(expert_base, 5), _distilled(expert_base, 2)], "samplers": _samplers(expert_base),
            "baked": [_baked(expert_base, 5), _baked(expert_base, 2)]}


def _shares(rank: int) -> dict:
    """ranks_mean of each rank's number, and rank_share_mean of a mean over no items (NaN: torch's mean of nothing),
    which must be a zero on the graph (a zero gradient), not NaN."""
    nothing = torch.zeros(0, requires_grad=True)
    share = distributed.rank_share_mean(nothing.mean(), 0, 5)
    share.backward()
    return {"mean": distributed.ranks_mean(torch.tensor(float(rank + 1))), "share": share.item(),
            "grad": nothing.grad is not None and bool(torch.isfinite(nothing.grad).all())}


def _worker(rank, world, init_file, out_dir, base_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        outside = distributed.world()
        with distributed.phase_scope() as inside:
            result = {**_everything(torch.load(base_file)), "shares": _shares(rank)}
            try:
                train_on_examples(_model(), make_optimizer(_model(), OptimizerConfig(), 0.01),
                                  make_examples(TASKS, 10, "train", 1), CharTokenizer(), steps=1,
                                  batch_size=world - 1, max_len=32, seed=0)
                small_batch = "accepted"
            except ValueError as error:
                small_batch = str(error)
        torch.save({**result, "outside": outside, "inside": inside, "small_batch": small_batch},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process's results, and the file of Phase 7's base weights (trained once, loaded by every rank)."""
    base_file = tmp_path_factory.mktemp("expert") / "base.pt"
    with one_thread():
        torch.save(_expert_base(), base_file)
        return {**_everything(torch.load(base_file)), "base_file": str(base_file)}


def _samplers_match(ranks: list[dict], single: dict) -> None:
    """Split sampling: every rank ends with one process's samples and generator state, no forward pass of a rank
    holds more rows than its share of the batch (a rank sampling the whole batch fails this), and the samplers that
    draw every row at every step find the rows' layout once a call (one all-reduce, not one per token)."""
    for name, expected in single["samplers"].items():
        count = expected["count"]
        assert max(expected["rows"]) == count, name
        for rank, out in enumerate(ranks):
            got = out["samplers"][name]
            share = len(range(count)[distributed.World(rank, len(ranks)).slice_of(count)])
            assert max(got["rows"], default=0) == share, (name, rank)
            assert torch.equal(got["state"], expected["state"]), name
            # where each rank's rows sit is found once a call where every step draws every row (answers, thoughts);
            # generate draws for the live rows only, so it finds them every step
            assert got["layouts"] == 1 if name in ("answers", "thoughts") else got["layouts"] > 1, (name, got["layouts"])
            if name == "answers":   # log-probabilities summed from other batches' logits
                assert [a[:2] for a in got["samples"]] == [a[:2] for a in expected["samples"]]
                assert [a[2] for a in got["samples"]] == pytest.approx([a[2] for a in expected["samples"]], rel=1e-5)
            else:
                assert got["samples"] == expected["samples"], name
    assert len({tuple(ids) for ids, _, _ in single["samplers"]["tool"]["samples"]}) > 1     # really sampled


def _bakes_match(ranks: list[dict], single: dict) -> None:
    """Prompt baking: each rank samples and trains its share of every batch of 5 (a batch of 2 on 3 ranks: all of
    it on every rank); the same KLs and merged weights as one process."""
    for index, expected in enumerate(single["baked"]):
        got = ranks[0]["baked"][index]
        split = expected["batch"] >= len(ranks)
        assert sum(r["baked"][index]["trained"] for r in ranks) == expected["trained"] * (1 if split else len(ranks))
        assert expected["trained"] == 3 * expected["batch"]
        if split:   # the teacher's trajectories and the held-out KL: each rank its share of the rows (the prompt's
            # key/value cache, one row, every rank computes)
            assert sum(r["baked"][index]["sampled"] for r in ranks) == expected["sampled"] + len(ranks) - 1
        for other in ranks:
            assert other["baked"][index]["train_kl"] == got["train_kl"] and other["baked"][index]["curve"] == got["curve"]
        assert got["train_kl"] == pytest.approx(expected["train_kl"], rel=1e-4)
        assert [kl for _, kl in got["curve"]] == pytest.approx([kl for _, kl in expected["curve"]], rel=1e-4)
        assert got["kl_after"] == pytest.approx(expected["kl_after"], rel=1e-4)
        assert expected["curve"][-1][1] < expected["curve"][0][1]      # the bake moved the model
        for name, value in got["state"].items():   # AdamW: near-zero gradients amplify the summation order
            torch.testing.assert_close(value, expected["state"][name], rtol=1e-4, atol=5e-5,
                                       msg=lambda text, name=name: f"{name}: {text}")


def _phases_5_to_8_match(ranks: list[dict], single: dict) -> None:
    out = ranks[0]
    # Phases 5 and 6: every rank trains its slice of each batch and gets every row's greedy-exact flag, so the
    # pools, the level checks and the dreams agree on all ranks and with one process; the accuracy table scores
    # each question on one rank only (2 tasks x 3 levels x 11 questions), each training row is trained on one rank
    cur, one = out["curriculum"], single["curriculum"]
    assert len(cur["checks"]) == 4 and cur["dreams"][0]["kept"] == 2
    assert sum(r["curriculum"]["scored"] for r in ranks) == one["scored"] == 66
    assert sum(r["curriculum"]["trained"] for r in ranks) == one["trained"] == 6 * 7 + 2
    for other in ranks:
        mine = other["curriculum"]
        for key in ("losses", "checks", "dreams", "table", "pools"):
            assert mine[key] == cur[key], key
        for got, expected in ((mine, cur), (mine["uniform"], cur["uniform"]), (mine["rows"], cur["rows"])):
            assert got["losses"] == expected["losses"]
            assert all(torch.equal(value, expected["state"][name]) for name, value in got["state"].items())
    for key in ("checks", "dreams", "table", "pools"):
        assert cur[key] == one[key], key
    for got, expected in ((cur, one), (cur["uniform"], one["uniform"]), (cur["rows"], one["rows"])):
        assert got["losses"] == pytest.approx(expected["losses"], rel=1e-4)
        for name, value in got["state"].items():
            torch.testing.assert_close(value, expected["state"][name], rtol=1e-4, atol=1e-4, msg=name)
    # Phase 7: both methods train each rank's slice of every batch (REINFORCE on the same sampled answers), the
    # same z-vectors, rewards and reported losses as one process
    for method, expected in single["experts"].items():
        got = out["experts"][method]
        assert sum(r["experts"][method]["trained"] for r in ranks) == expected["trained"] == 4 * expected["batch"]
        if method == "reinforce":   # batches answered partly right: the policy term has a gradient
            assert any(-1 < r < 1 for r in expected["rewards"]) and got["rewards"] == expected["rewards"]
        for other in ranks:
            assert other["experts"][method]["losses"] == got["losses"]
            assert all(torch.equal(z, got["expert"][n]) for n, z in other["experts"][method]["expert"].items())
        assert got["losses"] == pytest.approx(expected["losses"], rel=1e-4)
        assert any(not torch.equal(z, torch.ones_like(z)) for z in expected["expert"].values())
        for name, z in got["expert"].items():
            torch.testing.assert_close(z, expected["expert"][name], rtol=1e-4, atol=1e-5, msg=f"{method} {name}")
    # answers with the tool: each rank decodes its share of the questions, every rank gets all the answers
    assert sum(r["answers"]["rows"] for r in ranks) == single["answers"]["rows"] == 13
    assert all(r["answers"]["answers"] == single["answers"]["answers"] for r in ranks)
    assert sum(closed for _, closed, _, _ in single["answers"]["answers"]) >= 10
    # Phase 8's distillation: each rank its slice of every batch of 5 (and of 2: none for rank 0 of 3), the KL
    # weighted by its answer positions
    for index, expected in enumerate(single["distilled"]):
        got = out["distilled"][index]
        assert sum(r["distilled"][index]["trained"] for r in ranks) == expected["trained"] == 4 * expected["batch"]
        # the teacher's logits: each rank runs its share of the 30 rows, every rank gets them all
        assert sum(r["distilled"][index]["teacher_rows"][0] for r in ranks) == expected["teacher_rows"][0] == 30
        for other in ranks:
            assert len(other["distilled"][index]["teacher_rows"]) == 1
            torch.testing.assert_close(other["distilled"][index]["logits"], expected["logits"], rtol=1e-5, atol=1e-5)
        assert all(r["distilled"][index]["losses"] == got["losses"] for r in ranks)
        assert got["losses"] == pytest.approx(expected["losses"], rel=1e-4)
        for name, value in got["state"].items():   # AdamW normalizes each step: an entry with a near-zero gradient
            # amplifies the summation order (measured 1.9e-5 on 1 of 1024 entries with batches of 2 on 3 ranks)
            torch.testing.assert_close(value, expected["state"][name], rtol=1e-4, atol=5e-5,
                                       msg=lambda text, name=name: f"{name}, batch {expected['batch']}: {text}")


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_sharing_every_batch_train_the_model_one_process_trains(tmp_path, single, world):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), single["base_file"]), nprocs=world,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for rank, out in enumerate(ranks):
        assert out["outside"] == distributed.SINGLE          # no collectives outside a phase
        assert out["inside"] == distributed.World(rank, world)
        assert f"smaller than the {world} ranks" in out["small_batch"]
        assert out["shares"] == {"mean": (world + 1) / 2, "share": 0.0, "grad": True}
        # every rank holds the same model (DDP averaged the same gradients) and reports the same numbers
        for name, value in out["state"].items():
            assert torch.equal(value, ranks[0]["state"][name]), name
        assert out["losses"] == ranks[0]["losses"] and out["eval"] == ranks[0]["eval"]
        assert out["oracle"] == ranks[0]["oracle"]
    out = ranks[0]
    # the same global batches as one process: equal up to float summation order (each rank training on the whole
    # batch, or on its slice without the rescaling, fails this already at the losses)
    assert out["losses"] == pytest.approx(single["losses"], rel=1e-4)
    for name, value in out["state"].items():
        torch.testing.assert_close(value, single["state"][name], rtol=1e-4, atol=1e-5, msg=name)
    # Phase 3's warm-up: both batches of a step in one forward pass per rank, the same model as one process
    assert out["thoughts"]["losses"] == pytest.approx(single["thoughts"]["losses"], rel=1e-4)
    for name, value in out["thoughts"]["state"].items():
        assert torch.equal(value, ranks[-1]["thoughts"]["state"][name]), name
        torch.testing.assert_close(value, single["thoughts"]["state"][name], rtol=1e-4, atol=1e-5, msg=name)
    # Phase 3's reinforcement: the same sampled thoughts on every rank, each training its inputs' share (the rows
    # of its training forwards add up to one process's); the same model and the same reported losses and rewards
    # as one process (a share without the rescaling fails this at the first step's losses: 5 inputs split unevenly)
    assert sum(r["rl"]["rows"] for r in ranks) == single["rl"]["rows"] == 3 * (5 * 2 + 5)
    for other in ranks:
        assert other["rl"]["stats"] == out["rl"]["stats"]
        for name, value in other["rl"]["state"].items():
            assert torch.equal(value, out["rl"]["state"][name]), name
    for got, expected in zip(out["rl"]["stats"], single["rl"]["stats"]):
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)   # policy_loss ~1e-2 is a difference of ~1e1s
    for name, value in out["rl"]["state"].items():   # AdamW and Muon normalize each step, so entries with near-zero
        # gradients (embedding rows the batch hardly uses) amplify the summation order: measured 2.5e-5 on 2 of 1856
        # embedding entries (the policy and KL shares left unscaled fail the reported losses above: checked)
        torch.testing.assert_close(value, single["rl"]["state"][name], rtol=1e-4, atol=2e-4,
                                   msg=lambda text, name=name: f"{name}: {text}")
    _phases_5_to_8_match(ranks, single)
    _samplers_match(ranks, single)
    _bakes_match(ranks, single)
    # sharded evaluation counts every held-out question once, per task
    assert out["eval"]["loss"] == pytest.approx(single["eval"]["loss"], rel=1e-4)
    oracle, expected = out["oracle"], single["oracle"]
    assert 0.2 < expected["per_task_accuracy"]["addition"] < 0.8 and 0.2 < expected["accuracy"] < 0.8
    assert oracle["n"] == expected["n"] == 37
    assert oracle["per_task_accuracy"] == expected["per_task_accuracy"]
    assert oracle["accuracy"] == expected["accuracy"]
    assert oracle["loss"] == pytest.approx(expected["loss"], rel=1e-6)   # float32 sums over other batches


def _compressed() -> dict:
    """Phase 8's SeedLM and VPTQ stages of a small model, as their files would store them."""
    cfg = load_config(overrides=["phases.phase8.seedlm_seeds=256", "phases.phase8.vptq_kmeans_iters=4"]).phases.phase8
    model, quiet = _model().eval(), lambda *_: None
    tokens = torch.randint(4, CharTokenizer().vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    first = seedlm_stage(model, cfg.preserve_layers, cfg, quiet)
    second = vptq_stage(first, cfg.preserve_layers, cfg, tokens, quiet)
    return {f"{i}/{k}": v.clone() for i, stage in enumerate((first, second)) for k, v in stage.state_dict().items()}


def _compress_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        with distributed.phase_scope():
            torch.save(_compressed(), os.path.join(out_dir, f"codes{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_phase8_searches_split_over_ranks_store_the_bytes_one_process_stores(tmp_path):
    with one_thread():
        single = _compressed()
    mp.spawn(_compress_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        split = torch.load(tmp_path / f"codes{rank}.pt")
        assert sorted(split) == sorted(single)
        for key, value in split.items():
            assert torch.equal(value, single[key]), key

"""Phase 4 (BitNet b1.58) on a small trained Transformer, through a real registry record and checkpoint:
the packed file on disk is several times smaller than the fp32 one, the reported accuracies are real
evaluations, STE fine-tuning moves the latent weights and lowers the ternary model's loss, and the
dequantized model handed on rebuilds from its metadata and matches the packed model up to the int8
activation rounding."""
import copy
from pathlib import Path

import pytest
import torch

from forge.cli import main as forge_main
from forge.data import CharTokenizer, evaluate, make_examples
from forge.nn import build_model
from forge.ops import ste_act_int8
from forge.nn.quantize import bit_layers, freeze_all, to_bitlinear
from forge.pipeline.config import Phase4Config, load_config
from forge.pipeline.controller import HandoffError, LoadedModel, PhaseContext
from forge.pipeline.phases.phase4_bitnet import BitNetPhase
from forge.pipeline.training import make_optimizer, train_on_examples
from forge.registry import ModelRegistry, load_checkpoint, new_session_id, save_checkpoint
from forge.tracking import Tracker

from _small_model import small_trained_model

TASKS = {"reversal": 1.0, "sorting": 1.0}
SMALL = ("wandb.mode=disabled", "phases.phase4.train_examples=1000", "phases.phase4.eval_examples=96",
         "phases.phase4.calibration_samples=32", "phases.phase4.fine_tune_steps=30", "phases.phase4.batch_size=32",
         "phases.phase4.max_accuracy_drop=1.0")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dim-64 two-layer Transformer trained briefly on reversal/sorting, saved and registered."""
    root = tmp_path_factory.mktemp("phase4")
    model, tokenizer = small_trained_model(TASKS, examples=1000, steps=60)
    meta = {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(), "task_weights": TASKS}
    registry = ModelRegistry(root / "registry.db")
    session = registry.create_session(new_session_id("p4"), {})
    path = root / "input.safetensors"
    save_checkpoint(model.state_dict(), path, meta)
    model_id = registry.register_model(session, "evomerge", "champion", path, meta, phase=2)
    yield root, registry, LoadedModel(model, registry.get_model(model_id), meta)
    registry.close()


def _context(root, registry, inputs, *overrides) -> PhaseContext:
    config = load_config(overrides=(f"run_root={root / 'runs'}", *SMALL, *overrides))
    phase_dir = root / "phase4"
    phase_dir.mkdir(exist_ok=True)
    tracker = Tracker(root, "s", mode="disabled")
    tracker.start_phase(4, "bitnet", {})
    return PhaseContext("s", 4, config, config.phase(4), root, phase_dir, registry, tracker, inputs,
                        lambda *_: None, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def result(trained):
    root, registry, item = trained
    ctx = _context(root, registry, [item])
    phase = BitNetPhase()
    phase.validate_input(ctx)
    return ctx, phase.execute(ctx)


def test_packed_file_is_several_times_smaller_on_disk(trained, result):
    _, _, item = trained
    ctx, res = result
    packed = ctx.phase_dir / "bitnet_packed.safetensors"
    float_bytes, packed_bytes = Path(item.record["path"]).stat().st_size, packed.stat().st_size
    assert float_bytes / packed_bytes > 5.0
    assert res.metrics["compression_ratio"] == pytest.approx(float_bytes / packed_bytes)
    meta = res.models[0].metadata
    assert meta["packed_size_bytes"] == packed_bytes and meta["packed_checkpoint"] == str(packed)
    state, _ = load_checkpoint(packed, expected_sha256=meta["packed_sha256"])
    assert state["blocks.0.mlp.up_proj.packed_weight"].dtype == torch.uint8
    assert not any(k.endswith("proj.weight") for k in state)   # no fp32 copy of a quantized weight


def test_reported_accuracies_are_fresh_evaluations(trained, result):
    _, _, item = trained
    ctx, res = result
    tokenizer = CharTokenizer.from_dict(item.metadata["tokenizer"])
    test = make_examples(TASKS, 96, "test", 0)
    packed_model = to_bitlinear(item.model)
    state, _ = load_checkpoint(ctx.phase_dir / "bitnet_packed.safetensors")
    freeze_all(packed_model).load_state_dict(state)
    packed = evaluate(packed_model, test, tokenizer, 32)
    assert res.metrics["packed_accuracy"] == pytest.approx(packed["accuracy"])
    assert res.metrics["packed_loss"] == pytest.approx(packed["loss"], rel=1e-5)
    assert res.metrics["float_loss"] == pytest.approx(evaluate(item.model, test, tokenizer, 32)["loss"], rel=1e-5)
    handed = res.models[0].model
    assert res.metrics["val_loss"] == pytest.approx(evaluate(handed, test, tokenizer, 32)["loss"], rel=1e-5)
    drop = max(res.metrics["float_accuracy"] - res.metrics["packed_accuracy"],
               res.metrics["float_accuracy"] - res.metrics["accuracy"])
    assert res.metrics["accuracy_drop"] == pytest.approx(drop)


def test_handed_model_rebuilds_and_matches_the_packed_model_up_to_activation_rounding(trained, result):
    ctx, res = result
    output = res.models[0]
    rebuilt = build_model(output.metadata["model_config"])
    rebuilt.load_state_dict(output.model.state_dict())
    state, _ = load_checkpoint(ctx.phase_dir / "bitnet_packed.safetensors")
    packed_model = freeze_all(to_bitlinear(trained[2].model))
    packed_model.load_state_dict(state)
    names = bit_layers(packed_model)
    hooks = [rebuilt.get_submodule(n).register_forward_pre_hook(lambda _m, args: (ste_act_int8(args[0]),))
             for n in names]
    tokens = torch.randint(0, rebuilt.config.vocab_size, (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tokens), packed_model(tokens), rtol=1e-4, atol=1e-4)
        for hook in hooks:
            hook.remove()
        plain, packed = rebuilt(tokens), packed_model(tokens)   # without activation rounding: a little different
    assert 0 < (plain - packed).abs().max() < 0.5 * packed.abs().max()
    q = rebuilt.blocks[0].attn.q_proj.weight
    assert torch.unique(q).numel() <= 3   # ternary values times one scale


def test_fine_tuning_moves_latent_weights_and_lowers_the_ternary_loss(trained):
    _, _, item = trained
    tokenizer = CharTokenizer.from_dict(item.metadata["tokenizer"])
    train = make_examples(TASKS, 1000, "train", 0)
    val = make_examples(TASKS, 96, "val", 0)
    quantized = to_bitlinear(item.model)
    tuned = copy.deepcopy(quantized)
    train_on_examples(tuned, make_optimizer(tuned, Phase4Config().optimizer, 5e-4), train, tokenizer, steps=30, batch_size=32, max_len=32,
                      seed=0)
    before = quantized.blocks[0].mlp.up_proj.weight
    assert (tuned.blocks[0].mlp.up_proj.weight - before).norm() > 1e-3 * before.norm()
    losses = [evaluate(freeze_all(m), val, tokenizer, 32)["loss"] for m in (quantized, tuned)]
    assert losses[1] < losses[0]


def test_validate_output_refuses_low_compression_or_large_drop(trained, result):
    root, registry, item = trained
    _, res = result
    BitNetPhase().validate_output(res, _context(root, registry, [item]))
    ratio = res.metrics["compression_ratio"]
    with pytest.raises(HandoffError, match="compression ratio .* below min_compression"):
        BitNetPhase().validate_output(res, _context(root, registry, [item], f"phases.phase4.min_compression={ratio + 1}"))
    res.metrics["accuracy_drop"], saved = 0.3, res.metrics["accuracy_drop"]
    try:
        with pytest.raises(HandoffError, match="accuracy drop 0.300 .* exceeds max_accuracy_drop 0.1"):
            BitNetPhase().validate_output(res, _context(root, registry, [item], "phases.phase4.max_accuracy_drop=0.1"))
    finally:
        res.metrics["accuracy_drop"] = saved


def test_validate_input_needs_exactly_one_model_with_a_file(trained):
    root, registry, item = trained
    with pytest.raises(HandoffError, match="exactly one model; got 2"):
        BitNetPhase().validate_input(_context(root, registry, [item, item]))
    missing = LoadedModel(item.model, {**item.record, "path": str(root / "gone.safetensors")}, item.metadata)
    with pytest.raises(HandoffError, match="no checkpoint file"):
        BitNetPhase().validate_input(_context(root, registry, [missing]))
    untasked = LoadedModel(item.model, item.record, {k: v for k, v in item.metadata.items() if k != "task_weights"})
    with pytest.raises(HandoffError, match="task_weights"):
        BitNetPhase().validate_input(_context(root, registry, [untasked]))


def test_forge_phases_lists_phase4_as_implemented(capsys):
    assert forge_main(["phases"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "bitnet" in l)
    assert "not implemented" not in line

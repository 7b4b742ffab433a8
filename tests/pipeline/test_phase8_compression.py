"""Phase 8 (SeedLM -> VPTQ -> hyper-compression): each stage's file decodes to exactly the model its gate
evaluated, the stages chain in the registry, a stage that loses accuracy is rolled back with the reason recorded,
the final model loads and answers through forge.load_model, the phase survives a rollback to 7 and a SIGKILL, and
its own checks hold it to Phase 4's packed ternary file."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import forge
from forge.data import make_examples
from forge.nn.compress.coded import CodedLinear, coded_layers
from forge.pipeline.config import load_config
from forge.pipeline.controller import (
    ModelOutput,
    PhaseController,
    PhaseResult,
    PipelineError,
)
from forge.pipeline.models import build_from_metadata
from forge.pipeline.phases.phase8_compression.recipe import held_out_accuracy
from forge.pipeline.phases.phase8_compression.stages import (
    hyper_stage,
    seedlm_stage,
    vptq_stage,
)
from forge.registry import ModelRegistry, new_session_id, save_checkpoint
from forge.registry.checkpoint import load_checkpoint

TASKS = {"addition": 1.0, "copy": 1.0}
SMALL = ("wandb.mode=disabled", "phases.phase8.eval_examples=64", "phases.phase8.vptq_finetune_steps=60",
         "phases.phase8.finetune_examples=256", "phases.phase8.calibration_samples=32",
         "phases.phase8.min_stage_retention=0.5", "phases.phase8.min_final_retention=0.5")
EXPERTS = {"num_experts": 2, "min_expert_gain": 0.1, "routing_gain": 0.1, "routing_over_random": 0.1}


@pytest.fixture(scope="module")
def trained(addition_copy_model):
    model, tokenizer = addition_copy_model
    return copy.deepcopy(model).eval(), tokenizer


def _accuracy(model, tokenizer, n=64, seed=0):
    return held_out_accuracy(model, make_examples(TASKS, n, "test", seed), tokenizer, 48)


def test_stage_files_decode_to_the_models_the_gates_evaluated(trained, tmp_path):
    model, tokenizer = trained
    cfg = load_config(overrides=SMALL).phases.phase8
    preserve, quiet = cfg.preserve_layers, lambda *_: None
    tokens = torch.randint(4, tokenizer.vocab_size, (16, 48))
    first = seedlm_stage(model, preserve, cfg, quiet)
    second = vptq_stage(first, preserve, cfg, tokens, quiet)
    third = hyper_stage(second, preserve, cfg, quiet)
    assert [type(m.codes).__name__ for m in coded_layers(third).values()] == ["HyperVQCodes"] * len(coded_layers(third))
    for i, stage in enumerate((first, second, third)):
        info = save_checkpoint(stage.state_dict(), tmp_path / f"s{i}.safetensors", {"model_config": model.config.to_dict()})
        state, meta = load_checkpoint(info.path, expected_sha256=info.sha256)
        back = build_from_metadata(meta, state)
        back.load_state_dict(state, strict=True)
        for name, layer in coded_layers(stage).items():
            assert torch.equal(coded_layers(back)[name].decoded_weight(), layer.decoded_weight())
        assert _accuracy(back, tokenizer) == _accuracy(stage, tokenizer)
    # each stage starts from the one before: VPTQ quantizes SeedLM's decoded weights, hyper keeps VPTQ's indices
    name = next(iter(coded_layers(second)))
    assert torch.equal(coded_layers(third)[name].codes.vq.idx, coded_layers(second)[name].codes.idx)


def test_distillation_trains_codebooks_and_floats_through_fixed_indices(trained):
    from forge.nn.compress.vptq import hessian_from_inputs, vptq_quantize
    from forge.pipeline.phases.phase8_compression.finetune import TrainableVQ, coded_again, trainable_copy

    w = torch.randn(12, 20)
    codes = vptq_quantize(w, hessian_from_inputs(torch.randn(64, 20)), v=4, k=8, k_res=4)
    layer = TrainableVQ(codes)
    assert torch.equal(layer.weight().detach(), codes.decode("torch"))
    x = torch.randn(5, 20, dtype=torch.float64).float()
    layer(x).pow(2).sum().backward()
    assert layer.codebook.grad.abs().sum() > 0 and layer.scale.grad.abs().sum() > 0 and layer.res_codebook.grad is not None
    model, _ = trained
    first = seedlm_stage(model, ["embed", "norm", "head"], load_config(overrides=SMALL).phases.phase8, lambda *_: None)
    student, params = trainable_copy(first)
    assert not any(isinstance(m, TrainableVQ) for m in student.modules())   # SeedLM layers hold no floats to train
    assert {id(p) for p in params} == {id(p) for p in student.parameters()}   # embeddings, norms, head
    assert coded_again(student) is student and not any(p.requires_grad for p in student.parameters())
    student, params = trainable_copy(first, frozen=["embed", "head"])
    trained_names = {name for name, p in student.named_parameters() if p.requires_grad}
    assert {id(p) for p in params} == {id(p) for name, p in student.named_parameters() if name in trained_names}
    assert trained_names and all(name.split(".")[0] not in ("embed", "head") for name in trained_names)
    assert any(name.startswith("embed") for name, _ in student.named_parameters())


def _hand_on_class():
    """A stand-in Phase 7 that hands its input on as an expert model, so a test reaches Phase 8 in one session."""
    class _HandOn(PhaseController):
        phase, name = 7, "experts"

        def execute(self, ctx):
            item = ctx.inputs[0]
            meta = {**item.metadata, **EXPERTS, "experts": {}, "router": None}
            return PhaseResult(True, [ModelOutput("experts", item.model, meta, dict(EXPERTS))], dict(EXPERTS))
    return _HandOn


HandOnAsExperts = _hand_on_class()    # importable as test_phase8_compression:HandOnAsExperts


def _source(registry, model, tokenizer, tmp_path, phase: int, ternary_bytes: int) -> str:
    """A session holding a Phase 4 record (the packed ternary size) and its child, a Phase `phase` model."""
    source = registry.create_session(new_session_id("src"), {})
    meta = {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(), "task_weights": TASKS,
            "tools": ["calculator"], "personas": [], "answer_format": {"before": [], "after": []}}
    checks = {6: {"cycles_completed": 1, "tool_lift": 1.0, "base_accuracy_drop": 0.0, "min_persona_kl_reduction": 1.0,
                  "max_persona_adherence_gap": 0.0}, 7: EXPERTS}[phase]
    ternary = {**meta, "packed_size_bytes": ternary_bytes}
    p4 = registry.register_model(source, "bitnet", "bitnet", save_checkpoint(
        model.state_dict(), tmp_path / "phase4.safetensors", ternary).path, ternary, phase=4)
    meta = {**meta, **checks, **({"experts": {}, "router": None} if phase == 7 else {})}
    path = save_checkpoint(model.state_dict(), tmp_path / f"phase{phase}.safetensors", meta).path
    model_id = registry.register_model(source, f"phase{phase}", f"phase{phase}", path, meta, phase=phase,
                                       metrics=checks, parent_ids=[p4])
    registry.record_phase_result(source, phase, "completed", [model_id], checks, 1.0)
    return source


def test_phase8_through_the_pipeline_chains_registers_loads_and_resumes_after_a_rollback(trained, tmp_path,
                                                                                          monkeypatch):
    from _catalogue import uncatalogued

    from forge.pipeline.orchestrator import Pipeline
    from forge.pipeline.phases import PHASES
    from forge.tracking import read_metrics

    monkeypatch.setitem(PHASES, 7, ("experts", "test_phase8_compression:HandOnAsExperts"))
    model, tokenizer = trained
    config = load_config(overrides=(f"run_root={tmp_path / 'runs'}", *SMALL, "phases.phase7.enabled=true"))
    registry = ModelRegistry(config.registry_path())
    source = _source(registry, model, tokenizer, tmp_path, 6, ternary_bytes=10**7)
    pipeline = Pipeline(config, registry, log=lambda _msg: None, progress_bars=False)
    report = pipeline.run(from_phase=7, source_session=source)
    sid = report.session_id
    assert report.status == "completed" and report.completed == [7, 8], report.message
    (p7,) = registry.list_models(session_id=sid, phase=7)
    stages = {r["name"]: r for r in registry.list_models(session_id=sid, phase=8)}
    assert set(stages) == {"seedlm", "vptq", "hyper"}
    metrics = pipeline.completed(sid)[8]["metrics"]
    kept = [s for s in ("seedlm", "vptq", "hyper") if metrics["stage_kept"][s]]
    assert kept == ["seedlm", "vptq", "hyper"], {s: stages[s]["metadata"]["gate"] for s in stages}
    assert metrics["stage_attempts"] == {"seedlm": 1, "vptq": 1, "hyper": 1}   # a kept first try is not retried
    assert stages["seedlm"]["parent_ids"] == [p7["id"]]
    assert stages["vptq"]["parent_ids"] == [stages["seedlm"]["id"]]
    assert stages["hyper"]["parent_ids"] == [stages["vptq"]["id"]]
    assert report.final_model_ids == [stages["hyper"]["id"]] and "final" in stages["hyper"]["tags"]
    assert metrics["finetune_kl_last"] < metrics["finetune_kl_first"]       # the distillation learned
    sizes = [metrics["stage_file_bytes"][s] for s in kept]
    assert sizes == sorted(sizes, reverse=True)
    for name, record in stages.items():       # the recorded size is the file's, every byte
        assert Path(record["path"]).stat().st_size == metrics["stage_file_bytes"][name]
    assert metrics["final_bytes"] == sizes[-1] and metrics["size_vs_ternary"] == sizes[-1] / 10**7
    assert metrics["compression_ratio"] == Path(p7["path"]).stat().st_size / sizes[-1]
    # the final model loads through the README's lines, runs from its codes and scores what the gate scored
    final = forge.load_model(stages["hyper"]["id"], run_root=tmp_path / "runs")
    assert coded_layers(final.model) and all(isinstance(m, CodedLinear) for m in coded_layers(final.model).values())
    assert _accuracy(final.model, final.tokenizer) == metrics["stage_accuracy"]["hyper"]
    assert final.answer("12+7=") == final.answer("12+7=") and isinstance(final.answer("abc"), str)
    names = [name for line in read_metrics(pipeline.session_dir(sid)) for name in line["metrics"]]
    assert names.count("phase8/final_retention") == 1 and uncatalogued(pipeline.session_dir(sid)) == []
    pipeline.rollback(sid, 7)
    pipeline.resume(sid)
    timed = ("stage_encode_seconds", "stage_eval_seconds")
    again = pipeline.completed(sid)[8]["metrics"]
    assert {k: v for k, v in again.items() if k not in timed} == {k: v for k, v in metrics.items() if k not in timed}
    assert len(registry.list_models(session_id=sid, phase=8)) == 6
    registry.close()


def test_a_stage_that_loses_accuracy_is_rolled_back_and_the_registry_says_why(trained, tmp_path):
    """Phase 7 is switched off (the default): the run skips it and Phase 8 compresses Phase 6's model."""
    from forge.pipeline.orchestrator import Pipeline

    model, tokenizer = trained
    assert _accuracy(model, tokenizer) >= 0.3       # enough to lose
    wreck = ("phases.phase8.vptq_codebook_size=2", "phases.phase8.vptq_vector_dim=8", "phases.phase8.vptq_finetune_steps=0")
    config = load_config(overrides=(f"run_root={tmp_path / 'runs'}", *SMALL, *wreck, "phases.phase7.enabled=false"))
    lines = []
    with ModelRegistry(config.registry_path()) as registry:
        source = _source(registry, model, tokenizer, tmp_path, 6, ternary_bytes=10**7)
        report = Pipeline(config, registry, log=lines.append, progress_bars=False).run(from_phase=7,
                                                                                       source_session=source)
        stages = {r["name"]: r for r in registry.list_models(session_id=report.session_id, phase=8)}
        (handoff,) = registry.list_phase_handoffs(report.session_id)
        (p6,) = registry.list_models(session_id=source, phase=6)
    assert report.completed == [8] and "phase 7 (experts) is switched off (phases.phase7.enabled: false): skipped" in lines
    assert (handoff["source_phase"], handoff["target_phase"], handoff["model_ids"]) == (6, 8, [p6["id"]])
    assert stages["seedlm"]["parent_ids"] == [p6["id"]]
    assert stages["seedlm"]["metadata"]["gate"] == "kept"
    assert stages["vptq"]["metadata"]["gate"].startswith("rolled back: accuracy")
    assert "rolled-back" in stages["vptq"]["tags"] and stages["vptq"]["metrics"]["kept"] == 0.0
    # refused, VPTQ is tried again with the next seed (vptq_attempts: 2), one model registered for the stage
    assert stages["vptq"]["metrics"]["attempts"] == 2
    assert stages["vptq"]["metrics"]["accuracy"] >= stages["vptq"]["metrics"]["first_attempt_accuracy"]
    # the hyper stage starts from SeedLM's model (the last kept); coding its weights directly does not shrink it
    assert stages["hyper"]["parent_ids"] == [stages["seedlm"]["id"]]
    assert "not smaller than seedlm's" in stages["hyper"]["metadata"]["gate"]
    assert report.final_model_ids == [stages["seedlm"]["id"]]


def test_only_phase8_with_phase7_switched_off_takes_phase6_models(trained, tmp_path):
    """`forge run --only 8` on a session whose last phase is 6: Phase 7 is off, so Phase 6's models feed it."""
    from forge.pipeline.orchestrator import Pipeline
    from forge.pipeline.phases import feeding_phase

    model, tokenizer = trained
    config = load_config(overrides=(f"run_root={tmp_path / 'runs'}", *SMALL, "phases.phase8.stages=[seedlm]",
                                    "phases.phase7.enabled=false"))
    assert feeding_phase(8, config, {5: {}, 6: {}}) == 6 and feeding_phase(8, config, {6: {}, 7: {}}) == 7
    assert feeding_phase(8, config, {5: {}}) is None and feeding_phase(1, config, {}) is None
    with ModelRegistry(config.registry_path()) as registry:
        source = _source(registry, model, tokenizer, tmp_path, 6, ternary_bytes=10**7)
        report = Pipeline(config, registry, log=lambda _m: None, progress_bars=False).run(only=8, source_session=source)
        (handoff,) = registry.list_phase_handoffs(report.session_id)
    assert report.completed == [8] and (handoff["source_phase"], handoff["target_phase"]) == (6, 8)
    on = load_config(overrides=("phases.phase7.enabled=true",))
    assert feeding_phase(8, on, {5: {}, 6: {}}) is None     # Phase 7 is on: its models are wanted


def test_the_final_file_must_beat_the_packed_ternary_file(trained, tmp_path):
    from forge.pipeline.orchestrator import Pipeline

    model, tokenizer = trained
    config = load_config(overrides=(f"run_root={tmp_path / 'runs'}", *SMALL, "phases.phase8.stages=[seedlm]"))
    with ModelRegistry(config.registry_path()) as registry:
        source = _source(registry, model, tokenizer, tmp_path, 7, ternary_bytes=1000)
        with pytest.raises(PipelineError, match="size_vs_ternary .* not smaller than Phase 4's packed ternary file"):
            Pipeline(config, registry, log=lambda _m: None, progress_bars=False).run(only=8, source_session=source)


def test_a_run_killed_mid_phase8_resumes_and_registers_once(trained, tmp_path):
    """`forge run --only 8` killed with SIGKILL while the VPTQ stage runs, then `forge resume`."""
    from _kill_resume import kill_then_resume, printed

    model, tokenizer = trained
    runs = tmp_path / "runs"
    with ModelRegistry(runs / "registry.db") as registry:
        source = _source(registry, model, tokenizer, tmp_path, 7, ternary_bytes=10**7)
    session = kill_then_resume(tmp_path, runs, source, 8, SMALL, printed("vptq"))
    with ModelRegistry(runs / "registry.db") as registry:
        assert sorted(r["name"] for r in registry.list_models(session_id=session, phase=8)) == [
            "hyper", "seedlm", "vptq"]


def test_a_tiny_forge_run_goes_through_all_eight_phases_to_a_completed_session(tmp_path):
    """The real CLI from phase 1 to 8 at test size (tests/ui/_tiny_run.py: phases 1-7's own checks off, Phase 8's
    on), every training forward under bf16 autocast (hardware.precision=bfloat16: the path CUDA takes by default;
    the float32 path runs in every phase's own tests); the session completes with Phase 8's final stage, which loads
    and answers."""
    ui = Path(__file__).resolve().parents[1] / "ui"
    sys.path.insert(0, str(ui))
    from _tiny_run import TINY_PHASES_7_8, TINY_SETS

    sets = [a for s in ("run_root=runs", "hardware.precision=bfloat16", *TINY_SETS, *TINY_PHASES_7_8)
            for a in ("--set", s)]
    done = subprocess.run([sys.executable, str(ui / "_tiny_run.py"), "run", *sets], cwd=tmp_path, capture_output=True,
                          text=True, timeout=1500, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    with ModelRegistry(tmp_path / "runs" / "registry.db") as registry:
        (session,) = registry.list_sessions()
        completed = registry.completed_phases(session["id"])
        final = [r for r in registry.list_models(session_id=session["id"], phase=8) if "final" in r["tags"]]
    assert session["status"] == "completed" and sorted(completed) == list(range(1, 9))
    assert len(final) == 1 and f"final models {final[0]['id']}" in done.stdout
    assert isinstance(forge.load_model(final[0]["id"], run_root=tmp_path / "runs").answer("12+7="), str)
    _dashboard_draws_the_stages(tmp_path / "runs", session["id"])


def _dashboard_draws_the_stages(runs, session_id):
    """The dashboard's Phase 8 page draws what the run recorded: sizes, accuracies, accuracy against bits."""
    pytest.importorskip("plotly")
    from forge.ui import data
    from forge.ui.phase_views import PhaseData, phase8_figures

    run = data.RunRoot.open(runs)
    try:
        result = data.phase_results(run, session_id, 8)
    finally:
        run.close()
    sizes, bars, accuracy, trade = result["metrics"]["stage_file_bytes"], *phase8_figures(PhaseData(8, [], result))
    drawn = dict(zip(bars.data[0].x, bars.data[0].y))
    for stage, size in sizes.items():
        assert any(name.startswith(stage) and value == size / 1024 for name, value in drawn.items())
    assert len(trade.data[0].x) == len(sizes) and "accuracy" in accuracy.layout.title.text

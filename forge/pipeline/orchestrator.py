"""Pipeline: runs phases in order, hands models from one to the next, and never loses a result.

Each phase's models are saved (safetensors + JSON, sha256) under <run_root>/<session>/phaseN_name/
and registered before the next phase starts. Order of one phase's commit:
  1. execute, validate_output  2. save every checkpoint  3. write the manifest (phase_result.json)
  4. register each model (a model already registered from the same file and hash is adopted)
  5. record_phase_result("completed").
A process killed before 3 reruns the phase; killed after 3, resume finishes 4-5 from the manifest
without running the phase again, so nothing is lost and nothing is registered twice.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from forge import distributed
from forge.pipeline import state as files
from forge.pipeline.config import PipelineConfig
from forge.pipeline.controller import HandoffError, LoadedModel, PhaseContext, PhaseResult, PipelineError
from forge.pipeline.handoff import HANDOFF_RULES, check_handoff
from forge.pipeline.devices import resolve_precision, training_precision
from forge.pipeline.models import build_from_metadata, parameter_count
from forge.pipeline.ranks import announce_phase, phase_done
from forge.pipeline.phases import (feeding_phase, is_enabled, is_implemented, load_controller_class, make_plan,
                                   phase_name, plan_text, runnable_phases, why_not_runnable)
from forge.registry.checkpoint import load_checkpoint, save_checkpoint
from forge.registry.schema import RegistryIOError
from forge.registry.registry import safe_name
from forge.tracking.metrics import flat_numbers

@dataclass
class RunReport:
    session_id: str
    status: str                                 # "completed" or "failed"
    completed: list[int] = field(default_factory=list)
    final_model_ids: list[str] = field(default_factory=list)
    message: str = ""


def load_record(record: dict) -> LoadedModel:
    """The model of a registry record, rebuilt from its checkpoint (sha256 and metadata checked against it)."""
    state_dict, metadata = load_checkpoint(Path(record["path"]), expected_sha256=record["sha256"],
                                           expected_metadata=record["metadata"])
    model = build_from_metadata(metadata, state_dict)
    model.load_state_dict(state_dict, strict=True)
    return LoadedModel(model.eval(), record, metadata)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise PipelineError("hardware.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def default_tracker(session_dir: Path, session_id: str, mode: str, project: str):
    from forge.tracking import Tracker

    return Tracker(session_dir, session_id, mode=mode, project=project)


class Pipeline:
    """Runs, resumes and rolls back sessions of the phase table against one registry."""

    def __init__(self, config: PipelineConfig, registry: Any, *, tracker_factory: Callable | None = None,
                 log: Callable[[str], None] = print, progress_bars: bool | None = None):
        self.config = config
        self.registry = registry
        self.run_root = Path(config.run_root)
        self.tracker_factory = tracker_factory or default_tracker
        self.log = log
        self.progress_bars = progress_bars    # None: tqdm decides (shown on a terminal)

    # -- entry points ---------------------------------------------------------------------------
    def run(self, from_phase: int = 1, only: int | None = None, source_session: str | None = None,
            to_phase: int | None = None) -> RunReport:
        """Start a new session over make_plan(from_phase, only, to_phase). A plan that starts after phase 1
        takes its inputs from `source_session` (default: the newest session that completed the
        phase before)."""
        from forge.registry import new_session_id

        plan = make_plan(from_phase, only, to_phase)
        source, source_phase = self._find_source(plan[0], source_session) if plan[0] > 1 else (None, None)
        session_id = new_session_id()
        session_dir = self.session_dir(session_id)
        session_dir.mkdir(parents=True, exist_ok=False)
        files.write_json(session_dir / "config.json", self.config.to_dict())
        self.registry.create_session(session_id, {"pipeline": self.config.to_dict(),
                                                  "plan": {"phases": plan, "source_session": source,
                                                           "source_phase": source_phase}})
        self.log(f"session {session_id}: {plan_text(plan, self.config)} -> {session_dir}")
        return self._run(session_id)

    def resume(self, session_id: str) -> RunReport:
        """Continue a failed, killed or rolled-back session after its last completed phase, with the
        config it was started with."""
        session = self._session(session_id)
        self.config = PipelineConfig.model_validate(session["config"]["pipeline"])
        self.log(f"resuming session {session_id} (status {session['status']})")
        return self._run(session_id)

    def rollback(self, session_id: str, phase: int) -> list[LoadedModel]:
        """Reload the models `phase` produced in this session (hash checked) and make the session
        continue from there: later phases count as not done and rerun on `forge resume`."""
        self._session(session_id)
        completed = self.completed(session_id)
        if phase not in completed:
            raise PipelineError(f"session {session_id} has no completed phase {phase}; "
                                f"completed: {sorted(completed) or 'none'}")
        loaded = self.load_models(completed[phase]["model_ids"])
        stale = {str(q): info["model_ids"] for q, info in completed.items() if q > phase}
        session_dir = self.session_dir(session_id)
        with files.SessionLock(session_dir):
            state = files.read_state(session_dir)
            state["rollbacks"].append({"phase": phase, "stale": stale})
            files.write_state(session_dir, state)
            self.registry.set_session_status(session_id, "interrupted", error=f"rolled back to phase {phase}")
        self.log(f"session {session_id} rolled back to phase {phase}; `forge resume {session_id}` continues")
        return loaded

    # -- queries ----------------------------------------------------------------------------------
    def session_dir(self, session_id: str) -> Path:
        return self.run_root / safe_name(session_id)

    def completed(self, session_id: str) -> dict[int, dict]:
        """The session's completed phases, minus those a rollback invalidated."""
        completed = dict(self.registry.completed_phases(session_id))
        for rollback in files.read_state(self.session_dir(session_id))["rollbacks"]:
            for phase, ids in rollback["stale"].items():
                if completed.get(int(phase), {}).get("model_ids") == ids:
                    del completed[int(phase)]
        return completed

    def load_models(self, model_ids: list[str]) -> list[LoadedModel]:
        """Registered models rebuilt from their checkpoints and the registry's metadata; a file whose sha256,
        or a sidecar whose metadata, differs from the registry's record is refused (ChecksumError)."""
        out = []
        for model_id in model_ids:
            record = self.registry.get_model(model_id)
            if record is None:
                raise PipelineError(f"model {model_id!r} is not in the registry")
            out.append(load_record(record))
        return out

    def _session(self, session_id: str) -> dict:
        session = self.registry.get_session(session_id)
        if session is None:
            raise PipelineError(f"unknown session {session_id!r}; `forge status` lists sessions")
        return session

    def _find_source(self, phase: int, source_session: str | None) -> tuple[str, int]:
        """The session, and its phase, whose models feed a run starting at `phase` (feeding_phase)."""
        candidates = [source_session] if source_session else [s["id"] for s in self.registry.list_sessions()]
        for session_id in candidates:
            self._session(session_id)
            source = feeding_phase(phase, self.config, self.completed(session_id))
            if source is not None:
                return session_id, source
        wanted = next((p for p in range(phase - 1, 0, -1) if is_enabled(p, self.config)), phase - 1)
        where = f"session {source_session}" if source_session else "any session"
        raise PipelineError(f"phase {phase} needs the models of phase {wanted}, but {where} has not "
                            f"completed phase {wanted}; run it first (forge run --only {wanted})")

    # -- the run loop -----------------------------------------------------------------------------
    def _run(self, session_id: str) -> RunReport:
        session = self._session(session_id)
        plan = session["config"]["plan"]
        session_dir = self.session_dir(session_id)
        self._apply_hardware()
        with files.SessionLock(session_dir):
            files.remove_stale_temp_files(session_dir)
            self.registry.set_session_status(session_id, "running")
            tracker = self.tracker_factory(session_dir, session_id, self.config.wandb.mode,
                                           self.config.wandb.project)
            try:
                report = self._run_plan(session_id, plan, tracker)
            except KeyboardInterrupt:
                self._mark_ended(session_id, "interrupted", "interrupted by the user")
                raise
            except Exception as error:   # recorded, then re-raised with the reason for the CLI
                reason = distributed.explain(error)
                self._mark_ended(session_id, "failed", f"{type(error).__name__}: {reason}")
                raise PipelineError(f"session {session_id} failed: {reason}") from error
            finally:
                tracker.close()
        self.registry.set_session_status(session_id, "completed")
        self.log(report.message)
        return report

    def _mark_ended(self, session_id: str, status: str, error: str) -> None:
        """Record why the session ended where the registry still can be written; a registry that fails
        (disk full, file deleted) must not hide the error that ended the run."""
        try:
            self.registry.set_session_status(session_id, status, error=error)
        except RegistryIOError as registry_error:
            self.log(f"session {session_id}: could not record status {status!r}: {registry_error}")

    def _run_plan(self, session_id: str, plan: dict, tracker) -> RunReport:
        phases = plan["phases"]
        completed = self.completed(session_id)
        runnable = runnable_phases(phases, self.config)   # progress counts the phases that run
        for phase in phases:
            if phase in completed:
                continue
            if not is_implemented(phase):
                return self._stopped(session_id, phases, phase, completed, why_not_runnable(phase, self.config))
            if phase not in runnable:
                self.log(f"phase {phase} ({phase_name(phase)}) {why_not_runnable(phase, self.config)}: skipped")
                continue
            controller_cls = load_controller_class(phase)
            source = self._input_phase(phase, plan, completed)
            inputs = self._inputs(session_id, phase, source, plan, completed)
            if phase > 1:
                self._check_handoff(session_id, source, phase, inputs)
            ids, metrics = self._run_phase(session_id, phase, controller_cls, inputs, tracker)
            completed[phase] = {"model_ids": ids, "metrics": metrics}
            progress = 100.0 * (runnable.index(phase) + 1) / len(runnable)
            self.registry.update_session_progress(session_id, phase, progress)
        if not runnable:
            return self._stopped(session_id, phases, phases[0], completed, why_not_runnable(phases[0], self.config))
        last = runnable[-1]
        final = self._final_ids(completed[last]["model_ids"])
        span = f"phase {phases[0]}" if len(phases) == 1 else f"phases {phases[0]}..{phases[-1]}"
        return RunReport(session_id, "completed", sorted(completed), final,
                         f"session {session_id}: completed {span}; final models {', '.join(final)}")

    def _input_phase(self, phase: int, plan: dict, completed: dict) -> int | None:
        """The phase whose models feed `phase`: the last one before it that ran in this session (switched-off
        phases are skipped), else the source session's phase the run started from (None: no inputs)."""
        first = plan["phases"][0]
        done = [p for p in completed if first <= p < phase]
        if done:
            return max(done)
        return plan.get("source_phase", first - 1) if first > 1 else None

    def _final_ids(self, ids: list[str]) -> list[str]:
        """The models a phase tagged "final" (Phase 8's last kept stage), else all it made."""
        tagged = [i for i in ids if "final" in (self.registry.get_model(i) or {}).get("tags", [])]
        return tagged or ids

    def _stopped(self, session_id: str, phases: list[int], phase: int, completed: dict, reason: str) -> RunReport:
        done = [p for p in phases if p in completed]
        final = completed[done[-1]]["model_ids"] if done else []
        after = f"after phase {done[-1]} ({phase_name(done[-1])})" if done else "before running any phase"
        message = (f"session {session_id}: phase {phase} ({phase_name(phase)}) {reason}; "
                   f"stopped {after}" + (f"; final models {', '.join(final)}" if final else ""))
        return RunReport(session_id, "completed", done, final, message)

    def _inputs(self, session_id: str, phase: int, source: int | None, plan: dict, completed: dict
                ) -> list[LoadedModel]:
        if source is None:
            if phase > 1:
                raise PipelineError(f"phase {phase} has no inputs: no phase before it ran (phase 1 is switched off)")
            return []
        if source in completed:
            return self.load_models(completed[source]["model_ids"])
        origin = plan.get("source_session")
        if origin and source in self.completed(origin):
            return self.load_models(self.completed(origin)[source]["model_ids"])
        raise PipelineError(f"phase {phase} has no inputs: phase {source} is not completed in session {session_id}")

    def _check_handoff(self, session_id: str, source: int, target: int, inputs: list[LoadedModel]) -> None:
        """Check the handoff rule and register the outcome once per set of models."""
        ids = [item.model_id for item in inputs]
        key = f"{source}->{target}"
        session_dir = self.session_dir(session_id)
        state = files.read_state(session_dir)
        if state["handoffs"].get(key, {}).get("model_ids") == ids:
            return
        recorded = [h for h in self.registry.list_phase_handoffs(session_id) if h["source_phase"] == source
                    and h["target_phase"] == target and h["model_ids"] == ids and h["validation_status"] == "passed"]
        if recorded:   # registered by an attempt killed before it wrote the session state
            state["handoffs"][key] = {"model_ids": ids, "handoff_id": recorded[-1]["id"]}
            files.write_state(session_dir, state)
            return
        rule = HANDOFF_RULES.get((source, target)) or HANDOFF_RULES[(source, source + 1)]   # a phase was skipped
        try:
            metrics = check_handoff(rule, inputs, self.config)
        except HandoffError as error:
            self.registry.register_phase_handoff(session_id, source, target, ids, "failed", {"error": str(error)})
            raise
        handoff_id = self.registry.register_phase_handoff(session_id, source, target, ids, "passed", metrics)
        state["handoffs"][key] = {"model_ids": ids, "handoff_id": handoff_id}
        files.write_state(session_dir, state)

    def _apply_hardware(self) -> None:
        if self.config.hardware.threads:
            torch.set_num_threads(self.config.hardware.threads)

    # -- one phase ------------------------------------------------------------------------------
    def _phase_dir(self, session_id: str, phase: int) -> Path:
        """phaseN_name, or phaseN_name-rK after K rollbacks redid it (old files stay registered)."""
        rollbacks = files.read_state(self.session_dir(session_id))["rollbacks"]
        redone = sum(1 for r in rollbacks if str(phase) in r["stale"])
        suffix = f"-r{redone}" if redone else ""
        return self.session_dir(session_id) / f"phase{phase}_{phase_name(phase)}{suffix}"

    def _run_phase(self, session_id: str, phase: int, controller_cls, inputs, tracker) -> tuple[list[str], dict]:
        phase_dir = self._phase_dir(session_id, phase)
        phase_dir.mkdir(parents=True, exist_ok=True)
        manifest = files.read_json(phase_dir / files.MANIFEST)
        tracker.start_phase(phase, phase_name(phase), self.config.phase(phase).model_dump(mode="json"))
        try:
            if manifest is None:
                device = self._device()
                self.log(f"phase {phase} ({phase_name(phase)}): running on {device}, "
                         f"{resolve_precision(self.config.hardware.precision, device)} training")
                tracker.drop_records(phase)   # an earlier, killed attempt's steps
                result = self._execute(session_id, phase, controller_cls, inputs, tracker, phase_dir)
                manifest = self._save_outputs(phase, phase_dir, result, inputs)
            else:
                self.log(f"phase {phase} ({phase_name(phase)}): finishing from its saved manifest")
            ids = self._register_outputs(session_id, phase, phase_dir, manifest, tracker)
        except BaseException:
            tracker.finish_phase(exit_code=1)
            raise
        tracker.finish_phase()
        self.registry.record_phase_result(session_id, phase, "completed", ids, manifest["metrics"],
                                          manifest["duration_s"])
        self.log(f"phase {phase} ({phase_name(phase)}): done in {manifest['duration_s']:.1f}s -> {', '.join(ids)}")
        return ids, manifest["metrics"]

    def _device(self) -> torch.device:
        """This rank's device for the phases (hardware.device; with several GPUs the one of LOCAL_RANK)."""
        return distributed.local_device(pick_device(self.config.hardware.device))

    def _execute(self, session_id, phase, controller_cls, inputs, tracker, phase_dir) -> PhaseResult:
        controller = controller_cls()
        phase_config = self.config.phase(phase)
        started = time.perf_counter()
        device = self._device()
        with _ProgressBar(phase, self.progress_bars, self.log) as progress:
            ctx = PhaseContext(session_id, phase, self.config, phase_config, self.session_dir(session_id),
                               phase_dir, self.registry, tracker, [item.on(device) for item in inputs], progress,
                               self.config.seed, device)
            if distributed.launched().active:
                announce_phase(session_id, phase, self.config, inputs, ctx.run_dir)
            torch.manual_seed(self.config.seed + phase)
            try:
                with distributed.phase_scope(), training_precision(self.config.hardware.precision, device):
                    controller.validate_input(ctx)
                    result = controller.execute(ctx)
                    controller.validate_output(result, ctx)
                phase_done()
            except Exception as error:
                self.registry.record_phase_result(session_id, phase, "failed", [], {"error": str(error)},
                                                  time.perf_counter() - started)
                raise
        result.duration_s = result.duration_s or time.perf_counter() - started
        tracker.log({f"phase{phase}/{k}": v for k, v in flat_numbers(result.metrics).items()})
        return result

    def _save_outputs(self, phase: int, phase_dir: Path, result: PhaseResult, inputs) -> dict:
        """Save every model (step 2), then the manifest naming them (step 3)."""
        entries = []
        for output, path in zip(result.models, _model_paths(phase_dir, result.models)):
            metadata = {**output.metadata, "parameter_count": parameter_count(output.model),
                        "phase": phase, "phase_name": phase_name(phase), "name": output.name}
            info = save_checkpoint(output.model.state_dict(), path, metadata)
            entries.append({"name": output.name, "file": path.name, "sha256": info.sha256, "metadata": metadata,
                            "metrics": output.metrics, "tags": list(output.tags),
                            "derived_from": output.derived_from})
        manifest = {"phase": phase, "models": entries, "metrics": result.metrics,
                    "duration_s": result.duration_s, "parent_ids": [item.model_id for item in inputs]}
        files.write_json(phase_dir / files.MANIFEST, manifest)
        return manifest

    def _register_outputs(self, session_id: str, phase: int, phase_dir: Path, manifest: dict, tracker) -> list[str]:
        """Register the manifest's models (step 4); models registered before a crash are adopted."""
        known = {(str(Path(r["path"]).resolve()), r["sha256"]): r
                 for r in self.registry.list_models(session_id=session_id, phase=phase)}
        ids, by_name = [], {}
        for entry in manifest["models"]:
            path = phase_dir / entry["file"]
            # refuses a checkpoint or sidecar changed since saving
            load_checkpoint(path, expected_sha256=entry["sha256"], expected_metadata=entry["metadata"])
            record = known.get((str(path.resolve()), entry["sha256"]))
            if record is None:
                parents = [by_name[entry["derived_from"]]] if entry.get("derived_from") else manifest["parent_ids"]
                model_id = self.registry.register_model(
                    session_id, phase_name(phase), entry["name"], path, entry["metadata"], phase=phase,
                    metrics=entry["metrics"], tags=entry["tags"], parent_ids=parents)
            else:            # registered by an attempt that was killed before it finished the phase
                model_id = record["id"]
            if record is None or not record["artifacts"]:
                artifact = tracker.log_model_artifact(path, entry["name"], entry["metadata"])
                if artifact is not None:
                    self.registry.register_artifact(model_id, *artifact)
            ids.append(model_id)
            by_name[entry["name"]] = model_id
        return ids


def _model_paths(phase_dir: Path, outputs) -> list[Path]:
    """One checkpoint path per model, refusing names that map to one file (safe_name drops trailing '._-'
    and other characters; case is ignored, as on macOS and Windows), so no checkpoint overwrites another."""
    paths: list[Path] = []
    seen: dict[str, tuple[str, Path]] = {}
    for output in outputs:
        path = phase_dir / f"{safe_name(output.name)}.safetensors"
        if path.name.casefold() in seen:
            other, other_path = seen[path.name.casefold()]
            raise PipelineError(f"models {other!r} and {output.name!r} would share the checkpoint file "
                                f"{other_path}; give them names that differ in letters or digits")
        seen[path.name.casefold()] = (output.name, path)
        paths.append(path)
    return paths


class _ProgressBar:
    """ctx.progress for one phase: a tqdm bar (shown on a terminal) with the phase's latest message;
    without a terminal (a log file, CI), one `log` line every 10% instead."""

    def __init__(self, phase: int, enabled: bool | None, log: Callable[[str], None] = print):
        from tqdm import tqdm

        self.bar = tqdm(total=1000, desc=f"phase {phase} {phase_name(phase)}", unit="permille",
                        disable=None if enabled is None else not enabled, leave=False)
        self.prefix, self.log, self.next_line = f"phase {phase} ({phase_name(phase)})", log, 0.1

    def __enter__(self) -> Callable[[float, str], None]:
        return self.update

    def update(self, fraction: float, message: str = "") -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        if self.bar.disable:
            if fraction >= self.next_line:
                self.log(f"{self.prefix}: {fraction:4.0%} {message}")
                self.next_line = int(fraction * 10 + 1) / 10
            return
        self.bar.update(int(fraction * 1000) - self.bar.n)
        if message:
            self.bar.set_postfix_str(message, refresh=False)

    def __exit__(self, *exc_info) -> None:
        self.bar.close()

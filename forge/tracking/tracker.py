"""Experiment tracking: one W&B run per phase (offline by default, synced later with `wandb sync`),
and a JSON-lines copy of every metric in `session_dir/metrics.jsonl`.

The JSON-lines file is the record forge itself reads (wandb 0.31 offline writes only a binary
`.wandb` log), and it is written whatever the mode, including when wandb is off or not installed.
Each line: {"time": unix seconds, "session_id", "phase", "phase_name", "step", "metrics": {...}};
a non-finite value (NaN, inf) is written as null, as strict JSON has no NaN.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import time
from pathlib import Path
from typing import Mapping

from forge.tracking.metrics import check_phase, lookup_metric

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
MODES = ("offline", "online", "disabled")
_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _import_wandb(mode: str, metrics_path: Path):
    """The wandb module, or None (with one log line saying why) when tracking is off or missing."""
    if mode == "disabled":
        log.info("tracking disabled: metrics go to %s only", metrics_path)
        return None
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed: metrics go to %s only", metrics_path)
        return None
    return wandb


def _clean_metrics(metrics: Mapping) -> dict[str, float]:
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError(f"metrics must be a non-empty dict name -> number, got {metrics!r}")
    clean = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric names must be non-empty strings, got {name!r}")
        if hasattr(value, "item") and not isinstance(value, numbers.Real):
            value = value.item()   # 0-d tensors and numpy scalars
        if not isinstance(value, numbers.Real):
            raise TypeError(f"metrics[{name!r}] must be a number, got {type(value).__name__}")
        clean[name] = float(value)
    return clean


def _record_phase(line: str) -> int | None:
    """The phase of one metrics.jsonl line; None for a blank line or one cut short by a kill."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("phase") if isinstance(record, dict) else None


def read_metrics(session_dir: str | Path) -> list[dict]:
    """Every line of a session's metrics.jsonl, in order (an empty list when there is none)."""
    path = Path(session_dir) / METRICS_FILE
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Tracker:
    """Per-session tracking; `start_phase` / `log` / `log_model_artifact` / `finish_phase` per phase.

    mode "offline" (default) writes W&B runs under `session_dir/wandb/` without network or API key;
    "online" streams to W&B; "disabled" (or wandb missing) keeps only the JSON-lines file. Runs are
    grouped by session id and named "phase<N>-<name>". Usable as a context manager.
    """

    def __init__(self, session_dir: str | Path, session_id: str, mode: str = "offline",
                 project: str = "agent-forge"):
        if mode not in MODES:
            raise ValueError(f"Invalid mode: {mode!r}; expected one of {MODES}")
        for field, value in (("session_id", session_id), ("project", project)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"Invalid {field}: {value!r}; expected a non-empty string")
        self.session_dir = Path(session_dir)
        self.session_dir.mkdir(parents=True, exist_ok=True)
        self.session_id, self.mode, self.project = session_id, mode, project
        self.metrics_path = self.session_dir / METRICS_FILE
        self._wandb = _import_wandb(mode, self.metrics_path)
        self._run = None
        self._phase: int | None = None
        self._phase_name: str | None = None
        self._last_step = -1
        self._unknown: set[str] = set()
        self._closed = False
        self.run_dirs: list[Path] = []   # one W&B run folder per finished phase (for `wandb sync`)

    @property
    def wandb_enabled(self) -> bool:
        return self._wandb is not None

    @property
    def phase(self) -> int | None:
        return self._phase

    def start_phase(self, phase: int, name: str, config: dict) -> None:
        """Begin a phase (and its W&B run); a phase still open is finished first, with a warning."""
        if self._closed:
            raise RuntimeError("Tracker is closed; create a new one")
        check_phase(phase)
        if not isinstance(name, str) or not _ARTIFACT_NAME.match(name):
            raise ValueError(f"Invalid phase name: {name!r}; expected letters, digits, '_', '-', '.'")
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        if self._phase is not None:
            log.warning("phase %d was not finished; finishing it before phase %d", self._phase, phase)
            self.finish_phase()
        self._phase, self._phase_name, self._last_step = phase, name, -1
        if self._wandb is not None:
            self._run = self._init_run(phase, name, dict(config))

    def drop_records(self, phase: int) -> int:
        """Remove `phase`'s records from metrics.jsonl (an earlier attempt's, killed or rolled back, before the
        phase runs again), so the file holds one record per step; a line cut short by a kill goes too.
        The file is rewritten to a temporary name and moved into place. Returns the lines removed."""
        check_phase(phase)
        if not self.metrics_path.exists():
            return 0
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if _record_phase(line) not in (phase, None)]
        if len(kept) == len(lines):
            return 0
        tmp = self.metrics_path.with_name(f".{METRICS_FILE}.{os.getpid()}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.metrics_path)
        return len(lines) - len(kept)

    def _init_run(self, phase: int, name: str, config: dict):
        # Everything is passed explicitly, so WANDB_MODE / WANDB_DIR in the environment cannot
        # send an offline session to the network or elsewhere on disk.
        settings = self._wandb.Settings(mode=self.mode, silent=True, console="off", save_code=False,
                                        disable_git=True, disable_job_creation=True, x_disable_stats=True)
        return self._wandb.init(project=self.project, group=self.session_id, name=f"phase{phase}-{name}",
                                job_type=name, tags=[f"phase{phase}", name], config=config,
                                dir=str(self.session_dir), reinit="create_new", settings=settings)

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics of the current phase at `step` (default: the last step + 1; never decreasing)."""
        if self._phase is None:
            raise RuntimeError("no phase is running; call start_phase first")
        clean = _clean_metrics(metrics)
        if step is None:
            step = self._last_step + 1
        if isinstance(step, bool) or not isinstance(step, int) or step < max(self._last_step, 0):
            raise ValueError(f"Invalid step: {step!r}; expected an integer >= {max(self._last_step, 0)} "
                             "(steps never go back within a phase)")
        self._last_step = step
        self._flag_unknown(clean)
        self._append_jsonl(clean, step)
        if self._run is not None:
            self._run.log(clean, step=step)

    def _flag_unknown(self, metrics: Mapping[str, float]) -> None:
        for name in metrics:
            if name not in self._unknown and lookup_metric(name, self._phase) is None:
                self._unknown.add(name)
                log.warning("metric %r of phase %d is not in forge.tracking.METRIC_CATALOGUE", name, self._phase)

    def _append_jsonl(self, metrics: Mapping[str, float], step: int) -> None:
        record = {"time": time.time(), "session_id": self.session_id, "phase": self._phase,
                  "phase_name": self._phase_name, "step": step,
                  "metrics": {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}}
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def log_model_artifact(self, path: str | Path, name: str, metadata: dict) -> tuple[str, str] | None:
        """Log the file at `path` as a W&B Artifact of type "model"; returns (name, version), or None
        when W&B is off.

        Online, the version is W&B's "v<N>" (after waiting for the upload). Offline, W&B assigns
        "v<N>" only at `wandb sync`, so the version returned is "offline:<digest>", the artifact's
        content digest (the same digest identifies that version once synced).
        """
        if self._phase is None:
            raise RuntimeError("no phase is running; call start_phase first")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        if not isinstance(name, str) or not _ARTIFACT_NAME.match(name):
            raise ValueError(f"Invalid artifact name: {name!r}; allowed: letters, digits, '_', '-', '.' "
                             "(starting with a letter or digit)")
        if self._run is None:
            return None
        artifact = self._wandb.Artifact(name, type="model", metadata=dict(metadata))
        artifact.add_file(str(path))
        self._run.log_artifact(artifact, aliases=[f"phase{self._phase}"])
        if self.mode == "online":
            artifact.wait()
            return name, artifact.version
        return name, f"offline:{artifact.digest}"

    def finish_phase(self, exit_code: int = 0) -> None:
        """End the current phase (and its W&B run; exit_code != 0 marks it failed). No-op without one."""
        if self._run is not None:
            self.run_dirs.append(Path(self._run.dir).parent)
            self._run.finish(exit_code=exit_code)
        self._run, self._phase, self._phase_name = None, None, None

    def close(self, exit_code: int = 0) -> None:
        """Finish the open phase and, if this tracker made W&B runs, shut the W&B service down.

        wandb 0.31 writes the end of a run's `.wandb` file asynchronously after `run.finish()`
        (measured: the last run's file was sometimes still a bare header right after finish);
        `wandb.teardown()` waits for it, so every run folder is complete and syncable once
        close() returns. Teardown also finishes any other wandb run of this process.
        """
        if self._closed:
            return
        self.finish_phase(exit_code=exit_code)
        self._closed = True
        if self._wandb is not None and self.run_dirs:
            self._wandb.teardown()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)

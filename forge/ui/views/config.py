"""Config: the default config and a session's config as YAML, an editor that validates an edited config with
the CLI's own field-path errors, and a button that starts `forge run` on it.

The dashboard's layer may not import the pipeline, so validation and the run happen in child processes:
`forge.pipeline.config.load_config` (what `forge run --config` calls) and `python -m forge.cli run`.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import streamlit as st
import yaml

from forge.ui import data

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "config" / "pipeline_config.yaml"
VALIDATE = ("import sys\nfrom forge.pipeline.config import ConfigError, load_config\n"
            "try:\n    load_config(sys.argv[1])\nexcept ConfigError as error:\n"
            "    print(error)\n    sys.exit(2)\nprint('config ok')\n")
VALIDATE_TIMEOUT_S = 120


def validate_yaml(text: str) -> tuple[bool, str]:
    """(valid, message): the edited YAML checked by forge.pipeline.config, errors as `field.path: problem`."""
    with tempfile.TemporaryDirectory(prefix="forge-ui-") as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(text, encoding="utf-8")
        done = subprocess.run([sys.executable, "-c", VALIDATE, str(path)], capture_output=True, text=True, check=False,
                              timeout=VALIDATE_TIMEOUT_S)
    if done.returncode == 0:
        return True, done.stdout.strip()
    return False, (done.stdout + done.stderr).strip()


def start_run(text: str, run_root: Path) -> tuple[subprocess.Popen, Path]:
    """`forge run --config <edited file>` on this run root, as a child process; its output goes to a log file."""
    folder = Path(tempfile.mkdtemp(prefix=f"forge-ui-run-{datetime.now(timezone.utc):%Y%m%d_%H%M%S}-"))
    config_path, log_path = folder / "config.yaml", folder / "run.log"
    config_path.write_text(text, encoding="utf-8")
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen([sys.executable, "-m", "forge.cli", "run", "--config", str(config_path),
                                    "--set", f"run_root={run_root}"], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return process, log_path


def session_yaml(run: data.RunRoot, session: dict | None) -> str | None:
    if session is None:
        return None
    config = data.session_config(run, session["id"]).get("pipeline")
    return None if config is None else yaml.safe_dump(config, sort_keys=False)


def render(run: data.RunRoot, session: dict | None) -> None:
    default = DEFAULT_CONFIG.read_text(encoding="utf-8") if DEFAULT_CONFIG.is_file() else None
    chosen = session_yaml(run, session)
    left, right = st.columns(2)
    with left:
        st.markdown("#### Default config")
        with st.container(height=420):
            st.code(default or "config/pipeline_config.yaml is not next to this installation", language="yaml")
    with right:
        st.markdown(f"#### Session config ({session['id'] if session else 'no session'})")
        with st.container(height=420):
            st.code(chosen or "no session chosen", language="yaml")
    render_editor(run, chosen or default or "")


def render_editor(run: data.RunRoot, start_text: str) -> None:
    st.markdown("#### Edit, validate, run")
    text = st.text_area("Pipeline config (YAML)", value=start_text, height=300, key="config_editor")
    validate, launch = st.columns(2)
    if validate.button("Validate", key="config_validate"):
        ok, message = validate_yaml(text)
        (st.success if ok else st.error)(message)
    if launch.button("Start forge run on this config", key="config_run"):
        ok, message = validate_yaml(text)
        if not ok:
            st.error(message)
            return
        process, log_path = start_run(text, run.root)
        st.session_state["started_runs"] = [*st.session_state.get("started_runs", []), (process.pid, str(log_path))]
        st.success(f"Started `forge run` (process {process.pid}); its output goes to {log_path}. "
                   "The overview shows its session while it runs.")
    for pid, log_path in st.session_state.get("started_runs", []):
        st.caption(f"run process {pid}: log {log_path}")

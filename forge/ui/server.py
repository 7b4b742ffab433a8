"""Start the dashboard: `streamlit run forge/ui/app.py` on 127.0.0.1, with the run root in the environment."""
from __future__ import annotations

import os
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"
RUN_ROOT_ENV = "FORGE_UI_RUN_ROOT"


def streamlit_command(port: int, address: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", address,
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--global.developmentMode", "false", "--client.toolbarMode", "minimal",
            "--server.fileWatcherType", "none", "--server.runOnSave", "false"]


def check_installed() -> str | None:
    """None when streamlit and plotly import; otherwise what to install."""
    missing = [name for name in ("streamlit", "plotly") if _missing(name)]
    return f"forge ui needs {' and '.join(missing)}: pip install \"forge[ui]\"" if missing else None


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def serve(run_root: str | Path, port: int) -> int:
    """Become the Streamlit server (exec, so a signal to `forge ui` reaches the server itself and no child is
    left behind); it runs until stopped (Ctrl-C)."""
    env = {**os.environ, RUN_ROOT_ENV: str(Path(run_root).resolve())}
    print(f"forge ui: http://127.0.0.1:{port} (run root {Path(run_root).resolve()}); Ctrl-C stops it", flush=True)
    command = streamlit_command(port)
    os.execve(command[0], command, env)
    return 0   # not reached: execve replaces this process

"""The script Streamlit runs for `forge ui`: a sidebar (run root, page, session) and the chosen page.

The run root comes from FORGE_UI_RUN_ROOT (set by `forge ui --run-root`), and can be changed in the sidebar.
A run root or registry the dashboard cannot read is shown as a message, never as a traceback.
"""
from __future__ import annotations

import os

import streamlit as st

from forge.phase_table import PHASE_NAMES
from forge.ui import data
from forge.ui.views import common, compare, config, models, overview, phase, system

RUN_ROOT_ENV = "FORGE_UI_RUN_ROOT"
PHASE_PAGES = {f"Phase {n}: {name}": n for n, name in PHASE_NAMES.items()}
PAGES = ["Pipeline overview", *PHASE_PAGES, "Models", "Compare", "Config", "System"]
SIMPLE_PAGES = {"Pipeline overview": overview.render, "Models": models.render, "Compare": compare.render,
                "Config": config.render, "System": system.render}


def sidebar() -> tuple[str, str]:
    st.sidebar.title("forge")
    if "run_root" not in st.session_state:
        st.session_state["run_root"] = os.environ.get(RUN_ROOT_ENV, "runs/")
    run_root = st.sidebar.text_input("Run root", key="run_root")
    page = st.sidebar.radio("Page", PAGES, key="page")
    return run_root, page


def render_page(run: data.RunRoot, page: str) -> None:
    with st.sidebar:
        session = common.pick_session(data.list_sessions(run))
    if page in PHASE_PAGES:
        phase.render(run, session, PHASE_PAGES[page])
    else:
        SIMPLE_PAGES[page](run, session)


def main() -> None:
    st.set_page_config(page_title="forge dashboard", layout="wide")
    run_root, page = sidebar()
    st.title(page)
    try:
        run = data.RunRoot.open(run_root)
        render_page(run, page)
    except data.DashboardDataError as error:
        st.error(str(error))


if __name__ == "__main__":     # streamlit runs this file as __main__; importing it draws nothing
    main()

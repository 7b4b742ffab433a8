"""The model registry: a searchable table, one model's lineage graph, sidecar, hash check and download."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from forge.ui import data, plots

HEADLINE = ("val_accuracy", "accuracy", "val_loss", "fitness", "compression_ratio")


def models_table(models: list[dict]) -> pd.DataFrame:
    rows = []
    for m in models:
        numbers = data.flat_numbers(m["metrics"])
        rows.append({"id": m["id"], "phase": m["phase"], "name": m["name"], "session": m["session_id"],
                     "size (MiB)": round(m["size_bytes"] / 2**20, 3), "parameters": m["parameter_count"],
                     "metrics": ", ".join(f"{k} {v:.4g}" for k, v in sorted(numbers.items())),
                     "sha256": m["sha256"][:16], "created (UTC)": m["created_at"][:19].replace("T", " ")})
    return pd.DataFrame(rows)


def search(models: list[dict], text: str) -> list[dict]:
    """Models whose id, name, phase name, session or sha256 contains `text` (case-insensitive)."""
    needle = text.strip().lower()
    if not needle:
        return models
    return [m for m in models if any(needle in str(m[k]).lower()
                                     for k in ("id", "name", "phase_name", "session_id", "sha256"))]


def render(run: data.RunRoot, session: dict | None) -> None:
    models = data.list_models(run)
    if not models:
        st.info("The registry has no models yet.")
        return
    text = st.text_input("Search (id, name, phase, session, sha256)", key="model_search")
    found = search(models, text)
    st.caption(f"{len(found)} of {len(models)} models")
    st.dataframe(models_table(found), hide_index=True)
    if not found:
        return
    model_id = st.selectbox("Model", [m["id"] for m in found], key="model_pick")
    render_model(run, next(m for m in found if m["id"] == model_id))


def render_model(run: data.RunRoot, model: dict) -> None:
    st.subheader(model["id"])
    st.markdown(f"Phase {model['phase']} ({model['phase_name']}), session `{model['session_id']}`, "
                f"{model['size_bytes']:,} bytes, {model['parameter_count'] or '?'} parameters")
    st.caption(model["path"])
    lineage, edges = data.lineage_edges(run, model["id"])
    st.plotly_chart(plots.lineage_graph(lineage, edges, f"Lineage of {model['name']} back to Phase 1"),
                    key="lineage")
    left, right = st.columns(2)
    if left.button("Verify file against the registry", key="verify"):
        ok, message = data.verify_model(model)
        (st.success if ok else st.error)(("Verified: " if ok else "Mismatch: ") + message)
    path = Path(model["path"])
    if path.is_file():
        right.download_button("Download checkpoint", data=path.read_bytes(), file_name=path.name,
                              mime="application/octet-stream", key="download")
    else:
        right.warning(f"The file {path} is missing.")
    sidecar = data.read_sidecar(path)
    if sidecar is None:
        st.caption("This checkpoint has no JSON sidecar.")
        return
    with st.expander("Sidecar (config, tokenizer, metadata)", expanded=False):
        st.code(json.dumps(sidecar, indent=2, sort_keys=True)[:20000], language="json")

"""The `forge ui` dashboard: a Streamlit app over a run root, read-only.

`forge.ui.data` reads the registry (SQLite URI ``mode=ro``, so the dashboard never takes a write lock,
changes or creates anything a running pipeline writes) and each session's ``metrics.jsonl``;
`forge.ui.plots` turns those records into plotly figures; `forge.ui.views` (one module per page) lays them out;
`forge.ui.app` is the script Streamlit runs, `forge.ui.server` starts it.
"""

"""The dashboard in a real browser: `forge ui` serves it on 127.0.0.1 and Debian's chromium, driven by Playwright,
visits every page, checks what each must show, that the console logged no error, and screenshots each page
into the test's temporary folder."""
from __future__ import annotations

import pytest
from _browser import CHROMIUM, slug, visit_all

pytest.importorskip("playwright", reason="the browser test needs playwright (pip install -e '.[test]')")
if not CHROMIUM.is_file():
    pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)


def test_every_page_in_a_browser(tmp_path, run_root, recorded):
    from forge.ui.app import PAGES

    report = visit_all(run_root, tmp_path, PAGES)
    assert report["errors"] == [], report["errors"]
    pages = report["pages"]
    session = recorded["session"]["id"]
    champion = recorded["phases"][2]["model_ids"][0]
    overview, _ = pages["Pipeline overview"]
    assert session in overview and "Handoff checks" in overview and champion in overview
    for phase in (1, 2):
        text, _ = pages[next(p for p in PAGES if p.startswith(f"Phase {phase}:"))]
        assert "Final metrics" in text and "Models of this phase" in text
    assert "has no recorded data" in pages["Phase 5: curriculum"][0]
    models, plots = pages["Models"]
    assert champion in models and "Verify file against the registry" in models and plots == 1   # the lineage
    assert pages["Compare"][1] >= 1 and session in pages["Compare"][0]
    assert "Validate" in pages["Config"][0] and "steps: 4" in pages["Config"][0]
    assert "CPU cores" in pages["System"][0] and "Disk free (run root)" in pages["System"][0]
    for label in PAGES:
        shot = tmp_path / f"{slug(label)}.png"
        assert shot.is_file() and shot.stat().st_size > 10_000, label

"""A sweep in Debian's chromium, against the app on 127.0.0.1 and the real sweep worker: the Train tab's form with
2 values of unet_lr in its Sweep section, the Sweeps tab's table filling with 2 ranked trials and the best config,
then that config started as a full run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.test_browser import (CHROMIUM, App, app, browser, fill, field_value, models, page,  # noqa: F401  (fixtures)
                                set_up_run)
from tests.test_training import draw_dataset

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason="Debian's chromium is not installed")]


def table_text(page) -> str:
    return page.locator("#sweep-table").inner_text()


def test_a_sweep_from_the_train_tab(app, page, tmp_path):  # noqa: F811
    from trainer import config, sweep

    images = sorted(draw_dataset(tmp_path / "pictures", 6).glob("*.png"))
    set_up_run(page, app, images)
    wanted = {"max-train-epochs": "1", "validation-split": "0.34", "validation-every-n-steps": "1",
              "sample-every-n-epochs": "0", "save-every-n-epochs": "0"}
    for elem, value in wanted.items():
        fill(page, elem, value)
    assert all(field_value(page, e) == v for e, v in wanted.items())
    page.locator("#sweep-section").get_by_text("Sweep:").click()
    values = page.locator("#sweep-values-0 input, #sweep-values-0 textarea").first
    values.fill("1e-4, 1e-3")
    values.press("Tab")
    page.locator("#sweep-start").click()
    try:
        page.locator("#sweep-status").get_by_text("2 trial(s), grid search").wait_for(state="attached", timeout=30000)
    except Exception:
        raise AssertionError(f"no sweep; the section says {page.locator('#sweep-status').inner_text()!r}") from None
    page.locator("#sweep-state").get_by_text("2 / 2 trial(s) ended").wait_for(timeout=60000)  # the Sweeps tab
    page.locator("#sweep-best").get_by_text("Best:").wait_for(timeout=15000)
    deadline = time.time() + 15
    while not ("trial-000" in (text := table_text(page)) and "trial-001" in text and text.count("done") >= 2):
        assert time.time() < deadline, text
        page.wait_for_timeout(300)
    runs = app.args[app.args.index("--runs-dir") + 1]
    (folder,) = [p.parent for p in Path(runs).glob("*/sweep.json")]
    state = sweep.read(folder)
    best = state["ranking"][0]["name"]
    assert [r["rank"] for r in state["ranking"]] == [1, 2]
    assert f"Best: {best} (" in page.locator("#sweep-best").inner_text()  # (it may hold a progress overlay)
    words = text.split()  # the table's cells, row by row: rank, trial, ...
    ranked = [words[words.index(r["name"]) - 1] + " " + r["name"] for r in state["ranking"]]
    assert ranked == [f"{r['rank']} {r['name']}" for r in state["ranking"]], text
    assert words.index(best) < words.index(state["ranking"][1]["name"]), text  # the best first
    shown = page.locator("#sweep-best-config").inner_text()
    assert "[model]" in shown and "resolution = 64" in shown  # the editor draws only the lines in view
    assert page.locator("#sweep-plot").get_by_text("held-out loss").count() > 0

    page.locator("#sweep-full-run").click()
    page.locator("#sweep-action").get_by_text("Queued").wait_for(timeout=30000)
    run_id = page.locator("#sweep-action strong").inner_text()
    run = Path(runs) / run_id
    assert config.load(run / "config.toml").optimizer.unet_lr == state["ranking"][0]["params"]["unet_lr"]
    deadline = time.time() + 60  # let the full run end, so no worker outlives the test
    while json.loads((run / "status.json").read_text())["state"] in ("queued", "running"):
        assert time.time() < deadline
        time.sleep(0.5)

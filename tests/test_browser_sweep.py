"""A sweep in Debian's chromium, against the app on 127.0.0.1 and the real sweep worker, as issue #16 checks it: the
demo dataset on the demo model, the Train tab's form with 4 values of unet_lr in its Sweep section and successive
halving, the Sweeps tab's table filling with 4 ranked trials (the pruned ones marked) and the best config, then that
config started as a full run; the Runs tab lists the trials; the sweep is deleted, asked twice, with no page error."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.test_browser import (CHROMIUM, SHOTS, App, app, browser, fill_until_still, models, page,  # noqa: F401
                                wait_text)

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason="Debian's chromium is not installed")]


def table_text(page) -> str:
    return page.locator("#sweep-table").inner_text()


DEMO_FORM = {"max-train-epochs": "2", "num-repeats": "1", "train-batch-size": "2", "network-dim": "4",
             "network-alpha": "2", "validation-split": "0.2", "validation-every-n-steps": "2",
             "sample-every-n-epochs": "0", "save-every-n-epochs": "0"}  # 8 pictures trained, 8 steps, 2 held out


HEADER_LINES = """() => Object.fromEntries([...document.querySelectorAll('#sweep-table th span.header')].map(s => {
    const r = document.createRange(); r.selectNodeContents(s);
    return [s.innerText.trim(), new Set([...r.getClientRects()].map(x => Math.round(x.top))).size]; }))"""


def set_up_demo(page, app) -> None:
    """The demo dataset (Dataset tab) on the demo model (the Train tab's default base), the form made short."""
    page.goto(app.url)
    page.locator("#dataset-demo").click()
    page.get_by_text("Added 10 picture(s)").wait_for(timeout=30000)
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-preset-info").get_by_text("A person or character").wait_for(timeout=30000)
    page.locator("#train-advanced").get_by_text("Advanced").click()
    fill_until_still(page, DEMO_FORM)


def test_a_sweep_from_the_train_tab(app, page):  # noqa: F811
    from trainer import config, sweep
    from ui import sweep_tab

    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    set_up_demo(page, app)
    page.locator("#sweep-section").get_by_text("Sweep:").click()
    fill_until_still(page, {"values-0": "1e-4, 3e-4, 1e-3, 3e-3"}, tab="sweep-")
    page.locator("#sweep-prune").get_by_text("halving").click()
    page.locator("#sweep-start").click()
    try:
        page.locator("#sweep-status").get_by_text("4 trial(s), grid search").wait_for(state="attached", timeout=30000)
    except Exception:
        raise AssertionError(f"no sweep; the section says {page.locator('#sweep-status').inner_text()!r}") from None
    page.locator("#sweep-state").get_by_text("4 / 4 trial(s) ended").wait_for(timeout=420000)  # the Sweeps tab
    page.locator("#sweep-best").get_by_text("Best:").wait_for(timeout=45000)
    deadline = time.time() + 15
    while not (all(f"trial-00{i}" in (text := table_text(page)) for i in range(4)) and "pruned" in text):
        assert time.time() < deadline, text
        page.wait_for_timeout(300)
    runs = app.args[app.args.index("--runs-dir") + 1]
    (folder,) = [p.parent for p in Path(runs).glob("*/sweep.json")]
    state = sweep.read(folder)
    best = state["ranking"][0]["name"]
    assert [r["rank"] for r in state["ranking"]] == [1, 2, 3, 4]
    pruned = [t["name"] for t in state["trials"] if t["state"] == "pruned"]
    assert pruned and text.count("pruned") >= len(pruned) and best not in pruned
    assert "pruned at step 2: held-out " in text and "pruned: pruned" not in text and "rung" not in text, text  # S5
    assert f" @ {state['ranking'][0]['step']}" in text, text  # the step the held-out loss is from (S4)
    lines = page.evaluate(HEADER_LINES)
    assert [lines[h] for h in ("rank", "trial", "step")] == [1, 1, 1], lines  # no header wraps inside a word
    assert page.locator("#sweep-whole").inner_text() == sweep_tab.WHOLE_SWEEP.replace("*", "")  # S2's note
    assert f"Best: {best} (" in page.locator("#sweep-best").inner_text()  # (it may hold a progress overlay)
    words = text.split()  # the table's cells, row by row: rank, trial, ...
    ranked = [words[words.index(r["name"]) - 1] + " " + r["name"] for r in state["ranking"]]
    assert ranked == [f"{r['rank']} {r['name']}" for r in state["ranking"]], text
    assert words.index(best) < words.index(state["ranking"][1]["name"]), text  # the best first
    shown = page.locator("#sweep-best-config").inner_text()
    assert "[model]" in shown and 'pretrained_model_name_or_path = "demo"' in shown  # (only the lines in view)
    assert page.locator("#sweep-plot").get_by_text("held-out loss").count() > 0
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "sweeps.png"), full_page=True)
    page.locator("#sweep-table").get_by_text(best, exact=True).filter(visible=True).first.click()  # a row: a trial (S2)
    page.locator("#sweep-stop-trial").get_by_text(f"Stop trial {best}").wait_for(timeout=10000)
    page.locator("#sweep-stop-trial").click()
    page.locator("#sweep-action").get_by_text(f"{folder.name}/{best} is not training (done)").wait_for(timeout=10000)

    page.locator("#sweep-full-run").click()
    wait_text(page, "#sweep-action", "Queued")
    run_id = page.locator("#sweep-action strong").inner_text()
    run = Path(runs) / run_id
    assert config.load(run / "config.toml").optimizer.unet_lr == state["ranking"][0]["params"]["unet_lr"]
    page.get_by_role("tab", name="Runs").click()
    page.locator("#runs-table").get_by_text(f"{folder.name}/{best}").wait_for(timeout=45000)  # trials are listed
    deadline = time.time() + 240  # let the full run end, so no worker outlives the test
    while json.loads((run / "status.json").read_text())["state"] in ("queued", "running"):
        assert time.time() < deadline
        time.sleep(0.5)

    page.get_by_role("tab", name="Sweeps").click()  # Delete is asked twice; the page then shows no sweep (S6)
    page.locator("#sweep-delete").click()
    page.locator("#sweep-delete").get_by_text(f"Click again to delete {folder.name} for good").wait_for(timeout=10000)
    said = page.locator("#sweep-action").inner_text()
    assert "the sweep and its 4 trial(s)" in said and folder.is_dir(), said
    page.locator("#sweep-delete").click()
    page.locator("#sweep-action").get_by_text(f"Deleted {folder.name} and its trials.").wait_for(timeout=10000)
    page.wait_for_timeout(2500)  # a few ticks of the timer, which had the deleted sweep's id
    shown = page.locator("#sweep-state").inner_text()  # (it may hold the Delete's progress overlay)
    assert sweep_tab.NOT_CHOSEN in shown and "⚠" not in shown and not folder.exists(), shown
    assert page.locator("#sweep-delete").inner_text() == "Delete" and errors == [], errors

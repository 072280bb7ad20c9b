"""One bad run never stops the app: unreadable events are skipped and counted, a broken status is unknown (never
queued, never started), and the app serves on 127.0.0.1 whatever the runs folder holds."""

import json
import time

import pytest

from tests.test_browser import App
from trainer import config
from trainer.events import EventReader, read_all
from trainer.rundir import RunDir

pytestmark = pytest.mark.slow
DONE = {"type": "done", "time": 2, "path": "output/lora.safetensors"}
STEP = {"type": "step", "time": 1, "step": 1, "total_steps": 1, "epoch": 1, "loss": 0.5, "lr": 1e-4}


def damaged(runs_dir, name, status_text, event_lines):
    run = RunDir(runs_dir / name)
    run.path.mkdir(parents=True)
    config.save(config.build("character", "sd15"), run.config)
    if status_text is not None:
        run.status_file.write_text(status_text)
    run.events.write_bytes(b"".join(line + b"\n" for line in event_lines))
    return run


def corpus(runs_dir):
    garbage = [b"\xff\xfe not json", b"{}", b"[1, 2]", b'{"type": "step", "time": 1, "step": "x"}']
    ok = [json.dumps(STEP).encode(), json.dumps(DONE).encode()]
    return {
        "bad-lines": damaged(runs_dir, "bad-lines", json.dumps({"state": "running", "pid": 999_999_999}),
                             garbage[:2] + ok[:1] + garbage[2:] + ok[1:]),
        "only-garbage": damaged(runs_dir, "only-garbage", json.dumps({"state": "running", "pid": "nope"}),
                                garbage),
        "not-an-object": damaged(runs_dir, "not-an-object", "[1, 2]", ok),
        "cut-short": damaged(runs_dir, "cut-short", '{"state": "do', ok),
        "unknown-state": damaged(runs_dir, "unknown-state", '{"state": "flying", "pgid": 0}', ok),
    }


def test_unreadable_event_lines_are_skipped_and_counted(tmp_path):
    run = corpus(tmp_path)["bad-lines"]
    reader = EventReader(run.events)
    assert [e["type"] for e in reader.read_new()] == ["step", "done"] and reader.skipped == 4
    assert [e["type"] for e in read_all(run.path)] == ["step", "done"]


def test_the_app_serves_and_shows_every_damaged_run(tmp_path):
    from gradio_client import Client

    runs = corpus(tmp_path / "runs")
    app = App(tmp_path / "runs", tmp_path).start()
    try:
        client = Client(app.url, verbose=False)
        listed = {r["run_id"]: r for r in client.predict(api_name="/list_runs")["runs"]}
        cancelled = client.predict(run_id="unknown-state", api_name="/cancel")  # pgid 0 must signal nobody
        time.sleep(2)  # a few ticks of the queue
        assert app.proc.poll() is None  # still serving
    finally:
        app.stop()
    assert listed["bad-lines"]["state"] == "done"  # its worker is gone; the events say how it ended
    assert listed["only-garbage"]["state"] == "interrupted"
    assert listed["not-an-object"]["state"] == "unknown" and "does not hold an object" in listed["not-an-object"][
        "message"]
    assert listed["cut-short"]["state"] == "unknown" and "not valid JSON" in listed["cut-short"]["message"]
    assert "'flying'" in listed["unknown-state"]["message"] and cancelled["state"] == "unknown"
    for run in runs.values():  # none was started
        assert not run.stdout.exists() and run.holder() is None


def test_a_dataset_of_unreadable_pictures_is_named_briefly_without_its_folder(tmp_path):
    """QA s28 F10: ten pictures made a heading of eleven lines, the run folder's path in it ten times."""
    from trainer import data

    for i in range(5):
        (tmp_path / f"p{i}.png").write_bytes(b"not a picture")
        (tmp_path / f"p{i}.txt").write_text("zxq")
    with pytest.raises(data.DatasetError) as e:
        data.build_items(data.scan(tmp_path), 64, 64, 128, False, 1)
    assert str(e.value) == ("none of the 5 picture(s) could be read (p0.png: cannot identify image file; p1.png: "
                            "cannot identify image file; p2.png: cannot identify image file; and 2 more)")

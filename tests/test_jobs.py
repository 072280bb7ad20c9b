"""The job manager without a browser: recovery of runs whose worker died, the queue, resume rules."""

import json

import pytest

from trainer import config
from ui.jobs import JobManager


def fake_run(runs_dir, name, state, pid=None, events=()):
    run = runs_dir / name
    run.mkdir(parents=True)
    config.save(config.build("character", "sd15"), run / "config.toml")
    (run / "status.json").write_text(json.dumps({"state": state, "pid": pid, "created": len(name)}))
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def test_runs_whose_worker_died_are_interrupted_or_ended_by_their_events(tmp_path):
    fake_run(tmp_path, "a", "running", pid=999_999_999)  # no such process
    fake_run(tmp_path, "b", "running", pid=999_999_998, events=[{"type": "done", "time": 1, "path": "x"}])
    fake_run(tmp_path, "c", "running", pid=999_999_997, events=[{"type": "error", "time": 1, "message": "OOM"}])
    jobs = JobManager(tmp_path)
    states = {r.run_id: (r.state, r.message) for r in jobs.runs()}
    assert states["a"][0] == "interrupted" and "resumable" in states["a"][1]
    assert states["b"] == ("done", "") and states["c"] == ("failed", "OOM")
    with pytest.raises(ValueError, match="only a cancelled, interrupted or failed run can resume"):
        jobs.resume("b")


def test_cancel_before_start_and_delete(tmp_path):
    fake_run(tmp_path, "q", "queued")
    fake_run(tmp_path, "r", "running", pid=None)
    jobs = JobManager(tmp_path)
    jobs.tick = lambda: None  # keep the queue still: this test starts no worker
    assert jobs.cancel("q").state == "cancelled"
    jobs.delete("q")
    assert [r.run_id for r in jobs.runs()] == ["r"]

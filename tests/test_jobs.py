"""The job manager without a browser: recovery of runs whose worker died, the queue, resume rules."""

import json
import os
import sys
import time

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


def fake_worker(tmp_path):
    """A stand-in for the Python interpreter the manager launches workers with: it records its arguments and
    CUDA_VISIBLE_DEVICES, then waits until the test lets it go."""
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\nrun=$(eval echo \\${$#})\n"
                      'echo "$CUDA_VISIBLE_DEVICES|$*" > "$run/launched"\n'
                      'while [ -d "$run" ] && [ ! -e "$run/finish" ]; do sleep 0.05; done\n')
    script.chmod(0o755)
    return str(script)


def queue(jobs, tmp_path, name, gpus=1):
    from trainer.rundir import create

    cfg = config.build("character", "sd15", {"num_gpus": gpus})
    return create(jobs.runs_dir, cfg, lambda d: d.mkdir(), state="queued", name=name)


def launched(run):
    path = run.path / "launched"
    return path.read_text().strip().split("|") if path.is_file() else None


def finish(jobs, run):
    (run.path / "finish").touch()
    jobs._procs[run.id].wait(timeout=10)
    jobs.tick()


def test_one_run_per_gpu_with_a_fake_device_list(tmp_path):
    jobs = JobManager(tmp_path / "runs", python=fake_worker(tmp_path), devices=["0", "1"])
    runs = [queue(jobs, tmp_path, name) for name in ("a", "b", "c")]
    wide = queue(jobs, tmp_path, "d", gpus=2)
    too_wide = queue(jobs, tmp_path, "e", gpus=3)
    try:
        jobs.tick()
        wait_for(lambda: launched(runs[0]) and launched(runs[1]))
        assert {launched(runs[0])[0], launched(runs[1])[0]} == {"0", "1"}  # a GPU each
        assert jobs.info("c").state == "queued" and launched(runs[2]) is None
        assert jobs.info("e").state == "failed" and "asks for 3 GPUs" in jobs.info("e").message
        freed = launched(runs[1])[0]
        finish(jobs, runs[1])
        wait_for(lambda: launched(runs[2]))
        assert launched(runs[2])[0] == freed and jobs.info("c").devices == [freed]
        assert jobs.info("d").state == "queued"  # waits for two free GPUs
        finish(jobs, runs[0])
        finish(jobs, runs[2])
        wait_for(lambda: launched(wide))
        devices, argv = launched(wide)
        assert devices == "0,1" and "accelerate.commands.launch --multi_gpu --num_processes 2 -m trainer" in argv
    finally:
        for run in runs + [wide]:
            (run.path / "finish").touch()


def test_on_a_cpu_machine_one_run_at_a_time(tmp_path):
    jobs = JobManager(tmp_path / "runs", python=fake_worker(tmp_path), devices=[])
    a, b = queue(jobs, tmp_path, "a"), queue(jobs, tmp_path, "b")
    try:
        jobs.tick()
        wait_for(lambda: launched(a))
        assert launched(a) == ["", f"-m trainer {a.path}"] and jobs.info("b").state == "queued"
        finish(jobs, a)
        wait_for(lambda: launched(b))
        assert jobs.info("a").state == "interrupted"  # the fake wrote no "done" event
    finally:
        (a.path / "finish").touch()
        (b.path / "finish").touch()


def test_runs_made_by_the_command_line_are_never_started_by_the_app(tiny_models, tmp_path):
    import subprocess
    import sys

    from tests.test_rundir import ROOT, hold_lock
    from tests.test_training import draw_dataset

    runs_dir = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "trainer", "new", "--base", str(tiny_models["sd1"][1]), "--images",
                        str(draw_dataset(tmp_path / "pictures")), "--preset", "style", "--runs-dir", str(runs_dir),
                        "--name", "cli", "--no-train"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    bare = runs_dir / "bare"  # a config and no status: made by hand, or a CLI run caught half-written
    bare.mkdir()
    config.save(config.build("style", "sd15"), bare / "config.toml")
    jobs = JobManager(runs_dir, python=fake_worker(tmp_path), devices=[])
    jobs.tick()
    assert jobs.info("cli").state == "created" and jobs.info("bare").state == "unknown"
    assert "python -m trainer" in jobs.info("bare").message and not jobs._procs
    # the command line trains it: its worker holds the lock; a resume from the app is refused while it lives
    holder = hold_lock(runs_dir / "cli")
    try:
        with pytest.raises(ValueError, match=f"being trained by pid {holder.pid}"):
            jobs.resume("cli")
        jobs.tick()
        assert not jobs._procs
    finally:
        holder.kill()
        holder.wait()
    assert jobs.resume("cli").state == "running"  # handed to the app: it runs it
    wait_for(lambda: launched(jobs.run_dir("cli")))
    (runs_dir / "cli" / "finish").touch()


def test_a_run_refused_for_a_setting_is_not_resumed_to_fail_again_until_its_config_changes(tmp_path):
    """QA: Resume was offered for a run whose worker refused a setting (it failed the same way again)."""
    import subprocess

    from tests.test_rundir import ROOT
    from ui import monitor_tab

    run = fake_run(tmp_path / "runs", "bad", "queued")
    toml = run / "config.toml"
    toml.write_text(toml.read_text().replace("network_dim = 32", "network_dim = 0"))  # edited by hand
    r = subprocess.run([sys.executable, "-m", "trainer", str(run)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "network.network_dim = 0: must be >= 1" in r.stderr, r.stderr
    jobs = JobManager(tmp_path / "runs", python=fake_worker(tmp_path), devices=[])
    info = jobs.info("bad")
    assert (info.state, info.refused) == ("failed", True)
    with pytest.raises(ValueError, match="failed on its settings or its pictures, and resuming it would fail the "
                                         "same way: fix it and train again from the Train tab"):
        jobs.resume("bad")
    title, *_, cancel, resume, _ = monitor_tab.refresh(jobs, "bad", None)
    assert title.startswith("### bad — failed · Dim = 0: must be >= 1 and <= 1024")  # the form's words
    assert "Resuming it would fail the same way" in title and not resume["interactive"] and not cancel["interactive"]
    later = time.time() + 5
    os.utime(toml, (later, later))  # the config edited since: its run may be resumed
    assert not jobs.info("bad").refused
    assert jobs.resume("bad").state == "running"
    wait_for(lambda: launched(jobs.run_dir("bad")))
    (run / "finish").touch()


def test_pictures_that_cannot_be_read_fail_the_same_way_again_and_a_crash_may_not():
    from trainer.__main__ import refused
    from trainer.data import DatasetError

    assert refused(DatasetError("no readable images")) and refused(config.ConfigError("a.b", "bad"))  # QA s28 F14
    assert not refused(RuntimeError("CUDA error")) and not refused(OSError("disk"))


def test_a_run_not_begun_is_started_by_the_monitors_start_button():
    from ui import monitor_tab

    assert [u["value"] for _, u in (monitor_tab.buttons(s) for s in ("created", "failed", ""))] == [
        "Start", "Resume", "Resume"]
    assert monitor_tab.buttons("failed", refused=True)[1]["interactive"] is False


def wait_for(condition, timeout=10.0):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_cancel_never_signals_a_group_a_status_file_names_falsely(tmp_path):
    from tests.test_rundir import hold_lock

    run = fake_run(tmp_path, "r", "running")
    holder = hold_lock(run)  # a live worker holds it, so the run counts as running
    try:
        jobs = JobManager(tmp_path, devices=[])
        for group in (0, 1, os.getpgrp()):  # killpg(0) would stop this very process
            jobs.run_dir("r").write_status(state="running", pgid=group, pid=None)
            assert jobs.cancel("r").message == "cancelling: saving state"
            jobs._cancels.clear()
        assert holder.poll() is None  # nothing reached the worker either: its group was never named
    finally:
        holder.kill()
        holder.wait()


def test_a_second_cancel_waits_for_the_save_and_a_third_kills(tmp_path):
    script = tmp_path / "slow-saver"  # a worker whose save on SIGTERM takes a while
    script.write_text("#!/bin/bash\nrun=${@: -1}\ntrap 'echo TERM >> \"$run/signals\"' TERM\n"
                      'touch "$run/launched"\nwhile [ -d "$run" ]; do sleep 0.05; done\n')
    script.chmod(0o755)
    jobs = JobManager(tmp_path / "runs", python=str(script), devices=[])
    run = queue(jobs, tmp_path, "r")
    jobs.tick()
    wait_for(lambda: (run.path / "launched").exists())
    proc = jobs._procs["r"]
    assert jobs.cancel("r").message == "cancelling: saving state"
    wait_for(lambda: (run.path / "signals").is_file())
    assert "cancel once more" in jobs.cancel("r").message
    time.sleep(0.5)
    assert proc.poll() is None and (run.path / "signals").read_text() == "TERM\n"  # the save goes on
    assert jobs.cancel("r").message == "killed"
    assert proc.wait(timeout=10) == -9
    jobs.tick()
    assert jobs.info("r").state == "interrupted"


def test_a_cancel_never_writes_over_how_the_worker_ended_the_run(tmp_path, monkeypatch):
    """The worker may record its end just after the app has seen the run running: that end is what stays."""
    from tests.test_rundir import hold_lock
    from trainer.rundir import RunDir

    run = fake_run(tmp_path, "r", "running")
    holder = hold_lock(run)  # a live worker holds it, so the run counts as running
    jobs = JobManager(tmp_path, devices=[])
    status, looks = RunDir.status, []

    def seen_running_then_ended(rd):  # cancel()'s own look says running; right after it, the worker records its end
        now = status(rd)
        if sys._getframe(1).f_code.co_name == "cancel" and not looks:
            looks.append(now)
            rd.status_file.write_text(json.dumps(now | {"state": "cancelled", "message": "stopped; resumable"}))
        return now

    try:
        for count in range(3):  # the first cancel (SIGTERM), the second (wait for the save), the third (SIGKILL)
            jobs.run_dir("r").write_status(state="running", message="", pid=None, pgid=None)
            jobs._cancels, looks[:] = {"r": count}, []
            monkeypatch.setattr(RunDir, "status", seen_running_then_ended)
            jobs.cancel("r")
            monkeypatch.setattr(RunDir, "status", status)
            now = jobs.run_dir("r").status()
            assert (now["state"], now["message"]) == ("cancelled", "stopped; resumable"), count
    finally:
        holder.kill()
        holder.wait()


def test_a_run_is_shown_ended_only_once_its_worker_has_exited(tmp_path):
    """The worker writes "cancelled" before the interpreter winds down (seconds, with torch loaded): until the
    process is gone the run still shows running, so "cancelled" in the UI means the GPU is free."""
    jobs = JobManager(tmp_path / "runs", python=fake_worker(tmp_path), devices=[])
    run = queue(jobs, tmp_path, "a")
    try:
        jobs.tick()
        wait_for(lambda: launched(run))
        run.write_status(state="cancelled", message="stopped; resumable", pid=None)
        shown = jobs.info("a")
        assert (shown.state, shown.message) == ("running", "stopping: the worker is exiting")
        for _ in range(2):  # clicks while it exits leave the worker's word on how the run ended
            assert jobs.cancel("a").message == "stopping: the worker is exiting"
        finish(jobs, run)
        assert (jobs.info("a").state, jobs.info("a").message) == ("cancelled", "stopped; resumable")
    finally:
        (run.path / "finish").touch()


def test_a_run_of_an_earlier_app_is_shown_ended_once_its_worker_lets_go_of_the_lock(tmp_path):
    jobs = JobManager(tmp_path / "runs", python=fake_worker(tmp_path), devices=[])
    run = queue(jobs, tmp_path, "a")
    run.write_status(state="cancelled", message="stopped; resumable", pid=None)
    lock = run.acquire()  # the worker (not this app's child) still holds the run while it exits
    try:
        assert (jobs.info("a").state, jobs.info("a").message) == ("running", "stopping: the worker is exiting")
    finally:
        lock.release()
    assert jobs.info("a").state == "cancelled"


def test_a_worker_of_an_earlier_app_that_let_go_of_the_lock_is_shown_stopping_until_it_exits(tmp_path):
    """A worker releases its lock, then its interpreter takes seconds to shut down (torch): the run is shown ended
    only once the process the lock file names is gone, so "cancelled" means the GPU is free."""
    import subprocess
    import sys
    from pathlib import Path

    jobs = JobManager(tmp_path / "runs", python=fake_worker(tmp_path), devices=[])
    run = queue(jobs, tmp_path, "a")
    run.write_status(state="cancelled", message="stopped; resumable", pid=None)
    script = ("import sys, time; from trainer.rundir import RunDir; RunDir(sys.argv[2]).acquire().release(); "
              "print('released', flush=True); time.sleep(60)")
    worker = subprocess.Popen([sys.executable, "-c", script, "trainer", str(run.path)], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parent.parent)  # argv like `-m trainer RUN`
    try:
        assert worker.stdout.readline().strip() == "released" and run.holder() is None
        info = jobs.info("a")
        assert (info.state, info.message, info.pid) == ("running", "stopping: the worker is exiting", worker.pid)
    finally:
        worker.kill()
        worker.wait()
    assert jobs.info("a").state == "cancelled"


@pytest.mark.parametrize("base, says", [
    ("{tmp}/nowhere/model.safetensors", "no such file or folder"),
    ("{tmp}/notes.txt", "notes.txt: unknown file type"),
    ("{tmp}", "not a diffusers model folder (it has no model_index.json)"),
    ("someone/some-model", "the model hub is offline (HF_HUB_OFFLINE)")])
def test_a_base_that_cannot_load_is_refused_before_a_run_is_made(tmp_path, monkeypatch, base, says):
    from trainer.config import ConfigError
    from ui.train_tab import explain_base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "pictures").mkdir()
    base = base.format(tmp=tmp_path)
    jobs = JobManager(tmp_path / "runs", devices=[])
    cfg = config.build("character", "sd15", {"pretrained_model_name_or_path": base})
    with pytest.raises(ConfigError, match="model.pretrained_model_name_or_path") as refused:
        jobs.create(cfg, tmp_path / "pictures")
    assert says in str(refused.value) and jobs.runs() == []
    assert explain_base(base) == f"⚠ {str(refused.value).split(': ', 1)[1]}"

"""Nothing lost: no non-finite weight is ever saved, a full disk says so in words, and both runs resume from
their last good state."""

import errno
import math
import sys

import pytest
import torch

from tests.test_jobs import queue
from tests.test_training import losses, make_run, train_run
from trainer import checkpoint
from trainer.guards import DiskFull
from trainer.loss import TrainingError
from ui.jobs import JobManager

EVERY_STEP = {"training": {"save_every_n_steps": 1, "max_train_epochs": 2}}  # 6 steps


def test_non_finite_weights_are_never_saved_and_the_run_resumes(tiny_models, tmp_path, monkeypatch):
    import trainer.train as loop

    run_dir, _ = make_run(tmp_path, tiny_models["sd1"][1], EVERY_STEP)
    step = loop.optimizer_step

    def poisoned(run):  # what eps=0 or an fp16 overflow does: the weights go NaN in an optimizer step
        step(run)
        if run.progress.step == 3:
            with torch.no_grad():
                run.params[0].fill_(math.nan)

    monkeypatch.setattr(loop, "optimizer_step", poisoned)
    with pytest.raises(TrainingError, match="weights are not finite at step 3") as e:
        train_run(run_dir)
    assert "The last good state, step-00000002, is kept" in str(e.value) and "learning rate" in str(e.value)
    assert checkpoint.latest(run_dir).name == "step-00000002" and not (run_dir / "state" / "step-00000003").exists()
    assert not list((run_dir / "output").glob("*.safetensors"))
    monkeypatch.setattr(loop, "optimizer_step", step)
    final = train_run(run_dir)  # resumes from step 2
    assert final.is_file() and sorted(losses(run_dir)) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for v in losses(run_dir).values())


def test_a_full_disk_says_what_failed_what_is_free_and_what_is_intact(tiny_models, tmp_path, monkeypatch):
    run_dir, _ = make_run(tmp_path, tiny_models["sd1"][1], EVERY_STEP)
    write = checkpoint.write

    def full(folder, name, state):  # the disk fills up halfway through the state of step 3
        if folder.name == "step-00000003" and name == "optimizer":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(folder, name, state)

    monkeypatch.setattr(checkpoint, "write", full)
    with pytest.raises(DiskFull) as e:
        train_run(run_dir)
    message = str(e.value)
    assert message.startswith("The disk is full: writing the resumable state step-00000003 failed with ")
    assert "MB free on" in message and "intact: state step-00000002" in message
    assert not (run_dir / "state" / "step-00000003").exists()  # the half-written state is gone
    monkeypatch.setattr(checkpoint, "write", write)
    assert train_run(run_dir).is_file() and sorted(losses(run_dir)) == [1, 2, 3, 4, 5, 6]


def test_the_app_shows_a_full_disk_at_once_and_says_it_once(tmp_path, monkeypatch, capsys):
    from trainer.rundir import RunDir

    script = tmp_path / "full-worker"  # a worker that stops for want of space, as trainer/__main__.py does
    script.write_text("#!/bin/sh\nexit 5\n")
    script.chmod(0o755)
    jobs = JobManager(tmp_path / "runs", python=str(script), devices=[])
    run = queue(jobs, tmp_path, "r")
    write = RunDir.write_status

    def no_room(self, **fields):
        if fields.get("state") != "running":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, **fields)

    monkeypatch.setattr(RunDir, "write_status", no_room)
    jobs.tick()
    jobs._procs["r"].wait(timeout=10)
    for _ in range(5):
        jobs.tick()
    info = jobs.info("r")
    assert info.state == "failed" and "the disk is full" in info.message and "resume" in info.message
    assert capsys.readouterr().err.count("cannot write r/status.json") == 1  # said once, not once a tick
    monkeypatch.setattr(RunDir, "write_status", write)
    jobs.tick()  # room again: the status is written
    assert run.status()["state"] == "failed" and "disk is full" in run.status()["message"]


@pytest.mark.slow
def test_a_real_full_disk_against_the_running_app(tiny_models, tmp_path):
    """The runs folder on a 24 MB tmpfs, filled up while a run trains: the app says so and serves on; with room
    again, Resume finishes the run."""
    import subprocess
    import time

    from gradio_client import Client, handle_file

    from tests.test_browser import App
    from tests.test_training import draw_dataset

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    app = App(disk / "runs", tmp_path).start()
    try:
        client = Client(app.url, verbose=False)
        settings = {"resolution": 64, "num_repeats": 1, "max_train_epochs": 12, "network_dim": 4,
                    "network_alpha": 2, "sample_every_n_epochs": 0, "save_every_n_epochs": 0,
                    "save_every_n_steps": 2}
        pictures = [handle_file(str(p)) for p in sorted(draw_dataset(tmp_path / "pictures", 6).iterdir())]
        run = client.predict(images=pictures, preset="character", base=str(tiny_models["sd1"][1]),
                             settings=settings, api_name="/create_run")

        def status():
            return client.predict(run_id=run["run_id"], api_name="/status")

        wait = time.time() + 120
        while status()["step"] < 3 and time.time() < wait:
            time.sleep(0.2)
        with open(disk / "filler", "wb") as f:  # fill the disk to the last byte
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        wait = time.time() + 120
        while status()["state"] == "running" and time.time() < wait:
            time.sleep(0.5)
        stopped = status()
        assert stopped["state"] == "failed" and "disk is full" in stopped["message"], stopped
        assert app.proc.poll() is None
        (disk / "filler").unlink()
        time.sleep(2)
        client.predict(run_id=run["run_id"], api_name="/resume")
        wait = time.time() + 240
        while status()["state"] in ("queued", "running") and time.time() < wait:
            time.sleep(0.5)
        assert status()["state"] == "done" and status()["step"] == status()["total_steps"]
    finally:
        app.stop()
        subprocess.run(["umount", "-l", str(disk)])

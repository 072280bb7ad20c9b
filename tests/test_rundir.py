"""The run directory's one owner: its id, its status, and the lock that keeps a second worker off a run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer import config
from trainer.rundir import RunDir, RunLocked, create, new_id

ROOT = Path(__file__).resolve().parent.parent
HOLD = "import sys, time; from trainer.rundir import RunDir; lock = RunDir(sys.argv[1]).acquire(); " \
       "print('held', flush=True); time.sleep(600)"


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process that holds the run's lock, as a worker does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_ids_are_unique_and_a_run_is_written_whole(tmp_path):
    first = new_id(tmp_path, "style")
    (tmp_path / first).mkdir()
    assert new_id(tmp_path, "style") == f"{first}-2"
    run = create(tmp_path, config.build("style", "sd15"), lambda d: (d.mkdir(), (d / "a.png").write_bytes(b"x")),
                 state="queued", name="r")
    assert run.status()["state"] == "queued" and (run.dataset / "a.png").is_file()
    assert config.load(run.config).data.train_data_dir == str(run.dataset.resolve())

    def broken(folder):
        folder.mkdir()
        raise SystemExit("no pictures")

    with pytest.raises(SystemExit):
        create(tmp_path, config.build("style", "sd15"), broken, state="queued", name="half")
    assert not (tmp_path / "half").exists()  # nothing half-made is left for the app to find


def test_a_broken_status_reads_as_unknown(tmp_path):
    run = RunDir(tmp_path)
    assert run.state_name() == "unknown"
    for text in ("{", "[1, 2]", '{"state": "flying"}'):
        run.status_file.write_text(text)
        assert run.state_name() == "unknown"
    run.write_status(state="done")
    assert run.state_name() == "done" and "created" in run.status()


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    run = RunDir(tmp_path)
    assert run.holder() is None
    proc = hold_lock(tmp_path)
    try:
        assert run.holder()["pid"] == proc.pid
        with pytest.raises(RunLocked, match=f"pid {proc.pid}"):
            run.acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert run.holder() is None  # the kernel let go of it with the process
    with run.acquire():
        assert run.holder()["pid"] == os.getpid()


def test_a_second_worker_on_a_run_refuses_and_touches_nothing(tmp_path):
    run = create(tmp_path, config.build("character", "sd15"), lambda d: d.mkdir(), state="running", name="busy")
    before = run.status_file.read_text()
    proc = hold_lock(run.path)
    try:
        r = subprocess.run([sys.executable, "-m", "trainer", str(run.path)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert r.returncode == 4, r.stderr
    assert f"being trained by pid {proc.pid}" in r.stderr
    assert run.status_file.read_text() == before and not run.events.exists() and not run.log.exists()


def test_the_worker_records_its_own_state_and_pid(tmp_path):
    cfg = config.build("character", "sd15", {"pretrained_model_name_or_path": str(tmp_path / "missing")})
    run = create(tmp_path, cfg, lambda d: d.mkdir(), state="created", name="w")
    r = subprocess.run([sys.executable, "-m", "trainer", str(run.path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1
    status = run.status()
    assert status["state"] == "failed" and "missing" in status["message"] and status["pid"] is None
    assert status["started"] <= time.time() and run.holder() is None
    events = [json.loads(line) for line in run.events.read_text().splitlines()]
    assert events[-1]["type"] == "error"


def test_a_worker_clears_what_a_killed_save_left(tmp_path):
    run = RunDir(tmp_path)
    (run.output).mkdir()
    (run.output / ".lora.safetensors.tmp").write_bytes(b"half")
    (run.output / "lora-000001.safetensors").write_bytes(b"whole")
    (tmp_path / ".status.json.123.tmp").write_text("{")
    (run.state / "step-00000004").mkdir(parents=True)  # never got its progress.json
    (run.state / "step-00000002").mkdir()
    (run.state / "step-00000002" / "progress.json").write_text("{}")
    removed = sorted(p.name for p in run.clean_leftovers())
    assert removed == [".lora.safetensors.tmp", ".status.json.123.tmp", "step-00000004"]
    assert [p.name for p in run.output.iterdir()] == ["lora-000001.safetensors"]
    assert [p.name for p in run.state.iterdir()] == ["step-00000002"]


def test_a_run_is_named_by_its_file_when_the_file_has_a_name_of_its_own():
    from trainer.rundir import run_label

    cfg = config.build("style", "sd15")
    assert run_label(cfg) == "style"  # the default file name, lora, says nothing
    named = config.from_dict(config.deep_merge(config.to_dict(cfg), {"output_name": "my cat v2.1"}))
    assert run_label(named) == "my-cat-v2-1"

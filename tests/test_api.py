"""The jobs through the Gradio API with gradio_client, against the app on 127.0.0.1."""

import json
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.test_browser import App, free_port
from tests.test_compare_ui import fake_python, lora
from tests.test_training import draw_dataset

pytestmark = pytest.mark.slow


def test_a_script_drives_one_run_end_to_end(tiny_models, tmp_path):
    from gradio_client import Client, handle_file

    pictures = sorted(draw_dataset(tmp_path / "pictures", 6).iterdir())  # .png and their .txt captions
    app = App(tmp_path / "runs", tmp_path).start()
    try:
        client = Client(app.url, verbose=False)
        settings = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "num_repeats": 1,
                    "max_train_epochs": 1, "network_dim": 4, "network_alpha": 2, "sample_every_n_epochs": 0}
        with pytest.raises(Exception, match="network.network_alpha = -1"):
            client.predict(images=[handle_file(str(p)) for p in pictures], preset="character",
                           base=str(tiny_models["sd1"][1]), settings=settings | {"network_alpha": -1},
                           api_name="/create_run")
        run = client.predict(images=[handle_file(str(p)) for p in pictures], preset="character",
                             base=str(tiny_models["sd1"][1]), settings=settings, trigger="zxq",
                             api_name="/create_run")
        assert run["state"] in ("queued", "running")
        assert run["added"] == 6 and run["skipped"] == []  # every caption found its picture (one folder per upload)
        deadline = time.time() + 240
        while time.time() < deadline:
            status = client.predict(run_id=run["run_id"], api_name="/status")
            if status["state"] not in ("queued", "running"):
                break
            time.sleep(1)
        assert status["state"] == "done", status
        assert status["step"] == status["total_steps"] == 3
        assert [r["run_id"] for r in client.predict(api_name="/list_runs")["runs"]] == [run["run_id"]]
        files = client.predict(run_id=run["run_id"], api_name="/files")
        paths = [f["path"] if isinstance(f, dict) else f for f in files]
        final = next(p for p in paths if p.endswith("/lora.safetensors"))
        with safe_open(final, "pt") as f:
            assert f.metadata()["modelspec.trigger_phrase"] == "zxq"
            assert f.metadata()["ss_num_train_images"] == "6"
            tags = json.loads(f.metadata()["ss_tag_frequency"])
            assert list(tags.values())[0]["red circle"] == 6  # the captions came with their pictures
        with pytest.raises(Exception, match="only a cancelled, interrupted or failed run can resume"):
            client.predict(run_id=run["run_id"], api_name="/resume")
        with pytest.raises(Exception, match="must be a plain name"):
            client.predict(run_id="../" + run["run_id"], api_name="/status")
        assert sorted(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == [
            "/cancel", "/compare_cancel", "/compare_start", "/compare_status", "/create_run", "/files", "/list_runs",
            "/resume", "/status", "/sweep_cancel", "/sweep_start", "/sweep_status"]
    finally:
        app.stop()


@pytest.fixture()
def served(tmp_path):
    """The app in this process, behind app.py's request checks, its compares drawn by the fake compare worker."""
    import app as entry
    from ui.app import build_app
    from ui.compares import CompareManager

    runs, port = tmp_path / "runs", free_port()
    compares = CompareManager(runs / ".compares", python=fake_python(tmp_path), poll_s=0.1)
    demo = build_app(runs, tmp_path / "models", compares=compares)
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        allowed_paths=[str(runs)],
                        app_kwargs={"middleware": [entry.guard(entry.parse_args(["--port", str(port)]))]})
    yield f"http://127.0.0.1:{port}", compares
    demo.close()


def wait_until_ended(client, compare_id):
    deadline = time.time() + 30
    while time.time() < deadline:
        status = client.predict(compare_id=compare_id, api_name="/compare_status")
        if status["state"] not in ("queued", "running"):
            return status
        time.sleep(0.2)
    raise AssertionError(status)


def test_a_script_compares_dropped_files(served, tmp_path):
    from gradio_client import Client, handle_file

    url, compares = served
    good = lora(tmp_path / "mine.safetensors", ss_epoch="2", ss_validation_loss="0.125")
    other = lora(tmp_path / "for-sdxl.safetensors")
    client = Client(url, verbose=False)
    settings = {"base": "demo", "prompts": ["a red circle", "a blue square"], "strengths": [0, 1], "seeds": [5],
                "width": 64, "height": 64, "steps": 4}
    started = client.predict(run_id=None, files=[handle_file(str(good)), handle_file(str(other))],
                             settings=settings, api_name="/compare_start")
    assert started["state"] in ("queued", "running") and started["total"] == 8
    wait_until_ended(client, started["compare_id"])
    status = client.predict(compare_id=started["compare_id"], pictures=True, api_name="/compare_status")
    assert status["state"] == "done" and status["progress"] == "Cell 4 / 4 · done"
    assert [(f["label"], f["held_out"], f["problem"]) for f in status["files"]] == [
        ("mine (epoch 2)", 0.125, ""), ("for-sdxl", None, "made for SDXL, the base is SD 1.5")]
    assert [(c["label"], c["strength"], c["prompt"]) for c in status["cells"]] == [
        ("mine (epoch 2)", 0.0, "a red circle"), ("mine (epoch 2)", 1.0, "a red circle"),
        ("mine (epoch 2)", 0.0, "a blue square"), ("mine (epoch 2)", 1.0, "a blue square")]
    for picture in [status["grid"]] + [c["picture"] for c in status["cells"]]:  # downloaded by gradio_client
        assert Path(picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert status["cells"][0]["picture"] != status["cells"][2]["picture"]  # another prompt, another picture
    names = client.predict(compare_id=started["compare_id"], api_name="/compare_status")["cells"]
    assert [c["picture"] for c in names][:2] == ["cells/None-0.0-0-5.png", "cells/0-1.0-0-5.png"]


def test_compare_routes_refuse_bad_settings_and_paths(served, tmp_path):
    from gradio_client import Client, handle_file

    url, compares = served
    client = Client(url, verbose=False)
    file = handle_file(str(lora(tmp_path / "mine.safetensors")))
    for settings, message in (({"base": "demo", "prompts": ["a"], "strengths": [0, 5]}, "strengths: each must be"),
                              ({"base": "demo", "prompts": ["a"], "data_dir": "/etc"}, "data_dir cannot be set"),
                              ({"prompts": ["a"]}, "base: choose the base model")):
        with pytest.raises(Exception, match=message):
            client.predict(run_id=None, files=[file], settings=settings, api_name="/compare_start")
    with pytest.raises(Exception, match="must be a plain name"):
        client.predict(run_id="../x", files=[file], settings={"base": "demo"}, api_name="/compare_start")
    for route in ("/compare_status", "/compare_cancel"):
        with pytest.raises(Exception, match="must be a plain name"):
            client.predict(compare_id="../runs", api_name=route)
        with pytest.raises(Exception, match="no compare 'nothing'"):
            client.predict(compare_id="nothing", api_name=route)
    assert compares.compares() == []


def test_a_script_cancels_a_compare(served, tmp_path):
    from gradio_client import Client, handle_file

    url, compares = served
    compares.compares_dir.mkdir(parents=True, exist_ok=True)
    (compares.compares_dir / "hold").write_text("1")  # the fake worker draws one cell, then waits
    client = Client(url, verbose=False)
    started = client.predict(run_id=None, files=[handle_file(str(lora(tmp_path / "mine.safetensors")))],
                             settings={"base": "demo", "prompts": ["a"], "width": 64, "height": 64},
                             api_name="/compare_start")
    deadline = time.time() + 30
    while client.predict(compare_id=started["compare_id"], api_name="/compare_status")["done"] < 1:
        assert time.time() < deadline
        time.sleep(0.2)
    client.predict(compare_id=started["compare_id"], api_name="/compare_cancel")
    status = wait_until_ended(client, started["compare_id"])
    assert status["state"] == "cancelled" and status["message"] == "stopped after 1 cell(s)"
    assert status["grid"] is None and len(status["cells"]) == 1


def test_a_script_compares_a_runs_files_with_its_sample_settings(served):
    from types import SimpleNamespace

    from gradio_client import Client

    from tests.test_compare_ui import trained_run

    url, compares = served
    runs = SimpleNamespace(runs_dir=compares.compares_dir.parent)
    trained_run(runs)
    client = Client(url, verbose=False)
    started = client.predict(run_id="r", files=None, settings={"strengths": [0, 1], "seeds": [2, 3]},
                             api_name="/compare_start")
    status = wait_until_ended(client, started["compare_id"])
    assert status["state"] == "done" and status["total"] == 3 * 2 * 2 * 2  # 3 files, the run's 2 sample prompts
    assert [(f["label"], f["held_out"]) for f in status["files"]] == [
        ("r / lora-000001 (epoch 1, step 4)", 0.1234), ("r / lora-000002 (epoch 2, step 8)", None),
        ("r / lora (epoch 3, step 12)", 0.25)]
    spec = compares.spec(started["compare_id"])
    assert spec["base"] == "demo" and spec["steps"] == 7 and spec["width"] == 64 and spec["seeds"] == [2, 3]
    assert spec["prompts"] == ["zxq, portrait, looking at viewer", "zxq, full body, standing outdoors"]

    # several runs on the same base: every saved file of each, the first run's settings
    trained_run(runs, "s", sample_steps=9, trigger_word="qqq")
    started = client.predict(run_id=["s", "r"], files=None, settings={"strengths": [1], "seeds": [2]},
                             api_name="/compare_start")
    status = wait_until_ended(client, started["compare_id"])
    assert status["state"] == "done" and status["total"] == 6 * 2
    assert [f["label"] for f in status["files"]] == [
        f"{run} / {name}" for run in ("s", "r")
        for name in ("lora-000001 (epoch 1, step 4)", "lora-000002 (epoch 2, step 8)", "lora (epoch 3, step 12)")]
    spec = compares.spec(started["compare_id"])
    assert spec["steps"] == 9 and spec["prompts"][0].startswith("qqq, ")
    assert spec["files"][3] == str((runs.runs_dir / "r" / "output" / "lora-000001.safetensors").resolve())
    for run_id, message in ((["r", "../s"], "must be a plain name"), (["r", "nothing"], "no run 'nothing'"),
                            (["r", "r"], "a run is named twice"), ([3], "expected a run id or a list of run ids")):
        with pytest.raises(Exception, match=message):
            client.predict(run_id=run_id, files=None, settings=None, api_name="/compare_start")
    assert len(compares.compares()) == 2


def test_a_script_sweeps_a_runs_settings(served, tiny_models, tmp_path):
    """sweep_start from a run's config and pictures, the real sweep engine on the tiny SD1 model: 2 trials ranked,
    the best config; errors name the field, ids are plain names."""
    import shutil

    from gradio_client import Client

    from trainer import config
    from trainer.rundir import create

    url, compares = served
    runs = compares.compares_dir.parent
    cfg = config.build("character", "sd15", {"pretrained_model_name_or_path": str(tiny_models["sd1"][1]),
                                             "resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128,
                                             "num_repeats": 1, "max_train_epochs": 1, "train_batch_size": 2,
                                             "network_dim": 4, "network_alpha": 2, "sample_every_n_epochs": 0,
                                             "save_every_n_epochs": 0, "text_encoder_lr": 0})
    pictures = draw_dataset(tmp_path / "pictures", 6)
    create(runs, cfg, lambda d: shutil.copytree(pictures, d), state="done", name="base")
    client = Client(url, verbose=False)
    held_out = {"settings": {"validation_split": 0.34}}
    for kwargs, message in (({"space": {"unet_lr": [1e-4, 1e-3]}, "settings": None}, "data.validation_split"),
                            ({"space": {"network_dimm": [4, 8]}}, "did you mean 'network_dim'"),
                            ({"space": {"resolution": [64, 128]}}, "data.resolution cannot vary"),
                            ({"space": {"unet_lr": "1e-4:1e-3"}, "search": "tpe"}, "needs a number of trials"),
                            ({"space": {"unet_lr": [1e-4]}, "run_id": "../base"}, "must be a plain name"),
                            ({"space": {"unet_lr": [1e-4]}, "run_id": None}, "run_id / images: give the run")):
        with pytest.raises(Exception, match=message):
            client.predict(**({"run_id": "base"} | held_out | kwargs), api_name="/sweep_start")
    from gradio_client import handle_file

    images = [handle_file(str(p)) for p in sorted(pictures.iterdir())]
    with pytest.raises(Exception, match="not both"):
        client.predict(images=images, run_id="base", space={"unet_lr": [1e-4]}, api_name="/sweep_start")
    tiny = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "num_repeats": 1, "max_train_epochs": 1,
            "train_batch_size": 2, "network_dim": 4, "sample_every_n_epochs": 0, "text_encoder_lr": 0}
    pictured = client.predict(images=images, base=str(tiny_models["sd1"][1]), trigger="zxq", space={
        "network_alpha": [1, 2]}, settings=tiny | held_out["settings"], api_name="/sweep_start")
    assert pictured["added"] == 6 and pictured["skipped"] == [] and pictured["trials_wanted"] == 2
    folder = runs / pictured["sweep_id"]
    assert sorted(p.name for p in (folder / "dataset").iterdir()) == sorted(p.name for p in pictures.iterdir())
    assert (folder / "dataset" / "img0.txt").read_text().startswith("zxq, ")  # the trigger, as create_run puts it
    pictured_cfg = config.load(folder / "base.toml")
    assert (pictured_cfg.data.resolution, pictured_cfg.data.validation_split) == (64, 0.34)
    assert client.predict(sweep_id=pictured["sweep_id"], api_name="/sweep_cancel")["state"] in (
        "cancelled", "running")  # queued: cancelled at once; running: SIGTERM, it stops at its next step
    started = client.predict(settings={"validation_split": 0.34, "validation_every_n_steps": 1},
                             space={"unet_lr": [1e-4, 1e-3]}, run_id="base", api_name="/sweep_start")
    assert started["state"] in ("queued", "running") and started["trials_wanted"] == 2
    deadline = time.time() + 150
    while (status := client.predict(sweep_id=started["sweep_id"], api_name="/sweep_status"))["state"] in (
            "queued", "running"):
        assert time.time() < deadline, status
        time.sleep(0.5)
    assert status["state"] == "done", status
    assert [t["rank"] for t in status["trials"]] == [1, 2] and all(t["state"] == "done" for t in status["trials"])
    assert sorted(t["params"]["unet_lr"] for t in status["trials"]) == [1e-4, 1e-3]
    assert status["best"] == status["trials"][0]["name"] and "[optimizer]" in status["best_config"]
    assert "rank  trial" in status["table"]
    assert (runs / started["sweep_id"] / status["best"] / "config.toml").read_text() == status["best_config"]
    assert client.predict(sweep_id=started["sweep_id"], api_name="/sweep_cancel")["state"] == "done"
    for route in ("/sweep_status", "/sweep_cancel"):
        with pytest.raises(Exception, match="must be a plain name"):
            client.predict(sweep_id="../runs", api_name=route)
        with pytest.raises(Exception, match="no sweep 'base'"):  # a run is not a sweep
            client.predict(sweep_id="base", api_name=route)

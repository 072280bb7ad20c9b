"""The jobs through the Gradio API with gradio_client, against the app on 127.0.0.1."""

import json
import time

import pytest
from safetensors import safe_open

from tests.test_browser import App
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
            "/cancel", "/create_run", "/files", "/list_runs", "/resume", "/status"]
    finally:
        app.stop()

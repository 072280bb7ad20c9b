"""FLUX.1 from ComfyUI's split layout in Debian's chromium, against the app on 127.0.0.1 (issue #17): the user picks
the transformer file as the base; the Train tab shows its parts, pre-filled from clip_l / t5xxl_fp16 / ae.safetensors
beside it; a part left out is named beside the Train button and no run is made; with it back (and the T5 tokenizer
typed in), Train runs the real worker on the tiny FLUX.1 model, and the Monitor shows a finite loss, the run done and
its LoRA file to download; LoKr chosen in the same form then trains a LyCORIS file; an SD 3.5 diffusers folder picked
next (FLUX.1's parts cleared from the form) trains its diffusers-form LoRA file."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.test_browser import (CHROMIUM, App, browser, field_value, fill, fill_until_still, page,  # noqa: F401
                                queued)  # (fixtures)
from tests.test_training import draw_dataset
from tests.tiny_models import flow_layouts
from trainer import config

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")]
TINY = {"resolution": "64", "max-train-steps": "2", "num-repeats": "1", "train-batch-size": "2", "network-dim": "4",
        "network-alpha": "2", "min-bucket-reso": "64", "max-bucket-reso": "128", "sample-every-n-epochs": "0",
        "save-every-n-epochs": "0"}


@pytest.fixture()
def flux(tmp_path) -> dict[str, Path]:
    """models/flux1-dev.safetensors with its parts beside it under ComfyUI's names, and the tiny T5 tokenizer."""
    files = flow_layouts("flux", tmp_path / "built")
    models = tmp_path / "models"
    models.mkdir()
    for part, name in (("transformer", "flux1-dev"), ("clip_l", "clip_l"), ("t5", "t5xxl_fp16"), ("vae", "ae")):
        shutil.copy(files[part], models / f"{name}.safetensors")
    shutil.copytree(flow_layouts("sd3", tmp_path / "built")["folder"], models / "sd3.5-medium")  # a diffusers folder
    return {"models": models, "tokenizer": files["t5_tokenizer"]}


@pytest.fixture()
def app(flux, tmp_path):
    running = App(tmp_path / "runs", flux["models"]).start()
    yield running
    running.stop()


@pytest.mark.timeout(1200)  # three runs one after another: on a loaded CI machine each takes minutes
def test_flux_split_layout_trains_from_the_browser(app, page, flux, tmp_path):  # noqa: F811
    from safetensors import safe_open

    models = flux["models"]
    page.goto(app.url)
    images = sorted(draw_dataset(tmp_path / "pictures", 4).glob("*.png"))
    page.locator("#dataset-upload input[type=file]").set_input_files([str(p) for p in images])
    page.get_by_text("Added 4 picture(s)").wait_for(timeout=30000)
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-base input").click()
    assert page.get_by_role("option", name="clip_l.safetensors").count() == 0  # a part is not a base
    page.get_by_role("option", name="flux1-dev.safetensors").click()
    note = page.locator("#train-parts-info")
    note.get_by_text("Found beside it: clip_l, t5xxl, vae.").wait_for(timeout=30000)
    assert "a FLUX.1 transformer without the CLIP-L text encoder" in note.inner_text()
    assert not page.locator("#train-clip-g").is_visible()  # FLUX.1 has no CLIP-G
    page.wait_for_function("() => document.querySelector('#train-resolution input').value === '1024'")  # flux
    for elem, name in (("clip-l", "clip_l"), ("t5xxl", "t5xxl_fp16"), ("vae", "ae")):
        assert field_value(page, elem) == str(models / f"{name}.safetensors")
    page.locator("#train-advanced").get_by_text("Advanced").click()
    for elem, value in TINY.items():
        fill(page, elem, value)
    fill(page, "t5-tokenizer", str(flux["tokenizer"]))
    fill(page, "vae", "")
    page.locator("#train-start").click()
    status = page.locator("#train-status")
    status.get_by_text("model.vae: not set").wait_for(timeout=30000)
    assert "without the VAE (ae.safetensors" in status.inner_text()
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("2*"))  # no run was made
    fill(page, "vae", str(models / "ae.safetensors"))
    assert all(field_value(page, e) == v for e, v in TINY.items())
    page.locator("#train-start").click()
    queued(page)
    page.get_by_text("— done").wait_for(timeout=400000)  # a loaded CI machine
    progress = page.locator("#monitor-progress").inner_text()
    loss = float(re.search(r"Step 2 / 2 · epoch \d+ · loss (\S+)", progress).group(1))
    assert math.isfinite(loss), progress
    page.locator("#monitor-loss svg").get_by_text("smoothed").wait_for(timeout=30000)
    with page.expect_download() as download:
        page.locator('#monitor-files a[download="lora.safetensors"]').click()
    path = tmp_path / "downloaded.safetensors"
    download.value.save_as(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        ranks = {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(".lora_down.weight")}
    # the dim typed into the form: 4, and 3 × 4 / 4 × 4 where kohya's file fuses q|k|v (|mlp) into one Linear
    assert meta["ss_base_model_version"] == "flux1" and min(ranks) == 4 and ranks <= {4, 12, 16}, ranks

    # a LyCORIS method from the same form: LoKr, its file in LyCORIS' keys for ComfyUI
    first = next((tmp_path / "runs").glob("2*"))
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-network-type input").click()
    page.get_by_role("option", name="lokr", exact=True).click()
    page.wait_for_function("() => document.querySelector('#train-network-type input').value === 'lokr'")
    page.locator("#train-start").click()
    queued(page)
    second = wait_for_run_done(tmp_path / "runs", {first})
    page.locator("#monitor-title").get_by_text(f"{second.name} — done").wait_for(timeout=60000)  # the new run
    with safe_open(str(second / "output" / "lora.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["modelspec.architecture"] == "flux-1-dev/lycoris" and meta["ss_network_module"] == "lycoris.kohya"
    assert any(k.endswith(".lokr_w1") for k in keys) and not any("lora_down" in k for k in keys), keys[:8]

    # SD 3.5 from a diffusers folder in the models folder: the preset's sd3 variant, a diffusers-form LoRA file
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-base input").click()
    page.get_by_role("option", name="sd3.5-medium").click()
    page.locator("#train-base-info").get_by_text("SD 3.5").wait_for(timeout=30000)
    page.locator("#train-parts").first.wait_for(state="hidden", timeout=30000)  # a folder holds its parts: none asked
    fill_until_still(page, TINY)
    page.locator("#train-network-type input").click()
    page.get_by_role("option", name="lora", exact=True).click()
    page.wait_for_function("() => document.querySelector('#train-network-type input').value === 'lora'")
    page.locator("#train-start").click()
    queued(page)
    third = wait_for_run_done(tmp_path / "runs", {first, second})
    page.locator("#monitor-title").get_by_text(f"{third.name} — done").wait_for(timeout=60000)
    model = config.load(third / "config.toml").model  # FLUX.1's parts were not carried over to the folder
    assert (model.clip_l, model.clip_g, model.t5xxl, model.vae, model.t5_tokenizer) == ("",) * 5, model
    with safe_open(str(third / "output" / "lora.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora", meta["modelspec.architecture"]
    assert meta["ss_base_model_version"] == "5-medium" and keys and all(
        k.startswith("transformer.transformer_blocks.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
        for k in keys), keys[:4]


def wait_for_run_done(runs: Path, before: set[Path], timeout: float = 400) -> Path:
    """The run not in `before`, once its worker has recorded it done (a loaded CI machine: minutes)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for run in runs.glob("2*"):
            status = run / "status.json"
            if run not in before and status.is_file() and json.loads(status.read_text()).get("state") == "done":
                return run
        time.sleep(1)
    raise AssertionError(f"no new run finished in {timeout:.0f} s: {sorted(p.name for p in runs.glob('2*'))}")

"""FLUX.1 from ComfyUI's split layout in Debian's chromium, against the app on 127.0.0.1 (issue #17): the user picks
the transformer file as the base; the Train tab shows its parts, pre-filled from clip_l / t5xxl_fp16 / ae.safetensors
beside it; a part left out is named beside the Train button and no run is made; with it back (and the T5 tokenizer
typed in), Train runs the real worker on the tiny FLUX.1 model, and the Monitor shows a finite loss, the run done and
its LoRA file to download; LoKr chosen in the same form then trains a LyCORIS file; an SD 3.5 diffusers folder picked
next (FLUX.1's parts cleared from the form) trains its diffusers-form LoRA file. Every method offered on the two
families is trained from the browser too, as a sweep over network_type started from the Train tab."""

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
    sd3 = flow_layouts("sd3", tmp_path / "built")["folder"]
    shutil.copytree(sd3, models / "sd3.5-medium")  # a diffusers folder
    return {"models": models, "tokenizer": files["t5_tokenizer"], "folders": {"flux": files["folder"], "sd3": sd3}}


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
    status.get_by_text("VAE file: not set").wait_for(timeout=30000)  # the form's label
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


FLOW_METHODS = ("lora", "rslora", "lora_fa", "dora", "loha", "lokr", "vera", "adalora")  # locon: no 3x3 convs


def file_problems(arch: str, base: Path, path: Path) -> list[str]:
    """What keeps a file's keys from mapping to the base's modules with their shapes ([] = every key maps)."""
    from safetensors.torch import load_file

    from trainer import flow_names
    from trainer.loading import load_base

    sd, modules = load_file(str(path)), flow_names.plan(arch, load_base(str(base)).denoiser)
    if any(k.startswith("lycoris_") for k in sd):
        return flow_names.check_lycoris_file(arch, modules, sd)
    return flow_names.check_file(arch, modules, sd, "kohya" if arch == "flux" else "diffusers")


def sweep_every_method(page, runs: Path) -> Path:
    """The Sweep section of the Train tab as it is filled: network_type over every method, grid; the sweep folder
    once the Sweeps tab shows this sweep with every trial ended."""
    field = page.locator("#sweep-field-0 input")
    if not field.is_visible():  # the section opens on a click and stays open
        page.locator("#sweep-section").get_by_text("Sweep:").click()
    field.click()
    field.fill("network_type")
    page.get_by_role("option", name="network_type", exact=True).click()
    values = page.locator("#sweep-values-0 input, #sweep-values-0 textarea").first
    values.fill(", ".join(FLOW_METHODS))
    values.press("Tab")
    status = page.locator("#sweep-status")
    before = {p.parent for p in runs.glob("*/sweep.json")}
    page.locator("#sweep-start").click()
    deadline = time.time() + 30  # the page's status line may still show the last sweep: the new folder tells
    while not (made := {p.parent for p in runs.glob("*/sweep.json")} - before):
        assert time.time() < deadline, f"no sweep; the section says {status.inner_text()!r}"
        page.wait_for_timeout(300)
    (folder,) = made
    sweep_id = folder.name
    status.get_by_text(f"Sweep {sweep_id} ").wait_for(state="attached", timeout=30000)
    assert f"{len(FLOW_METHODS)} trial(s), grid search" in status.inner_text()
    ended = f"{sweep_id}: done · {len(FLOW_METHODS)} / {len(FLOW_METHODS)} trial(s) ended"
    deadline = time.time() + 400  # a loaded CI machine
    while ended not in (shown := page.locator("#sweep-state").inner_text()):
        assert time.time() < deadline, shown
        page.wait_for_timeout(500)
    return runs / sweep_id


@pytest.mark.timeout(1200)
def test_every_method_trains_on_flux_and_sd3_from_the_browser(app, page, flux, tmp_path):  # noqa: F811
    """FLUX.1 from the split layout, then SD 3.5 from its diffusers folder: one sweep each over every method offered
    on them; every trial ends done with finite losses, its file's keys all map to the base's modules with their
    shapes, in the family's form (kohya FLUX.1, diffusers SD 3.5, LyCORIS keys for LoHa / LoKr / DoRA)."""
    from safetensors import safe_open

    from trainer import sweep
    from trainer.events import read_all

    runs = tmp_path / "runs"
    page.goto(app.url)
    images = sorted(draw_dataset(tmp_path / "pictures", 4).glob("*.png"))
    page.locator("#dataset-upload input[type=file]").set_input_files([str(p) for p in images])
    page.get_by_text("Added 4 picture(s)").wait_for(timeout=30000)
    folders: dict[str, Path] = {}
    for arch, option in (("flux", "flux1-dev.safetensors"), ("sd3", "sd3.5-medium")):
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-base input").click()
        page.get_by_role("option", name=option).click()
        page.locator("#train-base-info").get_by_text("FLUX.1" if arch == "flux" else "SD 3.5").wait_for(
            timeout=30000)
        if arch == "sd3":  # (FLUX.1's note names SD 3.5 too): a folder holds its parts, so their fields go
            page.locator("#train-parts").first.wait_for(state="hidden", timeout=30000)
        if arch == "flux":
            page.locator("#train-parts-info").get_by_text("Found beside it: clip_l, t5xxl, vae.").wait_for(
                timeout=30000)
            page.locator("#train-advanced").get_by_text("Advanced").click()
        # 1 of the 4 pictures held out: the trials are ranked on it
        wanted = TINY | {"validation-split": "0.25"} | ({"t5-tokenizer": str(flux["tokenizer"])}
                                                        if arch == "flux" else {})
        fill_until_still(page, wanted)
        folders[arch] = sweep_every_method(page, runs)
        table = page.locator("#sweep-table").inner_text()
        assert all(m in table for m in FLOW_METHODS), table

    for arch, folder in folders.items():
        trials = {t["params"]["network_type"]: t for t in sweep.read(folder)["trials"]}
        assert sorted(trials) == sorted(FLOW_METHODS)
        for method, trial in trials.items():
            assert trial["state"] == "done", (arch, method, trial)
            run = folder / trial["name"]
            losses = [e["loss"] for e in read_all(run) if e["type"] == "step"]
            assert len(losses) == 2 and all(math.isfinite(v) for v in losses), (arch, method, losses)
            path = run / "output" / "lora.safetensors"
            assert file_problems(arch, flux["folders"][arch], path) == [], (arch, method)
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            lycoris = method in ("loha", "lokr", "dora")
            assert meta["modelspec.architecture"].endswith("/lycoris" if lycoris else "/lora"), (arch, method, meta)
            assert meta["ss_base_model_version"] == {"flux": "flux1", "sd3": "5-medium"}[arch]

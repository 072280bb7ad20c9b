"""SD 3.5 / FLUX.1 from the split layout ComfyUI users keep (issue #17): the transformer file as the base and its
CLIP-L / CLIP-G / T5-XXL / VAE files and T5 tokenizer as [model] fields (kohya's clip_l, clip_g, t5xxl, vae/ae),
checked by field before a run is made, saved in the run's config.toml, trained from `python -m trainer new`, and
shown on the Train tab (pre-filled from the usual ComfyUI names beside the transformer)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.test_training import ROOT, draw_dataset, losses
from tests.tiny_models import flow_layouts
from trainer import config, kohya_import
from trainer.flow_parts import Parts, found_beside, parts_of

FIELDS = {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5xxl", "vae": "vae", "t5_tokenizer": "t5_tokenizer"}
NEEDS = {"sd3": ("clip_l", "clip_g", "t5", "vae"), "flux": ("clip_l", "t5", "vae")}


@pytest.fixture(scope="module")
def flow(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("split-layout-models")
    return {arch: flow_layouts(arch, root) for arch in ("flux", "sd3")}


def part_layer(files: dict[str, Path], arch: str, **change) -> dict:
    """The [model] layer of a split layout: every part the family needs and the tokenizer, `change` on top."""
    given = {FIELDS[p]: str(files[p]) for p in (*NEEDS[arch], "t5_tokenizer")} | change
    return {"pretrained_model_name_or_path": str(files["transformer"])} | {k: v for k, v in given.items() if v}


def refused(layer: dict, family: str = "flux") -> config.ConfigError:
    with pytest.raises(config.ConfigError) as e:
        config.build("character", family, layer)
    return e.value


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_the_parts_are_config_fields_saved_with_the_run(flow, tmp_path, arch):
    files = flow[arch]
    cfg = config.build("character", arch, part_layer(files, arch))
    assert (cfg.model.clip_l, cfg.model.t5xxl, cfg.model.vae) == tuple(str(files[p]) for p in ("clip_l", "t5", "vae"))
    assert cfg.model.clip_g == (str(files["clip_g"]) if arch == "sd3" else "")
    config.save(cfg, tmp_path / "config.toml")
    again = config.load(tmp_path / "config.toml")
    assert again == cfg
    want = {p: str(files[p]) for p in NEEDS[arch]} | {"t5_tokenizer": str(files["t5_tokenizer"])}
    assert parts_of(again.model) == Parts(**want)
    for name in config.PART_FIELDS:
        assert config.field_help(name)["section"] == "model" and config.field_help(name)["help"]


def test_a_missing_part_is_named_by_its_field(flow):
    files = flow["flux"]
    e = refused({"pretrained_model_name_or_path": str(files["transformer"])})
    assert e.field == "model.clip_l"
    assert str(e).startswith("model.clip_l, model.t5xxl, model.vae: not set, and flux-transformer.safetensors is a "
                             "FLUX.1 transformer without the CLIP-L text encoder"), str(e)
    e = refused(part_layer(files, "flux", t5xxl=""))
    assert e.field == "model.t5xxl" and "without the T5-XXL text encoder (t5xxl_fp16.safetensors)" in str(e)
    e = refused(part_layer(flow["sd3"], "sd3", clip_g=""), "sd3")
    assert e.field == "model.clip_g" and "without the CLIP-G text encoder" in str(e)
    # the all-in-one file holds every part: none is asked for, and one given as a file wins (the loader's rule)
    single = str(files["single"])
    assert config.build("character", "flux", {"pretrained_model_name_or_path": single}).model.vae == ""
    assert config.build("character", "flux", {"pretrained_model_name_or_path": single,
                                              "vae": str(files["vae"])}).model.vae == str(files["vae"])


def test_wrong_parts_are_refused_by_field(flow, tiny_models, tmp_path):
    files, sd3 = flow["flux"], flow["sd3"]
    cases = [  # (change, field, message)
        ({"t5xxl": str(files["clip_l"])}, "model.t5xxl", "flux-clip_l.safetensors is a CLIP text encoder, not the "
                                                         "T5-XXL text encoder"),
        ({"vae": str(tmp_path / "ae.safetensors")}, "model.vae", "no such file (expected the VAE"),
        ({"vae": str(tiny_models["sdxl"][1])}, "model.vae", "is an SDXL checkpoint, not the VAE"),
        ({"clip_l": str(files["t5_tokenizer"])}, "model.clip_l", "give the clip_l part as a .safetensors file"),
        ({"clip_g": str(sd3["clip_g"])}, "model.clip_g", "FLUX.1 has no CLIP-G text encoder"),
        ({"t5_tokenizer": str(tmp_path)}, "model.t5_tokenizer", "a folder without tokenizer.json"),
        ({"t5_tokenizer": str(tmp_path / "none")}, "model.t5_tokenizer", "no such file or folder"),
    ]
    for change, field, says in cases:
        e = refused(part_layer(files, "flux", **change))
        assert e.field == field and says in str(e), (change, str(e))
    sd_vae = tmp_path / "sd-vae.safetensors"  # a 4-channel SD VAE where FLUX.1 takes its 16-channel one
    save_file({k.removeprefix("first_stage_model."): v for k, v in load_file(tiny_models["sd1"][1]).items()
               if k.startswith("first_stage_model.")}, sd_vae)
    e = refused(part_layer(files, "flux", vae=str(sd_vae)))
    assert e.field == "model.vae" and str(e).startswith("model.vae: sd-vae.safetensors has width 4 where this "
                                                        "FLUX.1 transformer takes 16"), str(e)
    e = refused(part_layer(sd3, "sd3", clip_l=str(sd3["clip_g"]), clip_g=str(sd3["clip_l"])), "sd3")
    assert e.field == "model.clip_l" and "the two look swapped" in str(e)


def test_sd_bases_and_folders_refuse_the_parts(flow, tiny_models):
    files = flow["flux"]
    for base, family in ((tiny_models["sdxl"][1], "sdxl"), (tiny_models["sd1"][0], "sd15"), ("demo", "sd15")):
        e = refused({"pretrained_model_name_or_path": str(base), "vae": str(files["vae"])}, family)
        assert e.field == "model.vae" and "an SD 1.x / 2.x / SDXL base, which holds its own: clear them" in str(e)
    e = refused({"pretrained_model_name_or_path": str(files["folder"]), "clip_l": str(files["clip_l"])})
    assert e.field == "model.clip_l" and "go with a transformer .safetensors file" in str(e)


def test_kohya_names_carry_over(flow, tiny_models):
    files = flow["flux"]
    kohya = {"pretrained_model_name_or_path": str(files["transformer"]), "clip_l": str(files["clip_l"]),
             "t5xxl": str(files["t5"]), "ae": str(files["vae"])}  # flux_train_network.py's names
    out, warnings = kohya_import.import_kohya(kohya)
    assert (out["clip_l"], out["t5xxl"], out["vae"]) == (str(files["clip_l"]), str(files["t5"]), str(files["vae"]))
    assert warnings == [] and "ae" not in out
    sdxl, warnings = kohya_import.import_kohya({"pretrained_model_name_or_path": str(tiny_models["sdxl"][1]),
                                          "vae": "sdxl_vae.safetensors"})  # kohya's VAE swap for SDXL
    assert "vae" not in sdxl and warnings == ["vae: a separate vae file is read for SD 3.5 / FLUX.1 transformer "
                                              "files only; ignored"]


def test_parts_beside_the_transformer_are_found_by_their_usual_names(flow, tmp_path):
    files = flow["flux"]
    unet, clip = tmp_path / "models" / "unet", tmp_path / "models" / "clip"  # ComfyUI's folders
    for folder in (unet, clip, tmp_path / "models" / "vae"):
        folder.mkdir(parents=True)
    shutil.copy(files["transformer"], unet / "flux1-dev.safetensors")
    assert found_beside(unet / "flux1-dev.safetensors", "flux") == {}
    shutil.copy(files["clip_l"], unet / "clip_l.safetensors")
    shutil.copy(files["t5"], clip / "t5xxl_fp8_e4m3fn.safetensors")
    shutil.copy(files["clip_l"], unet / "ae.safetensors")  # the usual name, the wrong kind: not offered
    assert found_beside(unet / "flux1-dev.safetensors", "flux") == {
        "clip_l": unet / "clip_l.safetensors", "t5": clip / "t5xxl_fp8_e4m3fn.safetensors"}
    shutil.copy(files["vae"], tmp_path / "models" / "vae" / "ae.safetensors")
    assert found_beside(unet / "flux1-dev.safetensors", "flux")["vae"] == tmp_path / "models" / "vae" / "ae.safetensors"
    assert found_beside(files["single"], "flux") == {}  # it holds them all


def cli_new(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "new", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_trains_a_flux_split_layout(flow, tmp_path):
    """`python -m trainer new --base flux1-dev.safetensors --clip-l … --t5xxl … --ae … --t5-tokenizer …`, the
    paths relative to the working folder: the run's config.toml holds them absolute, and the worker, which reads
    only that file, trains to finite losses and a FLUX.1 LoRA file."""
    files = flow["flux"]
    work = tmp_path / "work"
    shutil.copytree(files["t5_tokenizer"], work / "t5-tokenizer")
    for part, name in (("transformer", "flux1-dev"), ("clip_l", "clip_l"), ("t5", "t5xxl_fp16"), ("vae", "ae")):
        shutil.copy(files[part], work / f"{name}.safetensors")
    images = draw_dataset(tmp_path / "pictures", n=4)
    sets = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "num_repeats": 1,
            "train_batch_size": 2, "max_train_steps": 2, "network_dim": 4, "network_alpha": 2,
            "sample_every_n_epochs": 0}
    r = cli_new(["--base", "flux1-dev.safetensors", "--clip-l", "clip_l.safetensors", "--t5xxl",
                 "t5xxl_fp16.safetensors", "--ae", "ae.safetensors", "--t5-tokenizer", "t5-tokenizer",
                 "--images", str(images), "--preset", "character", "--runs-dir", str(tmp_path / "runs"),
                 "--name", "split", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]], work)
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = tmp_path / "runs" / "split"
    m = config.load(run_dir / "config.toml").model
    assert m.pretrained_model_name_or_path == str(work / "flux1-dev.safetensors")
    assert (m.clip_l, m.t5xxl, m.vae, m.t5_tokenizer, m.clip_g) == (
        str(work / "clip_l.safetensors"), str(work / "t5xxl_fp16.safetensors"), str(work / "ae.safetensors"),
        str(work / "t5-tokenizer"), "")
    steps = losses(run_dir)
    assert sorted(steps) == [1, 2] and all(math.isfinite(v) for v in steps.values()), steps
    with safe_open(str(run_dir / "output" / "lora.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_base_model_version"] == "flux1" and any(k.startswith("lora_unet_double_blocks_0_") for k in keys)


def test_cli_names_a_missing_part_before_making_a_run(flow, tmp_path):
    files = flow["flux"]
    r = cli_new(["--base", str(files["transformer"]), "--clip-l", str(files["clip_l"]), "--vae", str(files["vae"]),
                 "--images", str(draw_dataset(tmp_path / "pictures", n=2)), "--preset", "character",
                 "--runs-dir", str(tmp_path / "runs")], tmp_path)
    assert r.returncode == 2 and "python -m trainer new: model.t5xxl: not set" in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def comfy_folder(files: dict[str, Path], root: Path) -> Path:
    """models/unet/flux1-dev.safetensors with clip_l, t5xxl_fp16 and ae beside it, as ComfyUI users keep them."""
    unet = root / "models" / "unet"
    unet.mkdir(parents=True)
    for part, name in (("transformer", "flux1-dev"), ("clip_l", "clip_l"), ("t5", "t5xxl_fp16"), ("vae", "ae")):
        shutil.copy(files[part], unet / f"{name}.safetensors")
    return unet / "flux1-dev.safetensors"


def test_train_tab_shows_the_parts_for_a_flow_file_prefilled_from_beside_it(flow, tiny_models, tmp_path):
    from ui import train_tab

    base = comfy_folder(flow["flux"], tmp_path)
    assert [label for label, _ in train_tab.base_model_choices(base.parent)][1:] == ["flux1-dev.safetensors"]
    group, note, clip_g = train_tab.on_base_parts(str(base))
    assert group["visible"] is True and clip_g["visible"] is False  # FLUX.1 has no CLIP-G
    assert note.startswith("**flux1-dev.safetensors** is a FLUX.1 transformer without the CLIP-L text encoder") and \
        "Found beside it: clip_l, t5xxl, vae." in note, note
    form = dict(zip(train_tab.FIELDS, (u["value"] for u in train_tab.on_preset("character", str(base)))))
    assert {n: form[n] for n in train_tab.PART_FIELDS} == {
        "clip_l": str(base.parent / "clip_l.safetensors"), "clip_g": "",
        "t5xxl": str(base.parent / "t5xxl_fp16.safetensors"), "vae": str(base.parent / "ae.safetensors"),
        "t5_tokenizer": ""}
    assert form["sample_sampler"] == "euler" and form["resolution"] == 1024  # the preset's flux variant
    typed = ["/my/clip_l.safetensors", "", "/my/t5.safetensors", "/my/ae.safetensors", "/my/tok"]
    kept = dict(zip(train_tab.FIELDS, (u["value"] for u in train_tab.on_preset("style", str(base), *typed))))
    assert [kept[n] for n in train_tab.PART_FIELDS] == typed  # a new preset keeps what was typed
    group, note, clip_g = train_tab.on_base_parts(str(flow["sd3"]["single"]))
    assert group["visible"] and clip_g["visible"] and "holds every part of SD 3.5" in note
    for other in (str(tiny_models["sdxl"][1]), "demo", str(flow["flux"]["folder"])):
        assert train_tab.on_base_parts(other)[0]["visible"] is False
        assert train_tab.guess_parts(other) == dict.fromkeys(train_tab.PART_FIELDS, "")


def test_train_tab_names_a_missing_part_beside_the_train_button(flow, tmp_path, monkeypatch):
    from tests.test_jobs import fake_worker
    from trainer import flow_parts
    from ui import train_tab
    from ui.jobs import JobManager

    monkeypatch.setattr(flow_parts, "T5_TOKENIZER_DIR", tmp_path / "no-tokenizer")  # nor one in the HF cache:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    jobs = JobManager(tmp_path / "runs", python=fake_worker(tmp_path), devices=[])
    jobs.tick = lambda: None
    files, n = flow["flux"], len(train_tab.FIELDS)
    base = str(files["transformer"])  # nothing beside it under the usual names
    form = dict(zip(train_tab.FIELDS, (u["value"] for u in train_tab.on_preset("character", base))))
    folder = str(draw_dataset(tmp_path / "pictures", n=2))
    out = train_tab.on_train(jobs, base, "character", folder, "", *(form | {"clip_l": str(files["clip_l"]),
                                                                           "vae": str(files["vae"])}).values())
    t5 = train_tab.FIELDS.index("t5xxl")
    assert out[n].startswith("⚠ T5-XXL text encoder file: not set, and flux-transformer.safetensors is a FLUX.1 "
                             "transformer without the T5-XXL text encoder"), out[n]  # the form's label
    assert out[t5]["elem_classes"] == ["field-error"] and out[train_tab.FIELDS.index("vae")]["elem_classes"] == []
    assert jobs.runs() == []  # no run was made
    parts = {"clip_l": str(files["clip_l"]), "t5xxl": str(files["t5"]), "vae": str(files["vae"])}
    out = train_tab.on_train(jobs, base, "character", folder, "", *(form | parts).values())
    assert out[n].startswith("⚠ T5-XXL tokenizer: not set, and the T5-XXL tokenizer is not in "), out[n]
    assert out[train_tab.FIELDS.index("t5_tokenizer")]["elem_classes"] == ["field-error"] and jobs.runs() == []
    cached = tmp_path / "hub" / "models--google--t5-v1_1-xxl" / "snapshots" / "abc"
    shutil.copytree(files["t5_tokenizer"], cached)  # the tokenizer in the Hugging Face cache: it will be found
    assert flow_parts.t5_tokenizer_found() and not train_tab.on_train(jobs, base, "character", folder, "", *(
        form | parts).values())[n].startswith("⚠")
    shutil.rmtree(tmp_path / "hub")
    parts["t5_tokenizer"] = str(files["t5_tokenizer"])
    good = train_tab.on_train(jobs, base, "character", folder, "", *(form | parts).values())
    assert good[n].startswith("Queued **"), good[n]
    m = config.load(jobs.run_dir(good[n + 2]).config).model
    assert (m.clip_l, m.t5xxl, m.vae, m.t5_tokenizer) == tuple(parts.values())


def test_the_t5_tokenizer_of_a_comfyui_or_forge_install_is_found(flow, tmp_path, monkeypatch):
    """ComfyUI ships T5-XXL's tokenizer.json (comfy/text_encoders/t5_tokenizer/), Forge too (backend/huggingface/…):
    a transformer file kept in such an install loads, and is offered on the Train tab, with no tokenizer given."""
    import trainer.transformer_files as tf
    from trainer import flow_parts
    from trainer.loading import load_base
    from trainer.single_file import CheckpointError
    from ui import train_tab

    monkeypatch.setattr(flow_parts, "T5_TOKENIZER_DIR", tmp_path / "no-tokenizer")
    monkeypatch.setattr(tf, "T5_TOKENIZER_DIR", tmp_path / "no-tokenizer")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # nor one in the Hugging Face cache
    files = flow["flux"]
    comfy = tmp_path / "ComfyUI"
    base = comfy_folder(files, comfy)  # ComfyUI/models/unet/flux1-dev.safetensors, its parts beside it
    parts = Parts(clip_l=base.parent / "clip_l.safetensors", t5=base.parent / "t5xxl_fp16.safetensors",
                  vae=base.parent / "ae.safetensors")
    assert flow_parts.t5_tokenizer_near(base) is None and not flow_parts.t5_tokenizer_found(base)
    with pytest.raises(CheckpointError, match="ComfyUI's comfy/text_encoders/t5_tokenizer"):
        load_base(base, parts=parts)
    assert train_tab.guess_parts(str(base))["t5_tokenizer"] == ""

    shutil.copytree(files["t5_tokenizer"], comfy / "comfy" / "text_encoders" / "t5_tokenizer")
    assert flow_parts.t5_tokenizer_near(base) == comfy / "comfy" / "text_encoders" / "t5_tokenizer"
    assert flow_parts.t5_tokenizer_found(base) and not flow_parts.t5_tokenizer_found()
    assert train_tab.guess_parts(str(base))["t5_tokenizer"] == str(comfy / "comfy" / "text_encoders" / "t5_tokenizer")
    assert "The T5-XXL tokenizer: " + str(comfy / "comfy") in train_tab.explain_parts(str(base), "flux")
    loaded = load_base(base, parts=parts)
    tiny = tokenizer_of(files["t5_tokenizer"])
    assert len(loaded.pipeline.tokenizer_2) == len(tiny)  # the tiny vocabulary, not a made-up one
    assert loaded.pipeline.tokenizer_2("a red ring").input_ids == tiny("a red ring").input_ids

    forge = tmp_path / "webui"  # Forge: models/Stable-diffusion/x.safetensors, its tokenizer under backend/
    (forge / "models" / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(files["transformer"], forge / "models" / "Stable-diffusion" / "flux1-dev.safetensors")
    tokenizer = forge / "backend" / "huggingface" / "black-forest-labs" / "FLUX.1-dev" / "tokenizer_2"
    shutil.copytree(files["t5_tokenizer"], tokenizer)
    assert flow_parts.t5_tokenizer_near(forge / "models" / "Stable-diffusion" / "flux1-dev.safetensors") == tokenizer


def tokenizer_of(folder: Path):
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(folder))

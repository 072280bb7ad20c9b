"""Sample prompts with sd-scripts' options (--n --w --h --d --s --l --g --ss): parsed, checked, drawn as asked."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.test_training import make_run, train_run
from trainer import config, kohya_import, prompts, sampling
from trainer.events import read_all
from trainer.loading import load_base

LINE = "{trigger}, a red circle --n lowres, blurry --w 64 --h 128 --d 7 --s 2 --l 4.5 --ss ddim"


def test_a_line_gives_its_prompt_and_options():
    p = prompts.parse("zxq on a beach --n blurry --W 512 --h 768 --d 42 --s 28 --l 6.5 --ss k_euler_a")
    assert p == prompts.SamplePrompt("zxq on a beach", negative="blurry", width=512, height=768, seed=42, steps=28,
                                     cfg_scale=6.5, sampler="euler_a")
    assert prompts.parse("zxq") == prompts.SamplePrompt("zxq")
    assert prompts.parse("zxq --g 3.5", "flux").cfg_scale == 3.5  # FLUX.1's guidance is its cfg_scale
    assert set(prompts.SAMPLERS) == set(sampling.SAMPLERS)


@pytest.mark.parametrize("line, family, message", [
    ("zxq --q 3", "sd15", "--q: not a sample-prompt option; the options are --n (negative prompt), --w (width)"),
    ("zxq --w", "sd15", "--w: give the width after it"),
    ("zxq --w 500", "sd15", "--w 500: the width must be a multiple of 64"),
    ("zxq --s many", "sd15", "--s many: the steps must be a whole number"),
    ("zxq --l 50", "sdxl", "--l 50: the CFG scale must be from 1.0 to 30.0"),
    ("zxq --ss heun", "sd15", "--ss heun: choose one of euler_a, euler, dpm++_2m_karras, ddim"),
    ("zxq --g 3", "sd15", "--g: the guidance of FLUX.1 alone; use --l for the CFG scale"),
    ("zxq --l 3", "flux", "--l: FLUX.1 draws with its distilled guidance; use --g"),
    ("zxq --n ugly", "flux", "--n: FLUX.1 draws without a negative prompt"),
    ("zxq --ss ddim", "sd3", "--ss ddim: SD 3.5 and FLUX.1 sample with flow-matching Euler; use --ss euler"),
])
def test_a_bad_option_is_named_with_what_it_takes(line, family, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        prompts.parse(line, family)


def test_the_config_names_the_prompt_with_the_bad_option():
    with pytest.raises(config.ConfigError, match=r"sample.sample_prompts, prompt 2 \('zxq --w 100'\): --w 100: the "
                                                 r"width must be a multiple of 64") as e:
        config.build("character", "sd15", {"sample": {"sample_prompts": ["zxq", "zxq --w 100"]}})
    assert e.value.field == "sample.sample_prompts"


def test_a_run_draws_each_prompt_with_its_own_options(tiny_models, tmp_path):
    source = tiny_models["sd1"][1]
    run_dir, cfg = make_run(tmp_path, source, {"training": {"max_train_epochs": 1}, "sample": {
        "sample_every_n_epochs": 1, "sample_prompts": [LINE, "{trigger}"]}})
    assert train_run(run_dir).is_file()
    first = [e for e in read_all(run_dir) if e["type"] == "sample" and e["step"] == 0]
    assert [(e["prompt"], e["seed"]) for e in first] == [("zxq, a red circle", 7), ("zxq", 1234)]
    own, plain = (Image.open(run_dir / e["path"]) for e in first)
    assert own.size == (64, 128) and plain.size == (64, 64)
    text = own.text["parameters"]
    assert text.startswith("zxq, a red circle\nNegative prompt: lowres, blurry\nSteps: 2, Sampler: DDIM, "
                           "CFG scale: 4.5, Seed: 7, Size: 64x128"), text
    assert "Steps: 3, Sampler: Euler a, CFG scale: 7.0, Seed: 1234, Size: 64x64" in plain.text["parameters"]
    base = load_base(source)  # step 0: the adapter adds nothing yet, so the base draws the same picture
    options = dict(sampler="ddim", steps=2, cfg_scale=4.5, seed=7, width=64, height=128)
    again = sampling.generate(base, "zxq, a red circle", negative="lowres, blurry", **options)
    without = sampling.generate(base, "zxq, a red circle", **options)
    assert np.array_equal(np.asarray(own.convert("RGB")), np.asarray(again))
    assert not np.array_equal(np.asarray(again), np.asarray(without))  # the negative prompt was drawn with


def test_kohyas_prompt_file_is_imported_as_prompts(tmp_path):
    (tmp_path / "prompts.txt").write_text("# portraits\nzxq, smiling --n lowres --d 5\n\nzxq, side view\n")
    (tmp_path / "prompts.toml").write_text("[prompt]\n")
    toml = tmp_path / "train.toml"
    toml.write_text('sample_prompts = "prompts.txt"\nsample_every_n_epochs = 1\n')
    flat, warnings = kohya_import.import_kohya(toml)
    assert flat["sample_prompts"] == ["zxq, smiling --n lowres --d 5", "zxq, side view"] and warnings == []
    assert config.build("character", "sd15", flat).sample.sample_prompts == flat["sample_prompts"]
    toml.write_text('sample_prompts = "prompts.toml"\n')
    flat, warnings = kohya_import.import_kohya(toml)
    assert "sample_prompts" not in flat
    assert warnings == ["sample_prompts: prompts.toml is not a .txt prompt file (one prompt a line); ignored"]


def test_a_compare_of_the_run_takes_its_prompts_without_their_options(tmp_path):
    from trainer.compare_spec import CompareError, checked
    from trainer.rundir import RunDir
    from ui.compares import run_settings

    cfg = config.build("character", "sd15", {"data": {"trigger_word": "zxq"}, "sample": {
        "sample_prompts": ["{trigger} --n lowres --d 3", "{trigger}, smiling --n lowres --w 768"]}})
    config.save(cfg, tmp_path / "config.toml")
    suggested = run_settings(RunDir(tmp_path))
    assert suggested["prompts"] == ["zxq", "zxq, smiling"] and suggested["negative"] == "lowres"
    lora = tmp_path / "a.safetensors"
    lora.write_bytes(b"")
    with pytest.raises(CompareError, match=r"prompts: 'zxq --n ugly' holds sample-prompt options \(--n, --w, …\)"):
        checked({"base": "demo", "files": [str(lora)], "prompts": ["zxq", "zxq --n ugly"]})


@pytest.mark.parametrize("line, trigger, prompt", [
    ("{trigger}, a yellow ring", "zxc", "zxc, a yellow ring"),
    ("{trigger}, a yellow ring", "", "a yellow ring"),  # QA re-walk: ", a yellow ring" with no trigger word
    ("a ring, {trigger}", "", "a ring"),
    ("zz, {trigger}, yy", "", "zz, yy"),
    ("{trigger}", "", ""),
])
def test_a_prompt_without_a_trigger_word_loses_its_tag_and_comma(line, trigger, prompt):
    from trainer.setup import with_trigger

    assert with_trigger(line, trigger) == prompt

"""The one typed config: presets, layers, TOML round trips, field-named errors, kohya import."""

import re
import subprocess
import sys

import pytest

from trainer import config, kohya_import, methods
from trainer.config import ConfigError


@pytest.mark.parametrize("preset", config.list_presets())
@pytest.mark.parametrize("family", config.FAMILIES)
def test_every_preset_builds_and_round_trips(tmp_path, preset, family):
    cfg = config.build(preset, family)
    assert cfg.preset == preset and cfg.family == family
    config.save(cfg, tmp_path / "config.toml")
    assert config.load(tmp_path / "config.toml") == cfg


def test_presets_hold_what_the_field_uses():
    assert config.list_presets() == ["character", "lokr", "scene", "style"]
    c = config.build("character", "sd15")
    assert (c.optimizer.unet_lr, c.optimizer.text_encoder_lr) == (5e-4, 5e-5)
    assert (c.network.network_dim, c.network.network_alpha, c.data.resolution) == (32, 16.0, 512)
    x = config.build("character", "sdxl")
    assert (x.data.resolution, x.data.repeats_budget) == (1024, 200)
    assert config.bucket_limits(x.data.resolution, x.data.min_bucket_reso, x.data.max_bucket_reso) == (512, 2048)
    s = config.build("style", "sd15")
    assert s.network.network_train_unet_only and s.optimizer.text_encoder_lr == 0
    k = config.build("lokr", "sd15")
    assert (k.network.network_type, k.network.lokr_factor, k.optimizer.unet_lr) == ("lokr", 8, 1e-3)
    assert config.resolve_repeats(c, 8) == 50 and config.resolve_repeats(x, 8) == 25


def test_layers_override_the_preset_flat_or_sectioned():
    flat = config.build("character", "sd15", {"network_dim": 8, "sample_prompts": ["a", "b"]})
    sectioned = config.build("character", "sd15", {"network": {"network_dim": 8}, "sample": {"sample_prompts": ["a", "b"]}})
    assert flat == sectioned and flat.network.network_dim == 8 and flat.sample.sample_prompts == ["a", "b"]
    over = config.parse_overrides(["network_dim=8", "network.network_alpha=4", 'sample_prompts=["a", "b"]',
                                   "output_name=my lora"])
    assert over == {"network_dim": 8, "network_alpha": 4, "sample_prompts": ["a", "b"], "output_name": "my lora"}
    assert config.build("character", "sd15", {"network_dim": "16"}).network.network_dim == 16  # form strings


@pytest.mark.parametrize("layer, field, words", [
    ({"network_alpha": -1}, "network.network_alpha", ["-1", "> 0", "1024"]),
    ({"resolution": 500}, "data.resolution", ["500", "multiple of 64"]),
    ({"train_batch_size": 0}, "training.train_batch_size", ["0", ">= 1", "256"]),
    ({"sample_sampler": "foo"}, "sample.sample_sampler", ["'foo'", "euler_a", "ddim"]),
    ({"netwrok_dim": 8}, "netwrok_dim", ["did you mean 'network_dim'"]),
    ({"network_dim": "lots"}, "network.network_dim", ["'lots'", "number"]),
    ({"train_batch_size": None}, "training.train_batch_size",  # an emptied number box: not "= None" (QA)
     ["training.train_batch_size is empty: type a number (>= 1 and <= 256)"]),
    ({"resolution": 2048, "max_bucket_reso": 1024}, "data.max_bucket_reso",
     ["between min_bucket_reso", "max_bucket_reso (1024)", "set max_bucket_reso = 0"]),
    ({"resolution": 128, "min_bucket_reso": 256}, "data.min_bucket_reso",
     ["min_bucket_reso (256)", "set min_bucket_reso = 0"]),
    # combinations the worker could only fail on: refused with the fix
    ({"network_train_text_encoder_only": True, "text_encoder_lr": 0}, "optimizer.text_encoder_lr",
     ["set text_encoder_lr > 0", "network_train_text_encoder_only = false"]),
    ({"network_type": "locon", "conv_dim": 0}, "network.conv_dim", ["set conv_dim > 0", 'network_type = "lora"']),
    ({"network_type": "lora", "conv_dim": 8}, "network.conv_dim", ['network_type = "locon"', "conv_dim = 0"]),
    ({"network_type": "rslora", "conv_dim": 8}, "network.conv_dim", ["rslora adapts no 3x3 convs", "conv_dim = 0"]),
    ({"network_type": "vera", "conv_dim": 4}, "network.conv_dim", ["vera adapts linear layers only", "conv_dim = 0"]),
    ({"network_type": "adalora", "network_dim": 8, "adalora_init_r": 8}, "network.adalora_init_r",
     ["above network_dim (8)", "adalora_init_r = 0"]),
])
def test_bad_values_name_the_field_and_what_is_allowed(layer, field, words):
    with pytest.raises(ConfigError) as e:
        config.build("character", "sd15", layer)
    assert e.value.field == field
    for w in words:
        assert w in str(e.value)


def test_the_fixes_named_are_accepted():
    config.build("character", "sd15", {"network_train_text_encoder_only": True, "text_encoder_lr": 5e-5})
    config.build("character", "sd15", {"network_type": "locon", "conv_dim": 8})
    config.build("character", "sd15", {"network_type": "adalora", "network_dim": 8, "adalora_init_r": 9})
    for kind in methods.names(convs="optional"):
        config.build("character", "sd15", {"network_type": kind, "conv_dim": 0})
        config.build("character", "sd15", {"network_type": kind, "conv_dim": 4})


@pytest.mark.parametrize("resolution, limits", [(64, (64, 128)), (128, (64, 256)), (512, (256, 1024)),
                                                (768, (384, 1536)), (1024, (512, 2048))])
def test_bucket_limits_follow_the_resolution_unless_set(resolution, limits):
    assert config.bucket_limits(resolution) == limits
    assert config.bucket_limits(resolution, 128, 4096) == (128, 4096)
    assert config.bucket_limits(resolution, 0, 4096) == (limits[0], 4096)
    for preset in config.list_presets():  # every preset at every resolution, with no bucket setting by hand
        cfg = config.build(preset, "sd15", {"resolution": resolution})
        assert config.bucket_limits(cfg.data.resolution, cfg.data.min_bucket_reso, cfg.data.max_bucket_reso) == limits


def test_a_form_built_from_a_preset_takes_a_new_resolution():
    """The UI fills its form from the built config and sends every field back: automatic limits must stay 0 there,
    or the preset's resolution would pin them."""
    cfg = config.build("character", "sd15")
    form = {k: v for section in config.to_dict(cfg).values() if isinstance(section, dict) for k, v in section.items()}
    assert (form["min_bucket_reso"], form["max_bucket_reso"]) == (0, 0)
    small = config.build("character", "sd15", form | {"resolution": 128})
    assert config.bucket_limits(128, small.data.min_bucket_reso, small.data.max_bucket_reso) == (64, 256)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'portrait'; choose one of: character, lokr, scene, style"):
        config.build("portrait", "sd15")


def test_load_applies_overrides_and_reports_bad_toml(tmp_path):
    path = tmp_path / "config.toml"
    config.save(config.build("style", "sdxl"), path)
    cfg = config.load(path, ["network_dim=4", "seed=7"])
    assert (cfg.network.network_dim, cfg.training.seed, cfg.data.resolution) == (4, 7, 1024)
    path.write_text("[network\nnetwork_dim = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(path)


def test_field_help_for_the_ui():
    info = config.field_help("network_alpha")
    assert info["range"] == (0, 1024) and info["section"] == "network" and info["type"] == "float"
    assert config.field_help("sample_sampler")["choices"][0] == "euler_a"


def test_kohya_toml_imports(tmp_path):
    kohya = tmp_path / "kohya.toml"
    kohya.write_text('''
pretrained_model_name_or_path = "/models/sd15.safetensors"
network_module = "networks.lora"
network_args = ["conv_dim=4", "conv_alpha=1"]
network_dim = 16
network_alpha = 8
learning_rate = 1e-4
unet_lr = 2e-4
text_encoder_lr = 5e-5
resolution = "512,512"
train_batch_size = 2
xformers = true
caption_tag_dropout_rate = 0.1
scale_weight_norms = 1.0
output_dir = "/out"
mystery_knob = 3
''')
    flat, warnings = kohya_import.import_kohya(kohya)
    cfg = config.build(None, "sd15", flat)
    assert (cfg.network.network_type, cfg.network.conv_dim, cfg.network.network_dim) == ("locon", 4, 16)
    assert (cfg.optimizer.unet_lr, cfg.data.resolution, cfg.model.attention) == (2e-4, 512, "xformers")
    assert cfg.data.caption_tag_dropout_rate == 0.1 and cfg.network.scale_weight_norms == 1.0
    assert any(w.startswith("output_dir") for w in warnings) and any("mystery_knob" in w for w in warnings)
    flat, _ = kohya_import.import_kohya({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "factor=8"]})
    assert flat == {"network_type": "lokr", "lokr_factor": 8}
    with pytest.raises(ConfigError, match="networks.dylora"):
        kohya_import.import_kohya({"network_module": "networks.dylora"})


def test_cli_new_takes_a_kohya_toml_under_its_own_base_pictures_and_overrides(tmp_path):
    import io

    from tests.test_training import draw_dataset
    from trainer import __main__ as cli

    (tmp_path / "prompts.txt").write_text("# one\nzxq --n lowres\n")
    kohya = tmp_path / "kohya.toml"
    kohya.write_text('pretrained_model_name_or_path = "/models/other.safetensors"\ntrain_data_dir = "/data"\n'
                     'network_module = "networks.lora"\nnetwork_dim = 8\nnetwork_alpha = 4\nmax_token_length = 150\n'
                     'multires_noise_iterations = 6\nip_noise_gamma = 0.1\nmax_timestep = 800\nlearning_rate = 3e-4\n'
                     'sample_prompts = "prompts.txt"\n'
                     'output_dir = "/out"\n')
    out = io.StringIO()
    from trainer.new_run import create_run

    run = create_run(tmp_path / "runs", "demo", draw_dataset(tmp_path / "pictures"), "style", ["network_alpha=2"],
                     out=out, kohya=kohya)
    cfg = config.load(run.config)
    assert (cfg.network.network_dim, cfg.network.network_alpha, cfg.data.max_token_length) == (8, 2.0, 150)
    assert (cfg.training.multires_noise_iterations, cfg.optimizer.learning_rate) == (6, 3e-4)
    assert (cfg.training.ip_noise_gamma, cfg.training.max_timestep) == (0.1, 800)
    assert (cfg.optimizer.unet_lr, cfg.optimizer.text_encoder_lr) == (3e-4, 3e-4)  # kohya's rate, not the preset's
    assert cfg.sample.sample_prompts == ["zxq --n lowres"] and cfg.model.pretrained_model_name_or_path == "demo"
    assert cfg.data.train_data_dir == str(run.dataset)
    said = out.getvalue()
    assert "--kohya kohya.toml: output_dir: a kohya option with no effect here; ignored" in said
    assert "--kohya kohya.toml: pretrained_model_name_or_path: this run's own (--base, --images) is used" in said
    kohya.write_text('network_module = "networks.dylora"\n')
    code = cli.main(["new", "--base", "demo", "--images", str(tmp_path / "pictures"), "--preset", "style",
                     "--runs-dir", str(tmp_path / "runs"), "--kohya", str(kohya), "--no-train"])
    assert code == 2 and len(list((tmp_path / "runs").iterdir())) == 1  # refused before a run was made


def test_config_module_stays_light():
    code = "import sys, trainer.config; assert 'torch' not in sys.modules and 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=config.PRESETS_DIR.parent)


@pytest.mark.parametrize("args, says", [
    (["eps=0"], "AdamW's eps must be a number in (0, 1]"),  # the NaN LoRA of issue #14
    (["betas=0.9,1.0"], "betas must be two numbers, each in [0, 1)"),
    (["lr=1"], "'lr' is not an argument of AdamW"),
    (["betas"], "expected name=value"),
    (["amsgrad=yes"], "amsgrad must be True or False"),
])
def test_optimizer_args_are_checked_at_validation(args, says):
    with pytest.raises(config.ConfigError, match=re.escape(says)) as e:
        config.build("character", "sd15", {"optimizer_args": args})
    assert e.value.field == "optimizer.optimizer_args"
    assert config.build("character", "sd15", {"optimizer_args": ["betas=0.9,0.99", "eps=1e-8"]})


def test_optimizer_args_name_what_each_optimizer_takes():
    import inspect

    import torch
    from prodigyopt import Prodigy
    from transformers.optimization import Adafactor

    from trainer.optimizer_args import ALLOWED

    for name, cls in {"AdamW": torch.optim.AdamW, "Prodigy": Prodigy, "Adafactor": Adafactor}.items():
        takes = set(inspect.signature(cls).parameters)
        assert set(ALLOWED[name]) <= takes, (name, set(ALLOWED[name]) - takes)


@pytest.mark.parametrize("layer, field", [
    ({"trigger_word": "zxq\x07"}, "data.trigger_word"),
    ({"sample_prompts": ["a cat\nsitting"]}, "sample.sample_prompts"),
    ({"pretrained_model_name_or_path": "models/a\x00b"}, "model.pretrained_model_name_or_path"),
    ({"output_name": "x" * 10_000}, "training.output_name"),
])
def test_text_that_would_break_toml_names_or_png_chunks_is_refused(layer, field):
    with pytest.raises(config.ConfigError) as e:
        config.build("character", "sd15", layer)
    assert e.value.field == field


@pytest.mark.parametrize("args, fused", [([], True), (["fused=False"], False), (["fused=True"], True)])
def test_adamw_is_fused_on_cpu_unless_optimizer_args_say_otherwise(args, fused):
    import torch

    from trainer.optim import make_optimizer

    cfg = config.build("character", "sd15", {"optimizer_args": args, "weight_decay": 0.02})
    optimizer = make_optimizer(cfg.optimizer, [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 1e-4}],
                               torch.device("cpu"))
    assert optimizer.defaults["fused"] is fused
    assert optimizer.defaults["weight_decay"] == 0.02


def test_the_demo_base_trains_at_64_px_and_lets_its_buckets_follow_a_larger_resolution():
    """QA 9: the demo's own min / max bucket sides (64, 128) refused Resolution 512 on a hidden Advanced field."""
    demo = {"model": {"pretrained_model_name_or_path": "demo"}}
    cfg = config.build("character", "sd15", demo)
    assert cfg.data.resolution == 64 and config.bucket_limits(64, cfg.data.min_bucket_reso,
                                                              cfg.data.max_bucket_reso) == (64, 128)
    larger = config.build("character", "sd15", demo, {"data": {"resolution": 512}})
    assert config.bucket_limits(512, larger.data.min_bucket_reso, larger.data.max_bucket_reso) == (256, 1024)

"""network_weights: a run starts from a kohya LoRA file's weights, with the file's update kept whole."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_training import losses, make_run, train_run
from trainer import config
from trainer.events import read_all
from trainer.setup import setup


def update(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    return (up.flatten(1).float() @ down.flatten(1).float()) * alpha / down.shape[0]


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """A LoRA (dim 4, alpha 2) trained one epoch on the tiny SD1 model, and the model."""
    source = tiny_models["sd1"][1]
    run_dir, _ = make_run(tmp_path_factory.mktemp("first"), source, {"training": {"max_train_epochs": 1}})
    return train_run(run_dir), source


def test_a_run_starts_from_the_files_update_at_its_own_alpha(trained, tmp_path):
    first, source = trained
    run_dir, cfg = make_run(tmp_path, source, {"network": {"network_alpha": 3.0, "network_weights": str(first)}})
    run = setup(cfg, run_dir)
    file = load_file(str(first))
    names = run.net.names()
    for name in names:
        f = run.net.factors(name)
        assert float(f["alpha"]) == 3.0
        ours = update(f["lora_down.weight"], f["lora_up.weight"], 3.0)
        theirs = update(file[f"{name}.lora_down.weight"], file[f"{name}.lora_up.weight"], float(file[f"{name}.alpha"]))
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-5), name
    assert any(theirs.abs().max() > 0 for theirs in [update(file[f"{n}.lora_down.weight"], file[f"{n}.lora_up.weight"],
                                                            2.0) for n in names])  # the file learned something
    said = [e["message"] for e in read_all(run_dir) if e["type"] == "status" and "Started from" in e["message"]]
    assert said == [f"Started from {first.name}: {len(names)} of this network's {len(names)} modules"]
    assert train_run(run_dir).is_file() and len(losses(run_dir)) == 6


def test_a_file_of_another_rank_or_no_module_of_ours_is_refused_by_name(trained, tmp_path):
    first, source = trained
    run_dir, cfg = make_run(tmp_path, source, {"network": {"network_dim": 8, "network_weights": str(first)}})
    with pytest.raises(config.ConfigError, match=r"network.network_weights: lora.safetensors: lora_\w+ is of rank 4 "
                                                 r"in the file, 8 here: set network_dim = 4 to start from it"):
        setup(cfg, run_dir)
    other = tmp_path / "other.safetensors"
    save_file({"lora_unet_elsewhere.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_elsewhere.lora_up.weight": torch.zeros(8, 4)}, str(other))
    run_dir, cfg = make_run(tmp_path / "b", source, {"network": {"network_weights": str(other)}})
    with pytest.raises(config.ConfigError, match=r"other.safetensors holds none of this network's \d+ modules"):
        setup(cfg, run_dir)


def test_methods_that_cannot_start_from_a_file_and_missing_files_are_refused(tmp_path):
    with pytest.raises(config.ConfigError, match=r"network.network_weights: starting from a file works with lora, "
                                                 r"locon, rslora, lora_fa, not with network_type 'loha'"):
        config.build("character", "sd15", {"network": {"network_type": "loha", "network_weights": __file__}})
    with pytest.raises(config.ConfigError, match=r"network.network_weights = '/no/such.safetensors': no such file"):
        config.build("character", "sd15", {"network": {"network_weights": "/no/such.safetensors"}})
    # QA: a damaged file passed the form and the run failed on 'header too large', naming no setting
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(os.urandom(1000))
    with pytest.raises(config.ConfigError, match=r"network.network_weights: fake.safetensors: not a safetensors"):
        config.build("character", "sd15", {"network": {"network_weights": str(fake)}})
    save_file({"weight": torch.zeros(2)}, str(fake))
    with pytest.raises(config.ConfigError, match=r"network.network_weights: fake.safetensors holds no LoRA \(no "
                                                 r"lora_down / lora_up keys\); a kohya LoRA file is needed"):
        config.build("character", "sd15", {"network": {"network_weights": str(fake)}})

"""Sweeps (issue #16): trials trained together on one loaded base equal the same configs trained alone, are ranked
by held-out loss, pruned, cancelled and resumed; the search space refuses what the trials cannot share."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_flow_training import FLOW_TINY, flow  # noqa: F401 (flow: the tiny FLUX.1 / SD 3.5 models)
from tests.test_training import TINY, draw_dataset
from trainer import config, sweep, sweep_space, validation
from trainer.config import ConfigError
from trainer.events import read_all
from trainer.sweep_run import train_sweep
from trainer.train import StopFlag, train

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATASET = ROOT / "demo" / "dataset"
TOLERANCE = 1e-5  # max abs difference of every saved tensor, and of every logged loss (step and held-out)
BASE = {"network": {"network_train_unet_only": True}, "data": {"validation_split": 0.34},  # 4 train, 2 held out
        "training": {"max_train_epochs": 2}}


def base_toml(tmp_path: Path, model: Path, *layers: dict) -> Path:
    data = draw_dataset(tmp_path / "pictures")
    cfg = config.build("character", "sd15", TINY, BASE, {"pretrained_model_name_or_path": str(model),
                                                         "train_data_dir": str(data)}, *layers)
    config.save(cfg, tmp_path / "base.toml")
    return tmp_path / "base.toml"


def logged_losses(run_dir: Path) -> list[tuple[str, int, float]]:
    return [(e["type"], e["step"], e["loss"]) for e in read_all(run_dir) if e["type"] in ("step", "validation")]


def assert_same_as_alone(trial_dir: Path, alone_dir: Path, tolerance: float = TOLERANCE) -> float:
    """The trial's final file and losses against the same config trained alone; returns the largest difference."""
    train(config.load(trial_dir / "config.toml"), alone_dir)
    fused, alone = load_file(str(trial_dir / "output" / "lora.safetensors")), load_file(
        str(alone_dir / "output" / "lora.safetensors"))
    assert set(fused) == set(alone)
    worst = max((fused[k].float() - alone[k].float()).abs().max().item() for k in fused)
    a, b = logged_losses(trial_dir), logged_losses(alone_dir)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    worst_loss = max(abs(x[2] - y[2]) for x, y in zip(a, b))
    assert worst <= tolerance and worst_loss <= tolerance, (worst, worst_loss)
    return max(worst, worst_loss)


def test_space_refuses_what_trials_cannot_share(tiny_models, tmp_path):
    toml = base_toml(tmp_path, tiny_models["sd1"][0])
    base = sweep.base_config(toml, [])
    for item, field in [("resolution=64,128", "data.resolution"), ("pretrained_model_name_or_path=a,b",
                                                                   "model.pretrained_model_name_or_path"),
                        ("validation_split=0.2,0.3", "data.validation_split"), ("clip_skip=1,2", "model.clip_skip"),
                        ("max_token_length=75,225", "data.max_token_length")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            sweep_space.parse_grid(item)
    with pytest.raises(ConfigError, match="unknown setting 'network_dimm'; did you mean 'network_dim'"):
        sweep_space.parse_grid("network_dimm=4,8")
    with pytest.raises(ConfigError, match="unet_lr"):  # the preset sets unet_lr, which wins over learning_rate
        sweep_space.check(base, dict([sweep_space.parse_grid("learning_rate=1e-4,1e-3")]), "grid", 0)
    with pytest.raises(ConfigError, match="training.seed chooses the held-out pictures"):
        sweep_space.check(base, dict([sweep_space.parse_grid("seed=1,2")]), "grid", 0)
    with pytest.raises(ConfigError, match="network.network_alpha = -1.0"):
        sweep_space.check(base, {"network_alpha": {"values": [1.0, -1.0]}}, "grid", 0)
    with pytest.raises(ConfigError, match="a grid search takes lists"):
        sweep_space.check(base, dict([sweep_space.parse_range("unet_lr=1e-4:1e-2:log")]), "grid", 0)
    no_held_out = sweep.base_config(toml, ["validation_split=0"])
    with pytest.raises(ConfigError, match="held-out loss"):
        sweep_space.check(no_held_out, {"network_dim": {"values": [4, 8]}}, "grid", 0)
    assert sweep_space.parse_range("network_dim=2:16:log") == ("network_dim", {"low": 2, "high": 16, "log": True})
    assert sweep_space.check(base, {"network_dim": {"values": [4, 8]}, "unet_lr": {"values": [1e-4, 1e-3]}},
                             "grid", 0) == 4


def test_a_trial_trained_in_a_sweep_equals_it_trained_alone(tiny_models, tmp_path, monkeypatch):
    """The issue's key check, for LoRA and LyCORIS LoKr: four trials share every forward, each its own seed, and
    their held-out losses come from shared forwards too."""
    toml = base_toml(tmp_path, tiny_models["sd1"][0], {"training": {  # each trial's own input noise reaches the forward
        "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True},
        "network": {"scale_weight_norms": 1e-4}})  # and each trial's max norm its own modules
    folder = sweep.create(tmp_path / "runs", toml, {"network_type": {"values": ["lora", "lokr"]},
                                                    "unet_lr": {"values": [5e-4, 2e-3]}}, "grid", name="eq")
    measured_alone, measure = [], validation.HeldOut.measure

    def counted(held, run):
        if held.known is None or held.known[0] != run.progress.step:
            measured_alone.append(run.progress.step)
        return measure(held, run)

    monkeypatch.setattr(validation.HeldOut, "measure", counted)
    assert train_sweep(folder, StopFlag()) == "done"
    assert measured_alone == []
    state = sweep.read(folder)
    assert [t["group"] for t in state["trials"]] == ["shared"] * 4
    assert [t["state"] for t in state["trials"]] == ["done"] * 4
    assert [r["value"] for r in state["ranking"]] == sorted(t["value"] for t in state["trials"])
    assert all(e["keys_scaled"] > 0 for t in state["trials"] for e in read_all(folder / t["name"])
               if e["type"] == "step")
    for kind in ("lora", "lokr"):
        t = next(t for t in state["trials"] if t["params"] == {"network_type": kind, "unet_lr": 5e-4})
        print(f"{kind}: largest difference from alone {assert_same_as_alone(folder / t['name'], tmp_path / kind):.3g}")


def test_flux_trials_share_the_transformer_forward_and_equal_their_runs_alone(flow, tmp_path):
    """The same engine on FLUX.1's transformer: routed Linears, the flow-matching loss drawn as alone, held-out σ."""
    data = draw_dataset(tmp_path / "pictures")
    cfg = config.build("character", "flux", TINY, FLOW_TINY, BASE, {
        "pretrained_model_name_or_path": str(flow["flux"]["folder"]), "train_data_dir": str(data),
        "ip_noise_gamma": 0.1})
    config.save(cfg, tmp_path / "base.toml")
    folder = sweep.create(tmp_path / "runs", tmp_path / "base.toml", {"network_type": {"values": ["lora", "lokr"]}},
                          "grid", name="flux")
    assert train_sweep(folder, StopFlag()) == "done"
    state = sweep.read(folder)
    assert [t["group"] for t in state["trials"]] == ["shared"] * 2 and all(t["value"] for t in state["trials"])
    for t in state["trials"]:
        print(f"flux {t['params']['network_type']}: largest difference from alone "
              f"{assert_same_as_alone(folder / t['name'], tmp_path / t['name']):.3g}")


def test_trials_that_cannot_share_a_forward_train_alone_on_the_same_base(tiny_models, tmp_path):
    """Dropout draws inside the forward, so a trial with it trains on its own: then exactly the run alone."""
    toml = base_toml(tmp_path, tiny_models["sd1"][0])
    folder = sweep.create(tmp_path / "runs", toml, {"network_dropout": {"values": [0.0, 0.1]}}, "grid", name="mix")
    assert train_sweep(folder, StopFlag()) == "done"
    state = sweep.read(folder)
    groups = {t["params"]["network_dropout"]: t for t in state["trials"]}
    assert groups[0.0]["group"] == "shared" and groups[0.1]["group"] == "alone"
    assert "network_dropout = 0.1" in groups[0.1]["why_alone"]
    assert_same_as_alone(folder / groups[0.1]["name"], tmp_path / "alone-dropout", tolerance=0.0)


def test_vera_and_adalora_trials_train_alone_beside_shared_ones(tiny_models, tmp_path):
    """VeRA's and AdaLoRA's layers are not routed (AdaLoRA's is a peft LoraLayer with its own forward, which the
    shared LoRA forward must not take for a plain one): they train alone on the same base, equal to their runs
    alone, while LoRA shares its forward."""
    toml = base_toml(tmp_path, tiny_models["sd1"][0])
    folder = sweep.create(tmp_path / "runs", toml, {"network_type": {"values": ["lora", "adalora", "vera"]}}, "grid",
                          name="methods")
    assert train_sweep(folder, StopFlag()) == "done"
    trials = {t["params"]["network_type"]: t for t in sweep.read(folder)["trials"]}
    assert {k: t["group"] for k, t in trials.items()} == {"lora": "shared", "adalora": "alone", "vera": "alone"}
    assert all(t["state"] == "done" for t in trials.values())
    assert_same_as_alone(folder / trials["adalora"]["name"], tmp_path / "alone-adalora")


def test_trials_training_the_text_encoder_share_the_unet_forward(tiny_models, tmp_path, monkeypatch):
    """Each trial's captions go through its own copy of the text encoder with its adapter; the UNet forward is
    shared with a trial that trains the UNet only, the two UNet LoRAs of each layer as one batched matmul.
    Measured: 1.0e-5 (the TE adapter's Adam-normalised steps)."""
    from trainer import sweep_fused

    batched, batched_lora_added = [], sweep_fused.batched_lora_added
    monkeypatch.setattr(sweep_fused, "batched_lora_added", lambda *a: batched.append(1) or batched_lora_added(*a))
    toml = base_toml(tmp_path, tiny_models["sd1"][0], {"network": {"network_train_unet_only": False},
                                                       "optimizer": {"text_encoder_lr": 1e-3}})
    folder = sweep.create(tmp_path / "runs", toml, {"network_train_unet_only": {"values": [False, True]}}, "grid",
                          name="te")
    assert train_sweep(folder, StopFlag()) == "done"
    assert len(batched) > 100  # every routed UNet layer, every step
    state = sweep.read(folder)
    assert [t["group"] for t in state["trials"]] == ["shared"] * 2
    te = next(t for t in state["trials"] if not t["params"]["network_train_unet_only"])
    assert any("lora_te" in k for k in load_file(str(folder / te["name"] / "output" / "lora.safetensors")))
    assert_same_as_alone(folder / te["name"], tmp_path / "alone-te", tolerance=3 * TOLERANCE)


def test_trials_of_different_ranks_share_one_batched_matmul_and_equal_their_runs_alone(tiny_models, tmp_path,
                                                                                       monkeypatch):
    """network_dim 2 and 4: the rank-2 trial's A and B are padded with zeros to rank 4 in the batched matmul."""
    from trainer import sweep_fused

    batched, batched_lora_added = [], sweep_fused.batched_lora_added
    monkeypatch.setattr(sweep_fused, "batched_lora_added", lambda *a: batched.append(1) or batched_lora_added(*a))
    toml = base_toml(tmp_path, tiny_models["sd1"][0], {"training": {"max_train_epochs": 1}})
    folder = sweep.create(tmp_path / "runs", toml, {"network_dim": {"values": [2, 4]}}, "grid", name="ranks")
    assert train_sweep(folder, StopFlag()) == "done"
    assert len(batched) > 50
    low = next(t for t in sweep.read(folder)["trials"] if t["params"] == {"network_dim": 2})
    print(f"rank 2 beside rank 4: largest difference from alone "
          f"{assert_same_as_alone(folder / low['name'], tmp_path / 'alone-r2'):.3g}")


def test_random_and_tpe_searches_ask_in_rounds(tiny_models, tmp_path):
    toml = base_toml(tmp_path, tiny_models["sd1"][0], {"training": {"max_train_epochs": 1}})
    for search in ("random", "tpe"):
        folder = sweep.create(tmp_path / "runs", toml, {"unet_lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                                        "network_dim": {"values": [2, 4]}}, search, trials=3,
                              parallel=2, name=search)
        assert train_sweep(folder, StopFlag()) == "done"
        state = sweep.read(folder)
        assert [t["round"] for t in state["trials"]] == [0, 0, 1]
        assert all(1e-4 <= t["params"]["unet_lr"] <= 1e-2 for t in state["trials"])
        assert len(state["ranking"]) == 3 and all(t["state"] == "done" for t in state["trials"])


def test_a_trial_the_user_stops_ends_as_pruned_and_the_others_train_on(tiny_models, tmp_path, monkeypatch):
    """The Sweeps tab's Stop trial: the trial's stop-requested file is seen after the next fused step."""
    from trainer import rundir, sweep_run

    toml = base_toml(tmp_path, tiny_models["sd1"][0])
    folder = sweep.create(tmp_path / "runs", toml, {"unet_lr": {"values": [5e-4, 2e-3]}}, "grid", name="stop")
    judge = sweep_run.Judge.__call__

    def asked_at_step_2(self, cursors):  # the user clicks Stop on trial-000 once it has made 2 steps
        if cursors[0].run.progress.step >= 2:
            rundir.RunDir(folder / "trial-000").stop_file.touch()
        judge(self, cursors)

    monkeypatch.setattr(sweep_run.Judge, "__call__", asked_at_step_2)
    assert train_sweep(folder, StopFlag()) == "done"
    first, second = sweep.read(folder)["trials"]
    assert (first["state"], first["message"], first["step"]) == ("pruned", "stopped at step 2, as asked", 2)
    assert second["state"] == "done" and second["step"] == 4  # the whole run: 2 epochs of 2 steps
    assert (folder / "trial-000" / "output" / "lora.safetensors").is_file()  # the stopped trial's file, as it was
    assert {r["name"] for r in sweep.read(folder)["ranking"]} == {"trial-000", "trial-001"}


def test_a_grid_sweep_asked_in_rounds_asks_every_point_once(tiny_models, tmp_path):
    """A grid of 6 trained 2 at a time: each round reads the next points of one shuffled grid (a seed per round
    shuffled it anew, so rounds repeated points and left others out)."""
    toml = base_toml(tmp_path, tiny_models["sd1"][0])
    grid = {"unet_lr": {"values": [1e-4, 1e-3, 3e-3]}, "network_dim": {"values": [4, 8]}}
    folder = sweep.create(tmp_path / "runs", toml, grid, "grid", parallel=2, name="grid")
    state = sweep.read(folder)
    study = sweep_space.study(folder, "grid", state["space"], state["seed"], state["prune"])
    for _ in range(3):
        sweep.new_round(folder, state, study)
    points = [(t["params"]["unet_lr"], t["params"]["network_dim"]) for t in state["trials"]]
    assert sorted(points) == sorted(itertools.product([1e-4, 1e-3, 3e-3], [4, 8]))


def sweep_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer", "sweep", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_cli_sweep_prunes_ranks_and_resumes_after_sigterm_with_the_same_table(tmp_path):
    """The issue's check: 4 trials on the demo model and dataset from the command line."""
    cfg = config.build("character", "sd15", config.base_settings("demo"), TINY, BASE, {
        "pretrained_model_name_or_path": "demo", "train_data_dir": str(DEMO_DATASET)},
        {"training": {"max_train_epochs": 2, "save_every_n_steps": 1, "validation_every_n_steps": 2}})
    config.save(cfg, tmp_path / "base.toml")
    toml = tmp_path / "base.toml"
    space = ["--grid", "network_type=lora,lokr", "--grid", "unet_lr=2e-4,3e-3", "--prune", "halving"]
    whole = sweep_cli("--config", str(toml), "--runs-dir", str(tmp_path / "runs"), "--name", "whole", *space)
    out = whole.communicate(timeout=300)[0]
    assert whole.returncode == 0, out
    reference = sweep.read(tmp_path / "runs" / "whole")
    assert sum(t["state"] == "pruned" for t in reference["trials"]) >= 1
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "trial"])
    assert lines[header + 1].split()[:3] == ["1", reference["ranking"][0]["name"], "done"]  # printed, best first
    assert "pruned at step 2: held-out " in out

    cut = sweep_cli("--config", str(toml), "--runs-dir", str(tmp_path / "runs"), "--name", "cut", *space)
    folder = tmp_path / "runs" / "cut"
    deadline = time.time() + 120
    while time.time() < deadline and not any(e["type"] == "checkpoint" and "state" in e["path"] and e["step"] >= 3
                                             for e in read_all(folder / "trial-001")):  # 000, 003 are pruned at step 2
        time.sleep(0.05)
    cut.send_signal(signal.SIGTERM)
    out = cut.communicate(timeout=120)[0]
    assert cut.returncode == 3, out
    unfinished = [t for t in sweep.read(folder)["trials"] if t["state"] == "cancelled"]
    assert unfinished, out
    for t in unfinished:
        status = json.loads((folder / t["name"] / "status.json").read_text())
        assert status["state"] == "cancelled" and (folder / t["name"] / "state").is_dir()
    again = sweep_cli(str(folder))
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out
    resumed = sweep.read(folder)
    assert [(r["name"], r["state"], r["step"]) for r in resumed["ranking"]] == [
        (r["name"], r["state"], r["step"]) for r in reference["ranking"]]
    for a, b in zip(resumed["ranking"], reference["ranking"]):
        assert a["value"] == pytest.approx(b["value"], abs=TOLERANCE)
    assert sweep_cli(str(folder)).wait(timeout=120) == 0  # a finished sweep stays finished


def test_cli_refuses_a_field_by_name(tiny_models, tmp_path):
    toml = base_toml(tmp_path, tiny_models["sd1"][0])
    bad = sweep_cli("--config", str(toml), "--runs-dir", str(tmp_path / "runs"), "--grid", "resolution=64,128")
    out = bad.communicate(timeout=120)[0]
    assert bad.returncode == 2 and "data.resolution cannot vary in a sweep" in out, out
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_sweep_benchmark_quick():
    from bench import sweep as bench

    (result,) = bench.main(["--quick"])
    assert result["k"] == 2 and result["sweep_s"] > 0 and result["sequential_s"] > 0 and result["memory_ratio"] > 0

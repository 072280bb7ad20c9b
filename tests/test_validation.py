"""The held-out loss (issue #15): pictures never trained on, scored at fixed noise and timesteps at every saved file."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

import trainer.train
from tests.test_training import draw_dataset, make_run
from trainer import config, data, validation
from trainer.events import read_all
from trainer.train import StopFlag, train

SPLIT = {"data": {"validation_split": 0.34}}  # 2 of 6 pictures held out; 4 train: 2 batches an epoch


def held_out_events(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_all(run_dir) if e["type"] == "validation"}


@pytest.fixture()
def spy(monkeypatch):
    """Records the Run and the paths of every picture the loop feeds into a batch."""
    seen = {"paths": [], "runs": []}
    real_setup, real_batch = trainer.train.setup, trainer.train.make_batch

    def setup(cfg, run_dir):
        run = real_setup(cfg, run_dir)
        seen["runs"].append(run)
        return run

    def make_batch(run, indices, rng):
        seen["paths"] += [run.items[i].path for i in indices]
        return real_batch(run, indices, rng)

    monkeypatch.setattr(trainer.train, "setup", setup)
    monkeypatch.setattr(trainer.train, "make_batch", make_batch)
    return seen


def test_choose_splits_by_seed_and_says_when_too_small(tmp_path):
    found = data.scan(draw_dataset(tmp_path / "six"))
    a, b = validation.choose(found, 0.34, "", 42), validation.choose(found, 0.34, "", 42)
    assert a == b and len(a.held_out) == 2 and len(a.train) == 4
    assert not {p for p, _, _ in a.held_out} & {p for p, _, _ in a.train}
    assert validation.choose(found, 0.01, "", 42).held_out.__len__() == 1  # at least one
    small = validation.choose(found[:2], 0.5, "", 42)
    assert small.held_out == [] and small.train == found[:2] and small.note.startswith("Held-out loss off")
    assert validation.choose(found, 0.0, "", 42) == validation.Choice(found, [], "")
    folder = validation.choose(found, 0.0, str(draw_dataset(tmp_path / "other", 3)), 42)
    assert len(folder.held_out) == 3 and folder.train == found
    assert validation.choose(found, 0.0, str(tmp_path / "missing"), 42).note.startswith("Held-out loss off")


def test_config_refuses_both_and_steps_without_pictures():
    with pytest.raises(config.ConfigError, match="data.validation_dir"):
        config.build("character", "sd15", {"validation_split": 0.1, "validation_dir": "/x"})
    with pytest.raises(config.ConfigError, match="training.validation_every_n_steps"):
        config.build("character", "sd15", {"validation_every_n_steps": 5})
    with pytest.raises(config.ConfigError, match="data.validation_split"):
        config.build("character", "sd15", {"validation_split": 0.9})


def test_held_out_pictures_are_never_trained_on_and_scored_at_every_file(tiny_models, tmp_path, spy):
    run_dir, _ = make_run(tmp_path, tiny_models["sd1"][1], SPLIT, {"training": {"validation_every_n_steps": 1}})
    final = train(config.load(run_dir / "config.toml"), run_dir)
    run = spy["runs"][0]
    held = set(run.held_out.paths)
    assert len(held) == 2 and len(run.items) == 4 and len(spy["paths"]) == 8  # 2 epochs of 4 pictures
    assert not held & set(spy["paths"]) and set(spy["paths"]) == {item.path for item in run.items}
    losses = held_out_events(run_dir)
    assert sorted(losses) == [0, 1, 2, 3, 4]  # the base, then every step
    files = [e for e in read_all(run_dir) if e["type"] == "checkpoint" and e["path"].endswith(".safetensors")]
    assert [e["step"] for e in files] == [2, 4]
    for e in files:
        with safe_open(str(run_dir / e["path"]), "pt") as f:
            meta = f.metadata()
        assert float(meta["ss_validation_loss"]) == losses[e["step"]]
        assert meta["ss_validation_step"] == str(e["step"]) and meta["ss_validation_images"] == "2"
        assert meta["ss_num_train_images"] == "4"
    assert final.is_file()
    modes = [m.training for m in all_modules(run)]
    first, second = run.held_out.measure(run), run.held_out.measure(run)
    assert abs(first - second) <= 1e-6 and abs(first - losses[4]) <= 1e-6
    assert [m.training for m in all_modules(run)] == modes and any(modes)  # eval while measuring, then restored
    notes = [e["message"] for e in read_all(run_dir) if e["type"] == "status" and e["phase"] == "held-out"]
    assert notes and "2 of 6 pictures" in notes[0]


def all_modules(run):
    return [m for root in run.net.torch_modules() for m in root.modules()]


def test_too_small_a_dataset_turns_it_off_with_a_note(tiny_models, tmp_path):
    run_dir, _ = make_run(tmp_path, tiny_models["sd1"][1], {"data": {"validation_split": 0.5},
                                                            "training": {"max_train_epochs": 1}})
    for extra in sorted((run_dir / "dataset").iterdir())[4:]:  # keep img0, img1 and their captions
        extra.unlink()
    final = train(config.load(run_dir / "config.toml"), run_dir)
    assert final.is_file() and held_out_events(run_dir) == {}
    notes = [e["message"] for e in read_all(run_dir) if e["type"] == "status" and e["phase"] == "held-out"]
    assert len(notes) == 1 and notes[0].startswith("Held-out loss off: 2 picture(s) are too few")
    with safe_open(str(final), "pt") as f:
        assert "ss_validation_loss" not in f.metadata()


def test_resume_gives_the_held_out_losses_of_an_uninterrupted_run(tiny_models, tmp_path, monkeypatch):
    layer = {"training": {"max_train_epochs": 3, "save_every_n_steps": 2, "validation_every_n_steps": 1}}
    alone, _ = make_run(tmp_path / "alone", tiny_models["sd1"][1], SPLIT, layer)
    train(config.load(alone / "config.toml"), alone)
    reference = held_out_events(alone)

    cut, _ = make_run(tmp_path / "cut", tiny_models["sd1"][1], SPLIT, layer)
    stop, real = StopFlag(), trainer.train.log_step

    def log_step(run, epoch, meter):
        real(run, epoch, meter)
        stop.requested = run.progress.step == 3  # mid-epoch, one step after a state
    monkeypatch.setattr(trainer.train, "log_step", log_step)
    assert train(config.load(cut / "config.toml"), cut, stop) is None
    monkeypatch.setattr(trainer.train, "log_step", real)
    assert train(config.load(cut / "config.toml"), cut).is_file()
    resumed = held_out_events(cut)
    assert sorted(resumed) == sorted(reference) == list(range(7))
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step


def test_measuring_leaves_the_training_losses_as_they_were(tiny_models, tmp_path):
    from tests.test_training import losses

    plain, _ = make_run(tmp_path / "plain", tiny_models["sd1"][1])
    train(config.load(plain / "config.toml"), plain)
    folder = draw_dataset(tmp_path / "held", 2)
    scored, _ = make_run(tmp_path / "scored", tiny_models["sd1"][1],
                         {"data": {"validation_dir": str(folder)}, "training": {"validation_every_n_steps": 1}})
    train(config.load(scored / "config.toml"), scored)
    assert sorted(held_out_events(scored)) == list(range(7))
    assert losses(scored) == losses(plain)  # bit for bit: the held-out noise never touches the training stream


def test_eval_mode_puts_every_module_in_eval_and_gives_each_its_own_mode_back():
    from torch import nn

    from trainer.validation import eval_mode

    class Cached(nn.Linear):  # as peft's DoRA layer: train(True) clears a cache built in eval
        def train(self, mode: bool = True):
            if mode:
                self.cache = None
            return super().train(mode)

    shared = nn.Linear(2, 2)  # one module reached through two parents
    frozen = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)).eval()
    cached = Cached(2, 2)
    root = nn.Sequential(nn.Sequential(shared, frozen), nn.Sequential(shared, cached), nn.Dropout(0.5))
    other = nn.Sequential(nn.Dropout(0.2))
    root.train()
    frozen.eval()
    before = {m: m.training for r in (root, other) for m in r.modules()}
    assert not all(before.values()) and any(before.values())
    with eval_mode([root, other]):
        assert not any(m.training for r in (root, other) for m in r.modules())
        cached.cache = "built in eval"
    assert {m: m.training for r in (root, other) for m in r.modules()} == before
    assert cached.cache is None  # its own train(True) ran on the way back

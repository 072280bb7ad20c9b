"""SD 3.5 / FLUX.1 (issue #17): the held-out loss (the flow-matching loss at fixed σ and fixed noise on pictures
never trained on), a FLUX.1 worker cut by SIGTERM resuming to the uninterrupted losses, and `python -m trainer
new` training a FLUX.1 folder and an SD 3.5 single file, all on the tiny models."""

from __future__ import annotations

import math
import subprocess
import sys
from statistics import NormalDist

import pytest
import torch
from safetensors import safe_open

from tests.test_flow_training import FAMILIES, make_flow_run
from tests.test_training import ROOT, cut_after_a_state, draw_dataset, losses, worker
from tests.test_validation import held_out_events, spy  # noqa: F401  (spy: a fixture)
from tests.tiny_models import flow_layouts
from trainer import config, validation
from trainer.events import read_all
from trainer.train import train

SPLIT = {"data": {"validation_split": 0.34}, "training": {"validation_every_n_steps": 1}}  # 2 of 6 held out
TOL = 1e-6


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-validation-models")
    return {arch: flow_layouts(arch, root) for arch in FAMILIES}


def expected_sigmas(arch: str, folder, latent_hw: tuple[int, int]) -> list[float]:
    """σ at the centres of 4 equal parts of the logit-normal(0, 1) u, shifted as the base's scheduler shifts its
    sigmas, from the standard library's normal quantiles and diffusers' own scheduler (not the trainer's code)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    u = torch.tensor([1 / (1 + math.exp(-NormalDist().inv_cdf((2 * i + 1) / 8))) for i in range(4)])
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    c = sched.config
    if arch == "sd3":
        assert c.shift == 3.0 and not c.use_dynamic_shifting
        return (c.shift * u / (1 + (c.shift - 1) * u)).tolist()  # the scheduler's own static shift
    mu = calculate_shift(latent_hw[0] * latent_hw[1] // 4, c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                         c.max_shift)
    return sched.time_shift(mu, 1.0, u).tolist()


def saved_files(run_dir) -> list[dict]:
    return [e for e in read_all(run_dir) if e["type"] == "checkpoint" and e["path"].endswith(".safetensors")]


@pytest.mark.parametrize("arch", FAMILIES)
def test_held_out_loss_is_fixed_never_trained_on_and_in_every_file(flow, tmp_path, spy, arch):  # noqa: F811
    run_dir, _ = make_flow_run(tmp_path, arch, flow[arch]["folder"], SPLIT)
    final = train(config.load(run_dir / "config.toml"), run_dir)
    run = spy["runs"][0]
    held = set(run.held_out.paths)
    assert len(held) == 2 and len(run.items) == 4 and len(spy["paths"]) == 8  # 2 epochs of 4 pictures
    assert not held & set(spy["paths"]) and set(spy["paths"]) == {item.path for item in run.items}

    folder = flow[arch]["folder"]
    for latent, sigmas in zip(run.held_out.latents, run.held_out.timesteps):  # fixed σ, the family's shift
        assert sigmas.tolist() == pytest.approx(expected_sigmas(arch, folder, tuple(latent.shape[-2:])), abs=TOL)
    if arch == "flux":  # FLUX.1 dev's shift grows with the picture: a 1024 px one is scored at more noise
        large = validation.fixed_points(run.loss_fn, torch.zeros(16, 128, 128))
        assert large.tolist() == pytest.approx(expected_sigmas(arch, folder, (128, 128)), abs=TOL)
        assert (large > run.held_out.timesteps[0].cpu()).all()

    scored = held_out_events(run_dir)
    assert sorted(scored) == [0, 1, 2, 3, 4] and all(math.isfinite(v) for v in scored.values())
    assert [e["step"] for e in saved_files(run_dir)] == [2, 4]
    for e in saved_files(run_dir):
        with safe_open(str(run_dir / e["path"]), "pt") as f:
            meta = f.metadata()
        assert float(meta["ss_validation_loss"]) == scored[e["step"]]
        assert meta["ss_validation_step"] == str(e["step"]) and meta["ss_validation_images"] == "2"
    assert final.is_file()
    first, second = run.held_out.measure(run), run.held_out.measure(run)
    assert abs(first - second) <= TOL and abs(first - scored[4]) <= TOL


@pytest.mark.parametrize("arch", FAMILIES)
def test_held_out_loss_falls_with_the_training_loss(flow, tmp_path, arch):
    """Ten epochs at a high rate on the red circles: the training loss falls, and so does the loss on the two
    circles held out (measured: FLUX 1.540 -> 1.227, SD3 4.086 -> 3.621). The base's held-out loss is the same
    number in another run of another rate: it compares across runs."""
    fast = {"training": {"max_train_epochs": 10}, "optimizer": {"learning_rate": 1e-2, "unet_lr": 1e-2}}
    run_dir, _ = make_flow_run(tmp_path / "fast", arch, flow[arch]["folder"], SPLIT, fast)
    train(config.load(run_dir / "config.toml"), run_dir)
    steps, scored = losses(run_dir), held_out_events(run_dir)
    assert sorted(scored) == list(range(21))
    first_epochs = sum(steps[s] for s in range(1, 5)) / 4
    last_epochs = sum(steps[s] for s in range(17, 21)) / 4
    assert last_epochs < 0.95 * first_epochs, steps
    assert scored[20] < 0.92 * scored[0], scored
    assert min(scored.values()) >= scored[20] - 0.01  # it fell, not bounced back

    one_epoch = {"training": {"max_train_epochs": 1}}
    other, _ = make_flow_run(tmp_path / "other", arch, flow[arch]["folder"], SPLIT, one_epoch)
    train(config.load(other / "config.toml"), other)
    assert abs(held_out_events(other)[0] - scored[0]) <= TOL


@pytest.mark.slow
def test_a_flux_worker_cut_by_sigterm_resumes_to_the_same_losses(flow, tmp_path):
    layer = {"training": {"max_train_epochs": 4, "save_every_n_steps": 2}}
    alone, _ = make_flow_run(tmp_path / "alone", "flux", flow["flux"]["folder"], SPLIT, layer)
    assert train(config.load(alone / "config.toml"), alone) is not None
    reference, reference_held = losses(alone), held_out_events(alone)
    assert sorted(reference) == list(range(1, 9))

    run_dir, _ = make_flow_run(tmp_path / "cut", "flux", flow["flux"]["folder"], SPLIT, layer)
    cut_at = cut_after_a_state(run_dir)
    assert 2 <= cut_at < 8, cut_at

    proc = worker(run_dir)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and (run_dir / "output" / "lora.safetensors").is_file(), out
    assert any(e.get("message", "").startswith(f"Resuming from step {cut_at} ") for e in read_all(run_dir))
    resumed, resumed_held = losses(run_dir), held_out_events(run_dir)
    assert set(resumed) == set(reference) and set(resumed_held) == set(reference_held)
    for step in range(cut_at + 1, 9):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
        assert resumed_held[step] == pytest.approx(reference_held[step], rel=1e-5, abs=1e-6), step


def cli_new(base, images, runs, name: str, tokenizer=None) -> subprocess.CompletedProcess:
    """`python -m trainer new ...` on a tiny base with the tiny sizes. A single file has no T5 tokenizer in it and
    the real one is not bundled: `tokenizer` is put where trainer/transformer_files.py looks for it (its
    T5_TOKENIZER_DIR) before the same command line runs, as when a user has put tokenizer.json there."""
    sets = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "num_repeats": 1, "train_batch_size": 2,
            "max_train_steps": 3, "network_dim": 4, "network_alpha": 2, "sample_every_n_epochs": 0,
            "validation_split": 0.34}
    args = ["new", "--base", str(base), "--images", str(images), "--preset", "character", "--runs-dir", str(runs),
            "--name", name] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "trainer", *args]
    if tokenizer is not None:
        cmd = [sys.executable, "-c", "import sys; from pathlib import Path; import trainer.transformer_files as tf; "
               "tf.T5_TOKENIZER_DIR = Path(sys.argv[1]); from trainer.__main__ import main; "
               "sys.exit(main(sys.argv[2:]))", str(tokenizer), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("arch, layout", [("flux", "folder"), ("sd3", "single")])
def test_cli_new_trains_a_flow_base(flow, tmp_path, arch, layout):
    files = flow[arch]
    images = draw_dataset(tmp_path / "pictures")
    r = cli_new(files[layout], images, tmp_path / "runs", "first",
                files["t5_tokenizer"] if layout == "single" else None)
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = tmp_path / "runs" / "first"
    assert r.stdout.splitlines()[0] == str(run_dir)
    cfg = config.load(run_dir / "config.toml")
    assert cfg.family == arch and cfg.data.resolution == 64
    steps = losses(run_dir)
    assert sorted(steps) == [1, 2, 3] and all(math.isfinite(v) for v in steps.values())
    with safe_open(str(run_dir / "output" / "lora.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_base_model_version"] == {"flux": "flux1", "sd3": "5-medium"}[arch] and keys
    assert math.isfinite(float(meta["ss_validation_loss"])) and meta["ss_validation_images"] == "2"

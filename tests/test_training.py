"""Real training runs on the tiny models: the loop, the file it writes, resume after SIGTERM, two processes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from tests import lora_files
from tests.test_networks import base_weights
from trainer import checkpoint, config
from trainer.events import read_all
from trainer.loading import load_base

ROOT = Path(__file__).resolve().parent.parent
TINY = {  # small enough that a step takes well under a second on one CPU thread
    "data": {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "num_repeats": 1,
             "bucket_no_upscale": False, "trigger_word": "zxq"},
    "network": {"network_dim": 4, "network_alpha": 2.0},
    "training": {"train_batch_size": 2, "max_train_epochs": 2, "max_train_steps": 0, "save_every_n_epochs": 1,
                 "save_every_n_steps": 0, "save_precision": "float"},
    "sample": {"sample_every_n_epochs": 0, "sample_every_n_steps": 0, "sample_steps": 3},
}
REQUIRED_METADATA = [
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version", "ss_v2",
    "ss_output_name", "ss_sd_model_name", "ss_resolution", "ss_clip_skip", "ss_num_train_images", "ss_num_epochs",
    "ss_epoch", "ss_steps", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_optimizer",
    "ss_mixed_precision", "ss_seed", "ss_tag_frequency", "ss_dataset_dirs", "ss_bucket_info", "ss_training_started_at",
    "ss_training_finished_at", "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.title",
    "modelspec.resolution", "modelspec.date", "modelspec.prediction_type", "modelspec.trigger_phrase", "ss_session_id",
    "ss_num_batches_per_epoch", "ss_max_train_steps", "ss_lr_warmup_steps", "ss_total_batch_size", "ss_max_grad_norm",
    "ss_shuffle_caption", "ss_keep_tokens", "ss_caption_dropout_rate", "ss_caption_tag_dropout_rate", "ss_flip_aug",
    "ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_cache_latents",
    "ss_gradient_checkpointing", "ss_network_dropout", "sshs_model_hash", "sshs_legacy_hash"]


def draw_dataset(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (64, 64) if i % 2 else (96, 64)
        im = Image.new("RGB", (w, h), (255, 255, 255))
        ImageDraw.Draw(im).ellipse((8 + i, 8, 48 + i, 48), fill=(200, 30 + 20 * i, 30))
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("zxq, red circle, white background")
    return folder


def make_run(tmp_path: Path, base: Path, *layers: dict, preset: str = "character") -> tuple[Path, config.TrainConfig]:
    run_dir = tmp_path / "run"
    dataset = draw_dataset(run_dir / "dataset")
    family = "sdxl" if "sdxl" in Path(base).name else "sd15"
    cfg = config.build(preset, family, TINY, {"model": {"pretrained_model_name_or_path": str(base)},
                                              "data": {"train_data_dir": str(dataset)}}, *layers)
    config.save(cfg, run_dir / "config.toml")
    return run_dir, cfg


def train_run(run_dir: Path) -> Path | None:
    from trainer.train import train

    return train(config.load(run_dir / "config.toml"), run_dir)


def losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_all(run_dir) if e["type"] == "step"}


def check_file(path: Path, model, arch: str, prediction: str) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    assert not missing, missing
    fresh = base_weights(model)
    for name, params in lora_files.modules(path).items():
        assert name in fresh, name
        for param, tensor in params.items():
            assert tensor.dtype == torch.float32
        assert lora_files.delta(params, fresh[name].shape).shape == fresh[name].shape
    versions = {("sd1", "epsilon"): "sd_v1", ("sd2", "v_prediction"): "sd_v2_v", ("sdxl", "epsilon"): "sdxl_base_v1-0"}
    assert meta["ss_base_model_version"] == versions[(arch, prediction)]
    assert meta["ss_v2"] == str(arch == "sd2")
    assert meta["modelspec.prediction_type"] == ("v" if prediction == "v_prediction" else "epsilon")
    assert meta["modelspec.trigger_phrase"] == "zxq"
    assert json.loads(meta["ss_tag_frequency"]) == {"dataset": {"zxq": 6, "red circle": 6, "white background": 6}}
    assert meta["ss_num_train_images"] == "6"
    assert meta["sshs_model_hash"] == lora_files.webui_hash(path)
    return meta


@pytest.mark.parametrize("arch, form", [("sd1", 0), ("sd2", 1), ("sdxl", 1)])
def test_a_run_finishes_and_writes_a_loadable_file(tiny_models, tmp_path, arch, form):
    source = tiny_models[arch][form]
    run_dir, cfg = make_run(tmp_path, source, {"sample": {"sample_every_n_epochs": 1,
                                                          "sample_prompts": ["{trigger}, a red circle"]}})
    final = train_run(run_dir)
    assert final == run_dir / "output" / "lora.safetensors" and final.is_file()
    steps = losses(run_dir)
    assert len(steps) == 6 and all(torch.isfinite(torch.tensor(v)) for v in steps.values())
    assert (run_dir / "output" / "lora-000001.safetensors").is_file()  # epoch 1 of 2; epoch 2 is the final
    model = load_base(source)
    meta = check_file(final, model, arch, model.prediction_type)
    assert meta["ss_steps"] == "6" and meta["ss_epoch"] == "2"
    samples = [e for e in read_all(run_dir) if e["type"] == "sample"]
    assert [e["step"] for e in samples] == [0, 3, 6]
    image = Image.open(run_dir / samples[-1]["path"])
    assert image.size == (64, 64)
    assert "Steps: 3, Sampler: Euler a" in image.text["parameters"]
    assert [e["type"] for e in read_all(run_dir)][-1] == "done"


def test_the_file_says_of_its_run_what_sd_scripts_would(tiny_models, tmp_path):
    """kohya's meanings: images × repeats per sub-folder, the planned epochs, the epoch a file holds (a partial one
    counts), the optimizer with its arguments, the hashes WebUI would compute; readable by other users."""
    run_dir, _ = make_run(tmp_path, tiny_models["sd1"][1], {
        "data": {"num_repeats": 0, "shuffle_caption": True, "keep_tokens": 1, "caption_tag_dropout_rate": 0.25},
        "model": {"clip_skip": 2},
        "training": {"max_train_epochs": 3, "max_train_steps": 9, "gradient_accumulation_steps": 1},
        "optimizer": {"optimizer_args": ["betas=0.9,0.99"], "lr_warmup_steps": 0.25}})
    dataset = run_dir / "dataset"
    for i, sub in enumerate(["2_red", "2_red", "2_red", "3_white", "3_white", "3_white"]):
        (dataset / sub).mkdir(exist_ok=True)
        for suffix in (".png", ".txt"):
            (dataset / f"img{i}{suffix}").rename(dataset / sub / f"img{i}{suffix}")
    (dataset / "3_white" / "img5.txt").write_text("zxq, white background")
    mask = os.umask(0o022)
    try:
        final = train_run(run_dir)
    finally:
        os.umask(mask)
    files = [run_dir / "output" / n for n in ("lora-000001.safetensors", "lora.safetensors")]
    metas = []
    for path in files:
        assert (path.stat().st_mode & 0o777) == 0o644, path  # safetensors' own writer gives 0o600
        with safe_open(str(path), "pt") as f:
            metas.append(f.metadata())
    first, meta = metas[0], metas[-1]
    # 15 slots an epoch (3 × 2 + 3 × 3), batches of 2 from one bucket at a time: 8 steps an epoch, 9 cut epoch 2
    assert meta["ss_num_train_images"] == "15" and meta["ss_num_batches_per_epoch"] == "8"
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_red": {"n_repeats": 2, "img_count": 3},
                                                   "3_white": {"n_repeats": 3, "img_count": 3}}
    assert json.loads(meta["ss_tag_frequency"]) == {
        "2_red": {"zxq": 3, "red circle": 3, "white background": 3},
        "3_white": {"zxq": 3, "red circle": 2, "white background": 3}}
    assert [m["ss_epoch"] for m in metas] == ["1", "2"] and {m["ss_num_epochs"] for m in metas} == {"2"}
    assert meta["ss_steps"] == "9" and meta["ss_max_train_steps"] == "9" and meta["ss_lr_warmup_steps"] == "2"
    assert meta["modelspec.title"] == "lora (epoch 2)" and meta["modelspec.encoder_layer"] == "2"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(fused=True,weight_decay=0.01,betas=(0.9, 0.99))"
    assert meta["ss_total_batch_size"] == "2" and meta["ss_shuffle_caption"] == "True" and meta["ss_keep_tokens"] == "1"
    assert meta["ss_caption_tag_dropout_rate"] == "0.25"
    assert meta["ss_min_bucket_reso"] == "64" and meta["ss_max_bucket_reso"] == "128"
    assert meta["ss_sd_model_name"] == Path(tiny_models["sd1"][1]).name
    assert first["ss_session_id"] == meta["ss_session_id"]
    tensors = load_file(str(final))  # sd-scripts hashes the file as it would be with only its ss_* fields
    only_ss = safetensors_bytes(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(only_ss[0x100000:0x110000]).hexdigest()[:8]
    assert meta["sshs_model_hash"] == lora_files.webui_hash(final) != first["sshs_model_hash"]


@pytest.mark.parametrize("arch, network", [("sd1", "lora"), ("sd2", "locon"), ("sdxl", "locon")])
def test_diffusers_loads_the_file_and_it_changes_the_output(tiny_models, tmp_path, caplog, arch, network):
    run_dir, _ = make_run(tmp_path, tiny_models[arch][1], {"network": {"network_type": network,
                                                                       "conv_dim": 0 if network == "lora" else 2,
                                                                       "conv_alpha": 1.0}})
    final = train_run(run_dir)
    pipe = load_base(tiny_models[arch][0]).pipeline

    def image():
        return pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    before = image()
    caplog.clear()
    pipe.load_lora_weights(str(final))
    complaints = [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    assert not [m for m in complaints if "unexpected" in m.lower() or "not loaded" in m.lower()], complaints
    adapters = pipe.get_list_adapters()
    assert set(adapters) == {"unet", "text_encoder"} | ({"text_encoder_2"} if arch == "sdxl" else set())
    assert abs(image() - before).max() > 1e-4


def test_the_file_holds_exactly_the_trained_update(tiny_models, tmp_path):
    from trainer.networks import create
    from trainer.train import train

    for kind in ("lora", "lokr"):
        run_dir, cfg = make_run(tmp_path / kind, tiny_models["sd1"][1], {"network": {"network_type": kind}})
        final = train(cfg, run_dir)
        model = load_base(tiny_models["sd1"][1])
        components = {"unet": model.unet, "text_encoder": model.text_encoders[0]}
        net = create(cfg.network, "sd1", components)
        from trainer.checkpoint import latest, load_adapter

        load_adapter(latest(run_dir), net)
        fresh = base_weights(load_base(tiny_models["sd1"][1]))
        for name, params in lora_files.modules(final).items():
            want = net.delta(name)
            assert want.abs().max() > 0, name
            assert (lora_files.delta(params, fresh[name].shape) - want).abs().max() <= 1e-5, name


def test_loss_falls_on_a_fixed_batch(tiny_models, tmp_path):
    from diffusers import DDPMScheduler

    from trainer.loss import DenoisingLoss
    from trainer.networks import create

    model = load_base(tiny_models["sd1"][1])
    cfg = config.build("character", "sd15", TINY)
    net = create(cfg.network, "sd1", {"unet": model.unet})
    loss_fn = DenoisingLoss(DDPMScheduler.from_config(model.pipeline.scheduler.config), "epsilon")
    latents, hidden = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 64)

    def fixed_loss():
        with torch.no_grad():
            return loss_fn(model.unet, latents, hidden, generator=torch.Generator().manual_seed(0)).item()

    opt = torch.optim.AdamW(net.parameters_of("unet"), lr=3e-3)
    before = fixed_loss()
    for _ in range(30):
        loss = loss_fn(model.unet, latents, hidden, generator=torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert fixed_loss() < 0.7 * before


def test_the_eta_times_steps_apart_from_what_runs_between_them():
    from trainer.train import Meter

    now = [0.0]
    meter = Meter(clock=lambda: now[0], window=3)
    now[0] = 100.0  # made long before its first batch (a sweep's later trials wait their turn): no pause yet
    for seconds, pause in [(1, 0), (1, 30), (2, 0), (1, 0)]:  # 30 s of sampling after the second step
        meter.start()
        now[0] += seconds / 2
        meter.add(0.1)
        meter.start()  # the step's second batch (gradient accumulation) keeps its clock
        now[0] += seconds / 2
        meter.add(0.3)
        loss, batches, elapsed = meter.take()
        assert (loss, batches, elapsed) == (pytest.approx(0.2), 2, seconds)
        now[0] += pause
    # the median step (1, 1, 2, 1) and the 30 s pause spread over the 4 steps so far
    assert meter.eta_s(10) == pytest.approx(10 * (1 + 30 / 4))
    assert meter.batches_per_s() == pytest.approx(2.0)  # two batches in the median step's second


def test_the_rate_and_the_eta_hold_steady_on_a_steady_run():
    """Steps of 0.5 to 1.5 s (a busy machine), 1 s on average, after a 10 s warm-up: read every 10 steps once the
    meter has two minutes of steps, the rate stays near 1 batch/s and the ETA falls at every read."""
    from trainer.train import Meter

    now, rng, total = [0.0], random.Random(0), 400
    meter, reads = Meter(clock=lambda: now[0]), []
    for step in range(1, total + 1):
        meter.start()
        now[0] += 10.0 if step == 1 else rng.uniform(0.5, 1.5)
        meter.add(0.1)
        meter.take()
        if step >= 130 and step % 10 == 0:
            reads.append((meter.batches_per_s(), meter.eta_s(total - step), total - step))
    assert all(0.9 < rate < 1.1 for rate, _, _ in reads)  # one step's rate alone ranges from 0.67 to 2
    assert all(later < earlier for (_, earlier, _), (_, later, _) in zip(reads, reads[1:]))
    assert all(abs(eta - left) < 0.15 * left for _, eta, left in reads if left >= 30)


def test_nan_loss_stops_the_run_with_a_hint(tiny_models, tmp_path, monkeypatch):
    import trainer.setup
    from trainer.loss import TrainingError

    def broken_base(*args, **kwargs):  # weights that overflowed, as a too-high learning rate leaves them
        model = load_base(*args, **kwargs)
        with torch.no_grad():
            model.unet.conv_out.weight.fill_(float("inf"))
        return model

    monkeypatch.setattr(trainer.setup, "load_base", broken_base)
    run_dir, _ = make_run(tmp_path, tiny_models["sd1"][1], {"model": {"mixed_precision": "fp16"}})
    with pytest.raises(TrainingError, match="learning rate is probably too high"):
        train_run(run_dir)
    assert not (run_dir / "output").exists()


def worker(run_dir: Path, *launcher: str) -> subprocess.Popen:
    cmd = [*launcher, "-m", "trainer", str(run_dir)] if launcher else [sys.executable, "-m", "trainer", str(run_dir)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})


def cut_after_a_state(run_dir: Path) -> int:
    """`python -m trainer RUN_DIR` sent SIGTERM once it has saved a resumable state: it exits 3 with a cancelled
    event; returns the step it stopped at."""
    proc = worker(run_dir)
    deadline = time.time() + 120
    while time.time() < deadline and not any(e["type"] == "checkpoint" and "state" in e["path"]
                                             for e in read_all(run_dir)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, out
    events = read_all(run_dir)
    assert events[-1]["type"] == "cancelled"
    return events[-1]["step"]


@pytest.mark.slow
def test_sigterm_then_resume_continues_exactly(tiny_models, tmp_path):
    layer = {"training": {"max_train_epochs": 4, "save_every_n_steps": 2, "save_every_n_epochs": 1}}
    alone, _ = make_run(tmp_path / "alone", tiny_models["sd1"][1], layer)
    assert train_run(alone) is not None
    reference = losses(alone)

    run_dir, _ = make_run(tmp_path / "cut", tiny_models["sd1"][1], layer)
    cut_at = cut_after_a_state(run_dir)
    assert cut_at < len(reference)
    files_before = {p: p.stat().st_mtime_ns for p in (run_dir / "output").glob("*.safetensors")}

    proc = worker(run_dir)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    resumed = losses(run_dir)
    assert set(resumed) == set(reference)
    for step in range(cut_at + 1, len(reference) + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    for p, mtime in files_before.items():
        assert p.stat().st_mtime_ns == mtime, f"{p.name} was overwritten"

    killed, _ = make_run(tmp_path / "killed", tiny_models["sd1"][1], layer)  # kill -9: no chance to save
    proc, deadline = worker(killed), time.time() + 240
    while time.time() < deadline and max(losses(killed), default=0) < 5:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    kept = checkpoint.latest(killed)
    assert kept is not None and worker(killed).wait(timeout=300) == 0
    resumed = losses(killed)
    for step in range(int(kept.name.split("-")[1]) + 1, len(reference) + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
def test_a_run_killed_after_an_epochs_file_resumes_from_that_epoch(tiny_models, tmp_path):
    """QA: with the default save_every_n_steps = 0 a run killed after its per-epoch files had no resumable state,
    so Resume trained it again from step 0 (and the Monitor showed the old attempt's numbers meanwhile)."""
    from trainer.rundir import RunDir
    from ui.jobs import final_state_from_events

    layer = {"training": {"max_train_epochs": 3, "save_every_n_steps": 0, "save_every_n_epochs": 1}}
    run_dir, _ = make_run(tmp_path, tiny_models["sd1"][1], layer)
    proc, deadline = worker(run_dir), time.time() + 240
    while time.time() < deadline and checkpoint.latest(run_dir) is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    events = read_all(run_dir)
    saved = [e for e in events if e["type"] == "checkpoint"]
    assert saved[0]["path"] == "output/lora-000001.safetensors"  # the epoch's file, then its state
    cut = saved[0]["step"]
    assert saved[1] == saved[1] | {"path": f"state/step-{cut:08d}", "step": cut, "epoch": 1}
    assert final_state_from_events(RunDir(run_dir)) == (
        "interrupted", f"the worker stopped without finishing; resumable from step {cut}")
    proc = worker(run_dir)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert f"Resuming from step {cut} (epoch 2)" in out and "saved output/lora.safetensors (step" in out  # QA F5
    assert "requires torchvision" not in out, out  # a library's warning that says nothing to act on
    events = read_all(run_dir)
    starts = [i for i, e in enumerate(events) if e["type"] == "start"]
    assert [events[i]["step"] for i in starts] == [0, cut]
    again = [e["step"] for e in events[starts[1]:] if e["type"] == "step"]
    assert again[0] == cut + 1 and again[-1] == 3 * cut and events[-1]["type"] == "done"


@pytest.mark.slow
def test_two_processes_train_one_identical_adapter(tiny_models, tmp_path):
    run_dir, _ = make_run(tmp_path, tiny_models["sd1"][1], {"training": {"max_train_epochs": 2}})
    accelerate = str(Path(sys.executable).parent / "accelerate")
    proc = worker(run_dir, accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    messages = [e["message"] for e in read_all(run_dir) if e["type"] == "status"]
    assert any("2 processes hold identical adapters" in m for m in messages), messages
    assert (run_dir / "output" / "lora.safetensors").is_file()
    assert sum(e["type"] == "done" for e in read_all(run_dir)) == 1  # one writer of events


@pytest.mark.slow
def test_a_cancel_from_the_app_stops_a_scripts_two_process_run_and_not_the_script(tiny_models, tmp_path):
    """A script's worker is in the script's process group (torch's launcher gives each process a session of its
    own): the app never signals that group, only the worker's main process; the other one stops at the same step."""
    from ui.jobs import JobManager

    run_dir, _ = make_run(tmp_path, tiny_models["sd1"][1], {"training": {"max_train_epochs": 20}})
    accelerate = str(Path(sys.executable).parent / "accelerate")
    script = (f"'{accelerate}' launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
              f"--dynamo_backend no -m trainer '{run_dir}'; echo \"worker exited $?\" > '{tmp_path}/after'")
    proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # the script leads its group, as a shell job does
    deadline = time.time() + 240
    while time.time() < deadline and max(losses(run_dir), default=0) < 2:
        time.sleep(0.1)
    assert json.loads((run_dir / "status.json").read_text())["pgid"] != proc.pid  # never the script's group
    assert JobManager(tmp_path, devices=[]).cancel(run_dir.name).message == "cancelling: saving state"
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0 and (tmp_path / "after").read_text().startswith("worker exited"), out
    assert json.loads((run_dir / "status.json").read_text())["state"] == "cancelled"
    assert [e["type"] for e in read_all(run_dir)][-1] == "cancelled" and checkpoint.latest(run_dir) is not None
    assert max(losses(run_dir)) < 20 * 3


def test_a_signal_that_comes_while_the_processes_agree_is_not_lost():
    """The handler sets the flag while the reduce of the old value waits for the other process: the reduce's "no"
    must not clear it (seen as a two-process run that trained on to its end after a cancel)."""
    from types import SimpleNamespace

    from trainer.train import StopFlag, stopping

    stop = StopFlag()

    def reduce(tensor, reduction):  # the other process says no; meanwhile SIGTERM arrives here
        stop.requested = True
        return tensor

    run = SimpleNamespace(acc=SimpleNamespace(num_processes=2, device="cpu", reduce=reduce))
    assert stopping(run, stop) is True and stop.requested


@pytest.mark.parametrize("optimizer", ["Prodigy", "Adafactor"])
def test_other_optimizers_train(tiny_models, tmp_path, optimizer):
    run_dir, _ = make_run(tmp_path, tiny_models["sd1"][1], {"optimizer": {"optimizer_type": optimizer},
                                                            "training": {"max_train_epochs": 1}})
    assert train_run(run_dir).is_file()
    assert len(losses(run_dir)) == 3


def test_adamw8bit_without_cuda_is_refused_with_the_reason(tiny_models, tmp_path):
    from trainer.optim import OptimizerUnavailable

    run_dir, _ = make_run(tmp_path, tiny_models["sd1"][1], {"optimizer": {"optimizer_type": "AdamW8bit"}})
    with pytest.raises(OptimizerUnavailable, match="needs bitsandbytes and a CUDA GPU"):
        train_run(run_dir)


def test_cli_new_makes_a_run_and_trains_it(tiny_models, tmp_path):
    images = draw_dataset(tmp_path / "pictures")
    cmd = [sys.executable, "-m", "trainer", "new", "--base", str(tiny_models["sd1"][1]), "--images", str(images),
           "--preset", "style", "--runs-dir", str(tmp_path / "runs"), "--name", "first",
           "--set", "resolution=64", "--set", "min_bucket_reso=64", "--set", "max_bucket_reso=128",
           "--set", "num_repeats=1", "--set", "max_train_epochs=1", "--set", "sample_every_n_epochs=0",
           "--set", "cache_latents_to_disk=true"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = tmp_path / "runs" / "first"
    assert r.stdout.splitlines()[0] == str(run_dir)
    cfg = config.load(run_dir / "config.toml")
    assert cfg.preset == "style" and cfg.network.network_train_unet_only and cfg.data.resolution == 64
    assert sorted(p.name for p in (run_dir / "dataset").iterdir())[:2] == ["img0.png", "img0.txt"]
    assert (run_dir / "output" / "lora.safetensors").is_file()
    assert len(list((run_dir / "cache" / "latents").glob("*.safetensors"))) == 12  # style flips: 6 x 2
    assert "lora_te" not in " ".join(lora_files.modules(run_dir / "output" / "lora.safetensors"))  # unet only
    bad = subprocess.run([sys.executable, "-m", "trainer", "new", "--base", "demo", "--images", str(images),
                          "--preset", "character", "--runs-dir", str(tmp_path / "runs"), "--set", "network_alpha=-1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "network.network_alpha = -1" in bad.stderr


@pytest.mark.parametrize("options", [
    {"model": {"gradient_checkpointing": True, "clip_skip": 2},
     "training": {"gradient_accumulation_steps": 2, "noise_offset": 0.1, "min_snr_gamma": 1.0},
     "sample": {"sample_sampler": "dpm++_2m_karras"}},
    {"data": {"flip_aug": True, "shuffle_caption": True, "keep_tokens": 1, "caption_dropout_rate": 0.5,
              "cache_latents": False},
     "optimizer": {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 2},
     "sample": {"sample_sampler": "ddim"}},
    {"network": {"network_type": "loha", "conv_dim": 2, "conv_alpha": 1.0}, "sample": {"sample_sampler": "euler"}},
], ids=["checkpointing-accumulation-clipskip", "augmentations-uncached", "loha"])
def test_training_options_run(tiny_models, tmp_path, options, capfd):
    layer = options | {"sample": options["sample"] | {"sample_every_n_epochs": 2, "sample_prompts": ["{trigger}"]}}
    run_dir, cfg = make_run(tmp_path, tiny_models["sd1"][1], layer)
    assert train_run(run_dir).is_file()
    assert "| 3/3 [" not in capfd.readouterr().err  # no sampling progress bar (3 steps) in the worker log (QA)
    steps = losses(run_dir)
    accumulation = cfg.training.gradient_accumulation_steps
    assert len(steps) == 2 * (3 // accumulation + (3 % accumulation > 0))  # 3 batches an epoch, 2 epochs
    sample = [e for e in read_all(run_dir) if e["type"] == "sample"][-1]
    label = {"dpm++_2m_karras": "DPM++ 2M Karras", "ddim": "DDIM", "euler": "Euler,"}[cfg.sample.sample_sampler]
    assert label in Image.open(run_dir / sample["path"]).text["parameters"]
    lrs = [e["lr"] for e in read_all(run_dir) if e["type"] == "step"]
    if cfg.optimizer.lr_scheduler == "constant_with_warmup":
        assert lrs[0] < lrs[1] == lrs[-1]


def test_lora_fa_keeps_a_at_its_initial_values(tiny_models, tmp_path):
    from trainer.networks import create

    run_dir, cfg = make_run(tmp_path, tiny_models["sd1"][1], {"network": {"network_type": "lora_fa"}})
    final = train_run(run_dir)
    model = load_base(tiny_models["sd1"][1])
    torch.manual_seed(cfg.training.seed)  # as the trainer does before creating the network
    initial = create(cfg.network, "sd1", {"unet": model.unet, "text_encoder": model.text_encoders[0]})
    stored = lora_files.modules(final)
    for name in initial.names():
        assert torch.equal(stored[name]["lora_down.weight"], initial.factors(name)["lora_down.weight"]), name
    assert any(stored[n]["lora_up.weight"].abs().max() > 0 for n in initial.names())  # B learned


def test_lora_plus_gives_b_ratio_times_the_learning_rate(tiny_models, tmp_path):
    import trainer.setup

    seen = {}
    make = trainer.setup.make_optimizer

    def spy(cfg, groups, device):
        optimizer = make(cfg, groups, device)
        seen["optimizer"] = optimizer
        return optimizer

    trainer.setup.make_optimizer = spy
    try:
        run_dir, cfg = make_run(tmp_path, tiny_models["sd1"][1], {"network": {"loraplus_lr_ratio": 16.0},
                                                                  "training": {"max_train_epochs": 1}})
        train_run(run_dir)
    finally:
        trainer.setup.make_optimizer = make
    groups = seen["optimizer"].param_groups
    assert len(groups) == 4  # (A, B) for the UNet and for the text encoder
    for a, b in (groups[0:2], groups[2:4]):
        assert b["initial_lr"] == pytest.approx(16 * a["initial_lr"]) and a["initial_lr"] > 0
        assert all(p.shape[-1] == 4 or p.shape[1] == 4 for p in b["params"])  # B: [out, r]


def test_lycoris_modules_held_beside_the_model_go_to_the_run_device(tiny_models, tmp_path, monkeypatch):
    """LyCORIS keeps its modules beside the UNet, not as its children, so they do not move with it: the run sends
    them to its device itself (else, on a GPU, they would stay on the CPU and the first forward would fail)."""
    from lycoris.wrapper import LycorisNetwork

    from trainer.setup import setup

    moved, to = [], LycorisNetwork.to
    monkeypatch.setattr(LycorisNetwork, "to", lambda self, *a, **k: moved.append(a[0] if a else k) or to(self, *a, **k))
    run_dir, cfg = make_run(tmp_path, tiny_models["sd1"][0], {"network": {"network_type": "loha"}})
    run = setup(cfg, run_dir)
    assert run.acc.device in moved, moved
    assert {p.device for m in run.net.torch_modules() for p in m.parameters()} == {run.acc.device}


def test_scale_weight_norms_holds_every_module_of_the_file_under_it(tiny_models, tmp_path):
    """kohya's max-norm regularization through a whole run: each step's line says how many modules were scaled
    (the Monitor shows it), the file says the limit, and no module of the file has a ΔW norm above it."""
    from trainer.rundir import RunDir
    from ui.monitor import RunView

    run_dir, _ = make_run(tmp_path, tiny_models["sd1"][1], {"network": {"scale_weight_norms": 2e-4},
                                                            "optimizer": {"unet_lr": 1e-3}})
    path = train_run(run_dir)
    steps = [e for e in read_all(run_dir) if e["type"] == "step"]
    assert all({"keys_scaled", "mean_norm", "max_norm"} <= set(e) for e in steps)
    assert steps[-1]["keys_scaled"] > 0 and steps[-1]["max_norm"] == pytest.approx(2e-4, rel=1e-4)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_scale_weight_norms"] == "0.0002"
    norms = [float((p["lora_up.weight"].flatten(1) @ p["lora_down.weight"].flatten(1)).norm()
                   * p["alpha"] / p["lora_down.weight"].shape[0]) for p in lora_files.modules(path).values()]
    assert max(norms) <= 2e-4 * (1 + 1e-3) and sum(n > 1.9e-4 for n in norms) == steps[-1]["keys_scaled"] > 0
    view = RunView.of(RunDir(run_dir))
    view.read()
    assert f"· {steps[-1]['keys_scaled']} module(s) scaled to the max norm, mean norm" in view.progress_text(True)


def test_a_cancel_while_sampling_leaves_the_pictures_not_yet_drawn(tiny_models, tmp_path):
    """Re-walk N5: a cancel during the sampling waited for every sample picture (93 s each at 512 px on a CPU)."""
    from trainer.setup import setup
    from trainer.train import StopFlag, sample_all

    run_dir, _ = make_run(tmp_path, tiny_models["sd1"][1], {"sample": {"sample_prompts": ["a", "b", "c"]}})
    run = setup(config.load(run_dir / "config.toml"), run_dir)
    sample_all(run)
    assert [e["prompt"] for e in read_all(run_dir) if e["type"] == "sample"] == ["a", "b", "c"]
    run.stop = StopFlag()
    run.stop.requested = True
    sample_all(run)
    events = read_all(run_dir)
    assert len([e for e in events if e["type"] == "sample"]) == 3  # none more
    assert events[-1]["message"] == "Cancelling: the 3 sample picture(s) left are not drawn"

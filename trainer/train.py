"""Train one run: `setup` (trainer/setup.py) turns the config into a `Run`, then one loop in a fixed order.

Order inside the loop, as nanoGPT's: batch -> loss -> backward -> (every accumulation) step -> log -> sample ->
save -> stop. The loop reads no config: everything that depends on an option was decided during setup.
"""

from __future__ import annotations

import hashlib
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from trainer import checkpoint, data, export, optim, prompts, resize, sampling
from trainer.guards import check_finite, writing
from trainer.prompts import SamplePrompt
from trainer.rundir import RunDir
from trainer.setup import Run, encode_image, setup


class StopFlag:
    """Set by the worker's signal handler; the loop saves and returns at the next step boundary."""

    requested = False


@dataclass
class Batch:
    latents: torch.Tensor
    hidden: torch.Tensor
    added_cond: dict | None


def train(cfg, run_dir: Path, stop: StopFlag | None = None) -> Path | None:
    """Train the run in `run_dir` (resuming from its newest state); returns the final file, or None if stopped."""
    run = setup(cfg, Path(run_dir))
    if not loop(run, stop or StopFlag()):
        return None
    return finish(run)


def loop(run: Run, stop: StopFlag) -> bool:
    """Train the steps left; False when stopped (a resumable state is saved first)."""
    p, schedule, acc = run.progress, run.schedule, run.acc
    run.stop = stop
    run.events.status("training", training_line(schedule))
    if p.step == 0:
        baseline(run)
    meter = Meter()
    for epoch in range(p.epoch, schedule.epochs):
        batches = epoch_batches(run, epoch)
        for i in range(p.batch, len(batches)):
            meter.start()
            batch = make_batch(run, batches[i], position_rng(run, epoch, i))
            with acc.autocast():
                loss = run.loss_fn(run.base.denoiser, batch.latents, batch.hidden, batch.added_cond)
            meter.add(loss.item())  # free here (the loss check synced); after backward it would wait for it
            acc.backward((loss + run.net.regularization()) / schedule.accumulation)
            p.batch = i + 1
            if p.batch % schedule.accumulation and p.batch < len(batches):
                continue
            optimizer_step(run)
            log_step(run, epoch, meter)
            if schedule.should_sample(p.step):
                sample_all(run)
            if schedule.should_validate(p.step):
                validate(run, epoch + 1)
            if schedule.should_save_state(p.step):
                save_state(run, epoch)
            if stopping(run, stop) or schedule.finished(p.step):
                break
        if p.batch >= len(batches):
            end_epoch(run, epoch)
        if stopping(run, stop):
            cancel(run, epoch)
            return False
        if schedule.finished(p.step):
            break
    return True


def stopping(run: Run, stop: StopFlag) -> bool:
    """Whether any process was asked to stop, agreed by all so they stop at the same step: a signal reaches one
    process first, or it alone (torch's launcher puts each process in a session of its own, and a cancel signals
    the main process)."""
    if run.acc.num_processes > 1:
        asked = torch.tensor([float(stop.requested)], device=run.acc.device)
        agreed = bool(run.acc.reduce(asked, reduction="sum").item())
        stop.requested = stop.requested or agreed  # a signal that came during the reduce is kept for the next step
    return stop.requested


def baseline(run: Run) -> None:
    """The base model's pictures and held-out loss, to compare against."""
    if run.schedule.sample_at_start():
        sample_all(run)
    validate(run, run.progress.epoch)


def epoch_batches(run: Run, epoch: int) -> list:
    """This process's share of the epoch's batches (lists of item indices), the same on every rerun."""
    t = run.cfg.training
    return data.shard(data.epoch_batches(run.items, t.train_batch_size, t.seed, epoch),
                      run.acc.process_index, run.acc.num_processes)


def position_rng(run: Run, epoch: int, i: int) -> random.Random:
    """Dropout, flips and noise depend on the position of the batch alone, so a resumed run draws the same."""
    rng = random.Random(f"{run.cfg.training.seed}/{epoch}/{i}/{run.acc.process_index}")
    torch.manual_seed(rng.getrandbits(63))
    return rng


def training_line(s) -> str:
    epochs = f"{s.epochs} epoch{'' if s.epochs == 1 else 's'}"
    return f"Training {s.total_steps} steps ({epochs} of {s.steps_per_epoch})"


def make_batch(run: Run, indices: list[int], rng: random.Random) -> Batch:
    d, items, device = run.cfg.data, run.items, run.acc.device
    flips = [d.flip_aug and rng.random() < 0.5 for _ in indices]
    if run.latents_of is not None:
        latents = torch.stack([run.latents_of[(i, f)] for i, f in zip(indices, flips)])
    else:
        latents = torch.stack([encode_image(items[i], f, run.base.vae, device, None) for i, f in zip(indices, flips)])
    captions = [data.process_caption(items[i].caption, d.shuffle_caption, d.keep_tokens, d.caption_dropout_rate, rng,
                                     d.caption_tag_dropout_rate) for i in indices]
    hidden, pooled = run.encode(captions)
    added = None
    if run.time_ids is not None:
        time_ids = torch.stack([run.time_ids[i] for i in indices]).to(device, hidden.dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids}
    elif pooled is not None:  # SD 3.5 / FLUX.1: the pooled text projections
        added = {"pooled": pooled}
    return Batch(latents, hidden, added)


def optimizer_step(run: Run) -> None:
    average_gradients(run.params, run.acc)
    run.clip(run.params)
    run.optimizer.step()
    run.lr_schedule.step()
    run.progress.step += 1
    run.net.after_step(run.progress.step)  # before the gradients are cleared: AdaLoRA reads them
    run.norms = run.net.max_norm()  # scale_weight_norms: {} when off
    run.optimizer.zero_grad(set_to_none=True)


class Meter:
    """The losses of one optimizer step's batches and the step's time, from its first batch to its end. The rate and
    the ETA are the median of the same recent steps (the last `window`, or the last `horizon_s` seconds' when those
    are more), so neither swings with a single step on a busy machine nor with the first step's warm-up; the ETA
    adds, spread over the steps, what ran between them so far (sampling, saving, the held-out loss): the step right
    after a pause is timed without it."""

    MOST = 1000  # steps kept at most, however short they are

    def __init__(self, clock: Callable[[], float] = time.perf_counter, window: int = 20,
                 horizon_s: float = 120.0) -> None:
        self.losses: list[float] = []
        self.clock, self.started = clock, None
        self.window, self.horizon_s = window, horizon_s
        self.recent: deque[tuple[float, int]] = deque(maxlen=self.MOST)  # (seconds, batches) of the last steps
        self.began, self.trained, self.steps = None, 0.0, 0  # from the first batch on

    def start(self) -> None:
        """Called before every batch: the first batch of a step starts its clock."""
        if self.started is None:
            self.started = self.clock()
            self.began = self.started if self.began is None else self.began

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def take(self) -> tuple[float, int, float]:
        """(mean loss, batches, seconds) of the step that just ended."""
        loss, batches = sum(self.losses) / len(self.losses), len(self.losses)
        elapsed = self.clock() - self.started
        self.losses, self.started = [], None
        self.remember(elapsed, batches)
        self.trained, self.steps = self.trained + elapsed, self.steps + 1
        return loss, batches, elapsed

    def remember(self, seconds: float, batches: int) -> None:
        """Keep the step; forget the oldest while the others are still `window` steps and `horizon_s` seconds."""
        self.recent.append((seconds, batches))
        total = sum(s for s, _ in self.recent)
        while len(self.recent) > self.window and total - self.recent[0][0] >= self.horizon_s:
            total -= self.recent.popleft()[0]

    def batches_per_s(self) -> float:
        return statistics.median(b / max(s, 1e-9) for s, b in self.recent)

    def eta_s(self, steps_left: int) -> float:
        """The median step and the pauses so far per step, times the steps left."""
        paused = (self.clock() - self.began - self.trained) / self.steps
        return (statistics.median(s for s, _ in self.recent) + paused) * steps_left


def log_step(run: Run, epoch: int, meter: Meter) -> None:
    loss = meter.take()[0]
    step, total = run.progress.step, run.schedule.total_steps
    run.events.emit("step", step=step, total_steps=total, epoch=epoch + 1, loss=loss,
                    lr=run.lr_schedule.get_last_lr()[0], samples_per_s=meter.batches_per_s() * run.samples_per_batch,
                    eta_s=meter.eta_s(total - step), **run.norms)


def end_epoch(run: Run, epoch: int) -> None:
    p = run.progress
    p.epoch, p.batch = epoch + 1, 0
    saving = run.schedule.should_save_file(p.epoch)
    if run.acc.is_main_process and saving:
        save_file(run, f"{run.cfg.training.output_name}-{p.epoch:06d}.safetensors", p.epoch)
    if run.schedule.should_sample_epoch(p.epoch):
        sample_all(run)
    if saving and not state_saved(run):  # a crash after it resumes from this epoch's file, not from the start
        save_state(run, p.epoch)


def cancel(run: Run, epoch: int) -> None:
    run.events.status("cancelling", f"Cancelled at step {run.progress.step}: saving a resumable state")
    save_state(run, epoch)
    run.events.emit("cancelled", step=run.progress.step)


def finish(run: Run) -> Path:
    """Save the final LoRA (and a state for it, unless the last step saved one); returns the file."""
    p, acc = run.progress, run.acc
    run.events.status("saving", "Saving the final LoRA")
    check_replicas(run)
    final = run.run_dir / "output" / f"{run.cfg.training.output_name}.safetensors"  # by the main process alone
    if acc.is_main_process:  # a run cut short by max_train_steps has trained part of its last epoch
        save_file(run, final.name, p.epoch + (p.batch > 0))
    if not state_saved(run):
        save_state(run, p.epoch)
    if acc.is_main_process:
        run.events.emit("done", path=str(final.relative_to(run.run_dir)), step=p.step)
    return final


def state_saved(run: Run) -> bool:
    """Whether the newest resumable state is of this very step."""
    latest = checkpoint.latest(run.run_dir)
    return latest is not None and latest == RunDir(run.run_dir).state_folder(run.progress.step)


def save_state(run: Run, epoch: int) -> None:
    check_finite(run.net, run.progress.step, run.cfg, run.run_dir)
    folder = RunDir(run.run_dir).state_folder(run.progress.step)
    partial = None if (folder / checkpoint.PROGRESS).is_file() else folder  # never remove a complete state
    with writing(f"the resumable state {folder.name}", run.run_dir, partial=partial):
        checkpoint.save(run.run_dir, run.acc, run.net, run.progress, run.optimizer, run.lr_schedule)
    run.events.emit("checkpoint", step=run.progress.step, epoch=epoch, path=str(folder.relative_to(run.run_dir)))


def save_file(run: Run, name: str, epoch: int) -> Path:
    """Write output/`name`: the adapter in kohya's format with its metadata (pruned first if the config says so)."""
    cfg, net, items = run.cfg, run.net, run.items
    n, t = cfg.network, cfg.training
    check_finite(net, run.progress.step, cfg, run.run_dir)
    held_out = validate(run, epoch)
    folders = data.by_folder(items)
    meta = export.metadata(cfg, arch=run.base.arch, prediction_type=run.base.prediction_type, net=net,
                           base_name=export.model_name(cfg.model.pretrained_model_name_or_path),
                           dataset_dirs={name: {"n_repeats": group[0].repeats, "img_count": len(group)}
                                         for name, group in folders.items()},
                           epoch=epoch, step=run.progress.step, schedule=run.schedule,
                           processes=run.acc.num_processes, optimizer=optim.description(run.optimizer, cfg.optimizer,
                                                                                        run.acc.device),
                           session_id=session_id(run.run_dir),
                           tag_frequency={name: data.tag_frequency(group) for name, group in folders.items()},
                           bucket_info=bucket_info(items), started_at=run.started, resolution=cfg.data.resolution,
                           mixed_precision=run.acc.mixed_precision,
                           held_out=None if held_out is None else (held_out, run.progress.step, len(run.held_out.paths)))
    if n.prune_rank or n.prune_energy or n.prune_drop:  # LoRA-drop / resize: SVD in full precision, then the save one
        tensors, meta, _ = resize.prune(export.to_kohya(net, torch.float32), meta, n.prune_rank or None,
                                        n.prune_energy or None, n.prune_drop, t.save_precision)
    else:
        tensors = export.to_kohya(net, export.DTYPES[t.save_precision])
    path = run.run_dir / "output" / name
    with writing(f"output/{name}", run.run_dir, partial=path.with_name(f".{name}.tmp")):
        export.save_atomic(tensors, meta, path)
    run.events.emit("checkpoint", step=run.progress.step, epoch=epoch, path=str(path.relative_to(run.run_dir)))
    return path


def validate(run: Run, epoch: int) -> float | None:
    """The held-out loss at this step, measured once a step by the main process and logged; None without one."""
    held, step = run.held_out, run.progress.step
    if held is None or not run.acc.is_main_process:
        return None
    if held.step != step:
        held.step, held.value = step, held.measure(run)
        run.events.emit("validation", step=step, epoch=epoch, loss=held.value, images=len(held.paths))
    return held.value


def sample_all(run: Run) -> None:
    """One picture per prompt from the main process; the others wait for it."""
    if run.acc.is_main_process and run.prompts:
        run.events.status("sampling", f"Sampling {len(run.prompts)} prompt(s) at step {run.progress.step}")
        for k, prompt in enumerate(run.prompts):
            if getattr(run.stop, "requested", False):  # a cancel waits for one picture at most, not for all
                run.events.status("cancelling", f"Cancelling: the {len(run.prompts) - k} sample picture(s) left "
                                                "are not drawn")
                break
            sample(run, prompt, k)
    run.acc.wait_for_everyone()


def sample(run: Run, prompt: SamplePrompt, index: int) -> None:
    cfg, step = run.cfg, run.progress.step
    options = prompts.settings(prompt, cfg.sample, cfg.data.resolution)
    with run.acc.autocast():
        image = sampling.generate(run.base, prompt.text, negative=prompt.negative, clip_skip=cfg.model.clip_skip,
                                  encode=run.encode, **options)
    path = run.run_dir / "samples" / f"step-{step:06d}-p{index}.png"
    model = Path(cfg.model.pretrained_model_name_or_path).name
    sampling.save_png(image, path, sampling.parameters_text(prompt.text, model=model, arch=run.base.arch,
                                                            negative=prompt.negative, **options))
    run.events.emit("sample", step=step, prompt=prompt.text, seed=options["seed"],
                    path=str(path.relative_to(run.run_dir)), index=index)


def check_replicas(run: Run) -> None:
    """Data parallel must leave every process with the same adapter; say so, or stop before saving."""
    net, acc = run.net, run.acc
    if acc.num_processes == 1:
        return
    mine = torch.stack([sum(p.double().sum() for p in net.parameters_of(c)) for c in net.components])
    every = acc.gather(mine.to(acc.device)[None]).reshape(acc.num_processes, -1)
    if not torch.allclose(every, every[0].expand_as(every), rtol=0, atol=0):
        raise RuntimeError(f"the {acc.num_processes} processes ended with different adapters: {every.tolist()}")
    run.events.status("saving", f"{acc.num_processes} processes hold identical adapters "
                                f"(checksum {every[0].sum().item():.10g})")


def average_gradients(params, acc) -> None:
    """Data parallel by hand: one all-reduce of all adapter gradients (works for every adapter library)."""
    if acc.num_processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= acc.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def session_id(run_dir: Path) -> int:
    """kohya's `ss_session_id`, a number the files of one run share: here from the run's folder, so a resumed run
    keeps it."""
    return int(hashlib.sha256(run_dir.resolve().name.encode()).hexdigest()[:8], 16)


def bucket_info(items) -> dict:
    buckets: dict[str, dict] = {}
    for item in items:
        b = buckets.setdefault(f"{item.bucket[0]}x{item.bucket[1]}", {"resolution": list(item.bucket), "count": 0})
        b["count"] += item.repeats
    return {"buckets": buckets, "repeats": items[0].repeats if items else 1}

"""Train one run: setup turns the config into objects, then one loop in a fixed order.

Order inside the loop, as nanoGPT's: batch -> loss -> backward -> (every accumulation) step -> log -> sample ->
save -> stop. Everything that depends on an option is decided during setup.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from trainer import checkpoint, data, export, resize, sampling, text
from trainer.checkpoint import Progress
from trainer.events import EventWriter
from trainer.loading import load_base
from trainer.loss import DenoisingLoss
from trainer.networks import create as create_network
from trainer.optim import make_optimizer, make_scheduler
from trainer.quantize import quantize_unet_nf4


class StopFlag:
    """Set by the worker's signal handler; the loop saves and returns at the next step boundary."""

    requested = False


def resolve_mixed_precision(value: str) -> str:
    if value != "auto":
        return value if torch.cuda.is_available() or value == "no" else "no"
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@dataclass
class Batch:
    latents: torch.Tensor
    hidden: torch.Tensor
    added_cond: dict | None


def train(cfg, run_dir: Path, stop: StopFlag | None = None) -> Path | None:
    """Train the run in `run_dir` (resuming from its newest state); returns the final file, or None if stopped."""
    run_dir, stop = Path(run_dir), stop or StopFlag()
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    acc = Accelerator(mixed_precision=resolve_mixed_precision(cfg.model.mixed_precision),
                      cpu=not torch.cuda.is_available())
    events = EventWriter(run_dir, enabled=acc.is_main_process)
    n, o, t, d, s = cfg.network, cfg.optimizer, cfg.training, cfg.data, cfg.sample

    # --- model and adapter ---
    events.status("loading", f"Loading {cfg.model.pretrained_model_name_or_path}")
    base = load_base(cfg.model.pretrained_model_name_or_path, cfg.model.prediction_type)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
    base.unet.to(acc.device, dtype=weight_dtype)
    base.vae.to(acc.device, dtype=torch.float32)  # the VAE overflows in fp16; it only runs for caching and samples
    train_te = not n.network_train_unet_only and o.text_encoder_lr > 0
    for te in base.text_encoders:
        te.to(acc.device, dtype=weight_dtype)
    te_names = ["text_encoder", "text_encoder_2"][: len(base.text_encoders)]
    components = {} if n.network_train_text_encoder_only else {"unet": base.unet}
    if train_te:
        components |= dict(zip(te_names, base.text_encoders))
    if cfg.model.unet_quantization == "nf4":
        count = quantize_unet_nf4(base.unet, weight_dtype, acc.device)
        events.status("loading", f"UNet held in 4-bit NF4 ({count} linear layers)")
    if cfg.model.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for te in base.text_encoders if train_te else []:
            te.gradient_checkpointing_enable()
    if cfg.model.attention == "xformers" and acc.device.type == "cuda":
        base.unet.enable_xformers_memory_efficient_attention()

    # --- data ---
    found = data.scan(Path(d.train_data_dir), d.caption_extension)
    from trainer.config import resolve_repeats

    items, skipped = data.build_items(found, d.resolution, d.min_bucket_reso, d.max_bucket_reso,
                                      d.bucket_no_upscale, resolve_repeats(cfg, len(found)), d.enable_bucket)
    for message in skipped:
        events.status("loading", f"Skipped an unreadable image: {message}")
    latents_of = cache_latents(items, base.vae, acc, d, run_dir, events) if d.cache_latents else None
    encode = caption_encoder(base, cfg, items, acc, train_te, events)

    # --- steps, optimizer, schedule ---
    batches_per_epoch = len(data.shard(data.epoch_batches(items, t.train_batch_size, t.seed, 0),
                                       acc.process_index, acc.num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / t.gradient_accumulation_steps)
    total_steps = t.max_train_epochs * steps_per_epoch if t.max_train_epochs else t.max_train_steps
    if t.max_train_steps:
        total_steps = min(total_steps, t.max_train_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    torch.manual_seed(t.seed)  # the same initial adapter on every process, and in every rerun
    net = create_network(n, base.arch, components, total_steps)
    for c in components:
        for p in net.parameters_of(c):
            p.data = p.data.float()  # adapters train in fp32 under autocast
    events.status("loading", f"{base.describe()}; {net.kind} on {net.counts()} modules")
    lrs = {"unet": o.unet_lr or o.learning_rate, "text_encoder": o.text_encoder_lr, "text_encoder_2": o.text_encoder_lr}
    groups = [g for c in components for g in net.param_groups(c, lrs[c]) if g["params"]]
    params = [p for g in groups for p in g["params"]]
    optimizer = acc.prepare(make_optimizer(o, groups, acc.device))
    lr_schedule = make_scheduler(o, optimizer, total_steps)
    acc.register_for_checkpointing(lr_schedule)
    loss_fn = DenoisingLoss(DDPMScheduler.from_config(base.pipeline.scheduler.config), base.prediction_type,
                            t.min_snr_gamma, t.noise_offset, acc.mixed_precision)

    progress = Progress()
    if (state := checkpoint.latest(run_dir)) is not None:
        checkpoint.load(state, acc, net, progress)
        events.status("loading", f"Resuming from step {progress.step} (epoch {progress.epoch + 1})")

    prunes = bool(n.prune_rank or n.prune_energy or n.prune_drop)

    def save_file(name: str, epoch: int) -> Path:
        meta = export.metadata(cfg, arch=base.arch, prediction_type=base.prediction_type, net=net,
                               base_name=Path(cfg.model.pretrained_model_name_or_path).name, num_images=len(items),
                               epoch=epoch, step=progress.step, tag_frequency=data.tag_frequency(items),
                               bucket_info=bucket_info(items), started_at=started, resolution=d.resolution,
                               mixed_precision=acc.mixed_precision)
        if prunes:  # LoRA-drop / resize: SVD in full precision, then the save precision
            tensors, meta, _ = resize.prune(export.to_kohya(net, torch.float32), meta, n.prune_rank or None,
                                            n.prune_energy or None, n.prune_drop, t.save_precision)
        else:
            tensors = export.to_kohya(net, export.DTYPES[t.save_precision])
        path = export.save_atomic(tensors, meta, run_dir / "output" / name)
        events.emit("checkpoint", step=progress.step, epoch=epoch, path=str(path.relative_to(run_dir)))
        return path

    def sample_all() -> None:
        if acc.is_main_process and s.sample_prompts:
            events.status("sampling", f"Sampling {len(s.sample_prompts)} prompt(s) at step {progress.step}")
            for k, prompt in enumerate(s.sample_prompts):
                sample(base, cfg, prompt.replace("{trigger}", d.trigger_word), k, progress.step, run_dir, acc, events)
        acc.wait_for_everyone()

    # --- the loop ---
    events.status("training", f"Training {total_steps} steps ({epochs} epochs of {steps_per_epoch})")
    if progress.step == 0 and (s.sample_every_n_steps or s.sample_every_n_epochs):
        sample_all()  # the base model's pictures, to compare against
    tick, losses = time.time(), []
    for epoch in range(progress.epoch, epochs):
        batches = data.shard(data.epoch_batches(items, t.train_batch_size, t.seed, epoch),
                             acc.process_index, acc.num_processes)
        for i in range(progress.batch, len(batches)):
            rng = random.Random(f"{t.seed}/{epoch}/{i}/{acc.process_index}")
            torch.manual_seed(rng.getrandbits(63))  # dropout and noise depend on the position alone: resumable
            batch = make_batch(batches[i], items, latents_of, encode, base, d, rng, acc.device)
            with acc.autocast():
                loss = loss_fn(base.unet, batch.latents, batch.hidden, batch.added_cond)
            acc.backward((loss + net.regularization()) / t.gradient_accumulation_steps)
            losses.append(loss.item())
            progress.batch = i + 1
            if progress.batch % t.gradient_accumulation_steps and progress.batch < len(batches):
                continue
            average_gradients(params, acc)
            if o.max_grad_norm:
                acc.clip_grad_norm_(params, o.max_grad_norm)
            optimizer.step()
            lr_schedule.step()
            progress.step += 1
            net.after_step(progress.step)
            optimizer.zero_grad(set_to_none=True)

            elapsed, tick = time.time() - tick, time.time()
            events.emit("step", step=progress.step, total_steps=total_steps, epoch=epoch + 1,
                        loss=sum(losses) / len(losses), lr=lr_schedule.get_last_lr()[0],
                        samples_per_s=len(losses) * t.train_batch_size * acc.num_processes / max(elapsed, 1e-9),
                        eta_s=elapsed * (total_steps - progress.step))
            losses = []
            if s.sample_every_n_steps and progress.step % s.sample_every_n_steps == 0:
                sample_all()
            if t.save_every_n_steps and progress.step % t.save_every_n_steps == 0:
                report_state(checkpoint.save(run_dir, acc, net, progress), progress, epoch, run_dir, events)
            if stop.requested or progress.step >= total_steps:
                break
        if progress.batch >= len(batches):
            progress.epoch, progress.batch = epoch + 1, 0
            if acc.is_main_process and t.save_every_n_epochs and progress.epoch % t.save_every_n_epochs == 0 \
                    and progress.epoch < epochs:
                save_file(f"{t.output_name}-{progress.epoch:06d}.safetensors", progress.epoch)
            if s.sample_every_n_epochs and progress.epoch % s.sample_every_n_epochs == 0:
                sample_all()
        if stop.requested:
            events.status("cancelling", f"Cancelled at step {progress.step}: saving a resumable state")
            report_state(checkpoint.save(run_dir, acc, net, progress), progress, epoch, run_dir, events)
            events.emit("cancelled", step=progress.step)
            return None
        if progress.step >= total_steps:
            break

    events.status("saving", "Saving the final LoRA")
    check_replicas(net, acc, events)
    final = run_dir / "output" / f"{t.output_name}.safetensors"  # written by the main process alone
    if acc.is_main_process:
        save_file(final.name, progress.epoch)
    if (latest := checkpoint.latest(run_dir)) is None or latest.name != f"step-{progress.step:08d}":
        report_state(checkpoint.save(run_dir, acc, net, progress), progress, progress.epoch, run_dir, events)
    if acc.is_main_process:
        events.emit("done", path=str(final.relative_to(run_dir)), step=progress.step)
    return final


def check_replicas(net, acc, events) -> None:
    """Data parallel must leave every process with the same adapter; say so, or stop before saving."""
    if acc.num_processes == 1:
        return
    mine = torch.stack([sum(p.double().sum() for p in net.parameters_of(c)) for c in net.components])
    every = acc.gather(mine.to(acc.device)[None]).reshape(acc.num_processes, -1)
    if not torch.allclose(every, every[0].expand_as(every), rtol=0, atol=0):
        raise RuntimeError(f"the {acc.num_processes} processes ended with different adapters: {every.tolist()}")
    events.status("saving", f"{acc.num_processes} processes hold identical adapters "
                            f"(checksum {every[0].sum().item():.10g})")


def report_state(folder: Path, progress: Progress, epoch: int, run_dir: Path, events: EventWriter) -> None:
    events.emit("checkpoint", step=progress.step, epoch=epoch, path=str(folder.relative_to(run_dir)))


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


def cache_latents(items, vae, acc, d, run_dir: Path, events) -> dict:
    """(item index, flipped) -> latent, encoded once; on disk too with cache_latents_to_disk."""
    events.status("caching", f"Encoding {len(items)} images to latents")
    disk = run_dir / "cache" / "latents" if d.cache_latents_to_disk else None
    cache = {}
    for i, item in enumerate(items):
        for flip in (False, True) if d.flip_aug else (False,):
            cache[(i, flip)] = encode_image(item, flip, vae, acc.device, disk)
    return cache


def encode_image(item, flip: bool, vae, device, disk: Path | None) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    key = f"{item.path.stem}-{item.bucket[0]}x{item.bucket[1]}-{int(item.path.stat().st_mtime)}{'-flip' if flip else ''}"
    if disk is not None and (disk / f"{key}.safetensors").is_file():
        return load_file(str(disk / f"{key}.safetensors"))["latent"].to(device)
    pixels, _ = data.load_pixels(item, flip)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        dist = vae.encode(pixels[None].to(device, vae.dtype)).latent_dist
        latent = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(device))[0]
        latent = latent * vae.config.scaling_factor
    if disk is not None:
        disk.mkdir(parents=True, exist_ok=True)
        save_file({"latent": latent.cpu().contiguous()}, str(disk / f"{key}.safetensors"))
    return latent


def caption_encoder(base, cfg, items, acc, train_te: bool, events):
    """captions -> (hidden, pooled). With a frozen text encoder and fixed captions, every caption is encoded once."""
    d = cfg.data
    def run(captions):
        return text.encode(base.arch, base.tokenizers, base.text_encoders, captions, cfg.model.clip_skip, acc.device)

    fixed = not d.shuffle_caption and d.caption_dropout_rate == 0
    if train_te or not d.cache_text_encoder_outputs or not fixed:
        return run
    events.status("caching", "Encoding captions once (the text encoder is frozen)")
    with torch.no_grad(), acc.autocast():
        cached = {c: run([c]) for c in {item.caption for item in items}}

    def lookup(captions):
        hidden = torch.cat([cached[c][0] for c in captions])
        pooled = torch.cat([cached[c][1] for c in captions]) if base.arch == "sdxl" else None
        return hidden, pooled

    return lookup


def make_batch(indices, items, latents_of, encode, base, d, rng: random.Random, device) -> Batch:
    flips = [d.flip_aug and rng.random() < 0.5 for _ in indices]
    if latents_of is not None:
        latents = torch.stack([latents_of[(i, f)] for i, f in zip(indices, flips)])
    else:
        latents = torch.stack([encode_image(items[i], f, base.vae, device, None) for i, f in zip(indices, flips)])
    captions = [data.process_caption(items[i].caption, d.shuffle_caption, d.keep_tokens, d.caption_dropout_rate, rng)
                for i in indices]
    hidden, pooled = encode(captions)
    added = None
    if base.arch == "sdxl":
        time_ids = []
        for i in indices:
            item = items[i]
            bw, bh = item.bucket
            _, (top, left) = data.cover_crop_box(item.size[0], item.size[1], bw, bh)
            time_ids.append(text.sdxl_time_ids((item.size[1], item.size[0]), (top, left), (bh, bw)))
        added = {"text_embeds": pooled, "time_ids": torch.stack(time_ids).to(device, hidden.dtype)}
    return Batch(latents, hidden, added)


def sample(base, cfg, prompt: str, index: int, step: int, run_dir: Path, acc, events) -> None:
    s = cfg.sample
    width, height = s.sample_width or cfg.data.resolution, s.sample_height or cfg.data.resolution
    options = dict(sampler=s.sample_sampler, steps=s.sample_steps, cfg_scale=s.sample_cfg_scale, seed=s.sample_seed,
                   width=width, height=height)
    with acc.autocast():
        image = sampling.generate(base, prompt, clip_skip=cfg.model.clip_skip, **options)
    path = run_dir / "samples" / f"step-{step:06d}-p{index}.png"
    model = Path(cfg.model.pretrained_model_name_or_path).name
    sampling.save_png(image, path, sampling.parameters_text(prompt, model=model, **options))
    events.emit("sample", step=step, prompt=prompt, seed=s.sample_seed, path=str(path.relative_to(run_dir)),
                index=index)


def bucket_info(items) -> dict:
    buckets: dict[str, dict] = {}
    for item in items:
        b = buckets.setdefault(f"{item.bucket[0]}x{item.bucket[1]}", {"resolution": list(item.bucket), "count": 0})
        b["count"] += item.repeats
    return {"buckets": buckets, "repeats": items[0].repeats if items else 1}

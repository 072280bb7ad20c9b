"""Setup: the config becomes objects once (model, adapter, data, optimizer, loss, schedule), held in one `Run`.

Every option is decided here, so that the loop in trainer/train.py reads no config: it calls `run.loss_fn`,
`run.clip`, `run.schedule.should_sample(step)` and the like.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from trainer import checkpoint, data, text, validation
from trainer.checkpoint import Progress
from trainer.config import ConfigError, count_steps, zero_terminal_snr_error
from trainer.events import EventWriter
from trainer.flow_parts import parts_of
from trainer.loading import FLOW_ARCHES, BaseModel, load_base
from trainer.loss import DenoisingLoss, FlowMatchingLoss
from trainer.networks import create as create_network
from trainer.optim import make_optimizer, make_scheduler
from trainer.prompts import SamplePrompt
from trainer.prompts import parse as parse_prompt
from trainer.quantize import quantize_unet_nf4, store_fp8

FLOW_CLIPS = {"flux": ("text_encoder",), "sd3": ("text_encoder", "text_encoder_2")}  # the CLIPs; T5 comes after

if TYPE_CHECKING:
    from trainer.config import TrainConfig
    from trainer.networks.base import Network


@dataclass(frozen=True)
class Schedule:
    """How long the run is and when it samples and saves; each interval 0 = never."""

    total_steps: int
    epochs: int
    steps_per_epoch: int
    batches_per_epoch: int  # of one process
    accumulation: int  # batches per optimizer step
    sample_steps: int
    sample_epochs: int
    state_steps: int  # resumable state in state/
    file_epochs: int  # a LoRA file in output/
    validate_steps: int = 0  # the held-out loss (also at every saved file, when there are held-out pictures)

    def sample_at_start(self) -> bool:
        return bool(self.sample_steps or self.sample_epochs)

    def should_sample(self, step: int) -> bool:
        return every(self.sample_steps, step)

    def should_sample_epoch(self, epoch: int) -> bool:
        return every(self.sample_epochs, epoch)

    def should_save_state(self, step: int) -> bool:
        return every(self.state_steps, step)

    def should_save_file(self, epoch: int) -> bool:
        return every(self.file_epochs, epoch) and epoch < self.epochs  # the last epoch's file is the final one

    def should_validate(self, step: int) -> bool:
        return every(self.validate_steps, step)

    def finished(self, step: int) -> bool:
        return step >= self.total_steps


def every(interval: int, count: int) -> bool:
    return bool(interval) and count % interval == 0


@dataclass
class Run:
    """Everything the loop needs. The loop never reads `cfg`; the helpers that make batches, files and samples do."""

    cfg: TrainConfig
    run_dir: Path
    started: float
    acc: Accelerator
    events: EventWriter
    base: BaseModel
    items: list[data.Item]  # one per image
    latents_of: dict | None  # (item index, flipped) -> latent; None when latents are encoded every step
    encode: Callable  # captions -> (hidden, pooled); pooled None for SD1/SD2
    time_ids: list | None  # SDXL's size conditioning per item; None for SD1/SD2
    net: Network
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer  # accelerate's wrapper
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    clip: Callable[[list[torch.Tensor]], None]  # gradient clipping, or nothing
    loss_fn: DenoisingLoss | FlowMatchingLoss
    schedule: Schedule
    progress: Progress
    prompts: list[SamplePrompt]  # the trigger word filled in
    samples_per_batch: int  # over all processes
    held_out: validation.HeldOut | None = None  # None: no held-out loss
    norms: dict = field(default_factory=dict)  # scale_weight_norms' figures of the last step, for its log line
    stop: object = None  # the worker's stop flag while the loop runs: a cancel skips the sample pictures left


def resolve_mixed_precision(value: str) -> str:
    if value != "auto":
        return value if torch.cuda.is_available() or value == "no" else "no"
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@dataclass
class Caches:
    """What runs on one loaded base can share: latents by (picture, bucket, flip), and the frozen text encoder's
    output by caption. One run fills its own; a sweep passes the same one to every trial."""

    latents: dict = field(default_factory=dict)
    captions: dict = field(default_factory=dict)
    # SD 3.5 / FLUX.1: send the text encoders off the device once their outputs are cached (a sweep does not while
    # one of its trials trains CLIP: that trial's copy of the encoders shares their weights)
    release_text_encoders: bool = True


def setup(cfg: TrainConfig, run_dir: Path) -> Run:
    """Load, cache and build everything the run needs, resuming from the newest state in `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    acc = make_accelerator(cfg)
    events = EventWriter(run_dir, enabled=acc.is_main_process)
    base, components, train_te = load_model(cfg, acc, events)
    return assemble(cfg, run_dir, started, acc, events, base, components, train_te, Caches())


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    return Accelerator(mixed_precision=resolve_mixed_precision(cfg.model.mixed_precision),
                       cpu=not torch.cuda.is_available())


def assemble(cfg: TrainConfig, run_dir: Path, started: float, acc, events, base, components: dict, train_te: bool,
             caches: Caches) -> Run:
    """A run on a base already loaded: its pictures, caches, adapter, optimizer and schedule, resumed."""
    items, held_items = load_items(cfg, events)
    d = cfg.data
    latents_of = cache_latents(items, base.vae, acc, d, run_dir, events, caches.latents) if d.cache_latents \
        else None
    prompts = sample_prompts(cfg)
    texts = [t for p in prompts for t in (p.text, p.negative)]
    encode = caption_encoder(base, cfg, items + held_items, acc, train_te, events, caches, texts)
    loss_fn = make_loss(cfg, base, acc)
    held_out = prepare_held_out(held_items, base, acc, caches.latents, loss_fn) if held_items else None
    schedule = make_schedule(cfg, items, acc, held_out is not None)
    torch.manual_seed(cfg.training.seed)  # the same initial adapter on every process, and in every rerun
    net = make_network(cfg.network, base, components, schedule.total_steps, events)
    if cfg.network.network_weights:
        start_from_file(net, Path(cfg.network.network_weights).expanduser(), events)
    if cfg.model.unet_quantization == "fp8":
        count = store_fp8(base.denoiser, compute_dtype(acc))
        events.status("loading", f"{type(base.denoiser).__name__} held in fp8 ({count} layers, computed in "
                                 f"{str(compute_dtype(acc)).removeprefix('torch.')})")
    base.denoiser.to(acc.device)
    for module in net.torch_modules():  # LyCORIS holds its modules beside the model: they do not move with it
        module.to(acc.device)
    params, optimizer, lr_schedule = make_optimization(cfg.optimizer, net, components, acc, schedule.total_steps)
    progress = resume(run_dir, acc, net, optimizer, lr_schedule, events)
    return Run(cfg=cfg, run_dir=run_dir, started=started, acc=acc, events=events, base=base, items=items,
               latents_of=latents_of, encode=encode, time_ids=sdxl_time_ids(items) if base.arch == "sdxl" else None,
               net=net, params=params, optimizer=optimizer, lr_schedule=lr_schedule,
               clip=gradient_clipping(acc, cfg.optimizer.max_grad_norm), loss_fn=loss_fn, schedule=schedule,
               progress=progress, prompts=prompts,
               samples_per_batch=cfg.training.train_batch_size * acc.num_processes, held_out=held_out)


def make_loss(cfg, base, acc) -> DenoisingLoss | FlowMatchingLoss:
    """SD 1/2/XL: the DDPM denoising loss (epsilon / v and its options); SD 3.5 / FLUX.1: rectified flow
    with the family's timestep shift (and FLUX.1 dev's guidance input), from the base's own scheduler config."""
    t = cfg.training
    if base.arch in FLOW_ARCHES:
        return FlowMatchingLoss.for_model(base, acc.mixed_precision, t.ip_noise_gamma, t.ip_noise_gamma_random_strength)
    if t.zero_terminal_snr and base.prediction_type != "v_prediction":  # an ε model learns nothing at SNR 0
        raise zero_terminal_snr_error(base.describe())
    schedule = DDPMScheduler.from_config(base.pipeline.scheduler.config, rescale_betas_zero_snr=t.zero_terminal_snr)
    return DenoisingLoss(schedule, base.prediction_type,
                         t.min_snr_gamma, t.noise_offset, acc.mixed_precision, t.multires_noise_iterations,
                         t.multires_noise_discount, t.debiased_estimation_loss, t.noise_offset_random_strength,
                         t.ip_noise_gamma, t.ip_noise_gamma_random_strength, t.min_timestep, t.max_timestep)


def compute_dtype(acc) -> torch.dtype:
    """The frozen weights' dtype: the mixed-precision one (fp32 without)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)


def load_model(cfg, acc, events) -> tuple[object, dict, bool]:
    """(the base model, its VAE and text encoders on the device and its denoiser in the compute dtype, {component
    name: module} the adapter wraps, whether text encoders train)."""
    m = cfg.model
    events.status("loading", f"Loading {m.pretrained_model_name_or_path}")
    base = load_base(m.pretrained_model_name_or_path, m.prediction_type, parts=parts_of(m))
    base.pipeline.set_progress_bar_config(disable=True)  # the events say how far it is; the log keeps what matters
    flow_family, flow_base = cfg.family in FLOW_ARCHES, base.arch in FLOW_ARCHES
    if flow_family != flow_base or flow_base and cfg.family != base.arch:
        from trainer.loading import ARCH_NAMES
        raise ValueError(f"{m.pretrained_model_name_or_path} is {ARCH_NAMES[base.arch]}, but the config's family is "
                         f"{cfg.family!r}: build it with the base's own preset variant")
    weight_dtype = compute_dtype(acc)
    # the denoiser goes to the device once the captions are encoded and its adapter made (assemble): the text
    # encoders (T5-XXL: 9.5 GB) and it are never on the device together, and an fp8 one is never there whole
    base.denoiser.to(dtype=weight_dtype)
    base.vae.to(acc.device, dtype=torch.float32)  # the VAE overflows in fp16; it only runs for caching and samples
    for te in base.text_encoders:
        te.to(acc.device, dtype=weight_dtype)
    components, train_te = choose_components(cfg, base)
    if m.unet_quantization == "nf4":
        count = quantize_unet_nf4(base.denoiser, weight_dtype, acc.device)
        events.status("loading", f"UNet held in 4-bit NF4 ({count} linear layers)")
    if m.gradient_checkpointing:
        base.denoiser.enable_gradient_checkpointing()
        for te in base.text_encoders if train_te else []:
            te.gradient_checkpointing_enable()
    if m.attention == "xformers" and acc.device.type == "cuda":
        base.denoiser.enable_xformers_memory_efficient_attention()
    return base, components, train_te


def choose_components(cfg, base) -> tuple[dict, bool]:
    """({component name: module} the config's adapter wraps, whether the text encoders train). SD 3.5 / FLUX.1:
    the transformer, and with text-encoder LoRA their CLIP encoders (FLUX.1 CLIP-L, SD 3.5 CLIP-L and CLIP-G, as
    sd-scripts trains them), never T5 (trainer.config refuses training the text encoders alone on them)."""
    n = cfg.network
    train_te = not n.network_train_unet_only and cfg.optimizer.text_encoder_lr > 0
    if base.arch in FLOW_ARCHES:
        if n.network_train_text_encoder_only:
            raise ValueError(f"{base.describe()}: the text encoders alone are not trained on SD 3.5 / FLUX.1; set "
                             "network_train_text_encoder_only = false")
        clips = {c: getattr(base.pipeline, c) for c in FLOW_CLIPS[base.arch]} if train_te else {}
        return {"transformer": base.denoiser} | clips, train_te
    te_names = ["text_encoder", "text_encoder_2"][: len(base.text_encoders)]
    components = {} if n.network_train_text_encoder_only else {"unet": base.unet}
    if train_te:
        components |= dict(zip(te_names, base.text_encoders))
    return components, train_te


def load_items(cfg, events) -> tuple[list, list]:
    """(the items to train on, the held-out items: none when the config asks for none or the dataset is too small)."""
    from trainer.config import bucket_limits, resolve_repeats

    d = cfg.data
    choice = validation.choose(data.scan(Path(d.train_data_dir), d.caption_extension), d.validation_split,
                               d.validation_dir, cfg.training.seed, d.caption_extension)
    if choice.note:
        events.status("held-out", choice.note)
    low, high = bucket_limits(d.resolution, d.min_bucket_reso, d.max_bucket_reso)
    items, skipped = data.build_items(choice.train, d.resolution, low, high, d.bucket_no_upscale,
                                      resolve_repeats(cfg, len(choice.train)), d.enable_bucket)
    held = []
    if choice.held_out:
        try:
            held, unread = data.build_items(choice.held_out, d.resolution, low, high, d.bucket_no_upscale, 1,
                                            d.enable_bucket)
            skipped += unread
        except data.DatasetError as e:
            events.status("held-out", f"Held-out loss off: {e}")
    for message in skipped:
        events.status("loading", f"Skipped an unreadable image: {message}")
    return items, held


def prepare_held_out(items, base, acc, memo: dict, loss_fn) -> validation.HeldOut:
    latents = [remembered(memo, item, False, lambda item=item: encode_image(item, False, base.vae, acc.device, None))
               for item in items]
    return validation.prepare(items, latents, sdxl_time_ids(items) if base.arch == "sdxl" else None, loss_fn,
                              acc.device)


def make_schedule(cfg, items, acc, held_out: bool = False) -> Schedule:
    t, s = cfg.training, cfg.sample
    batches_per_epoch = len(data.shard(data.epoch_batches(items, t.train_batch_size, t.seed, 0),
                                       acc.process_index, acc.num_processes))
    steps_per_epoch, total_steps = count_steps(batches_per_epoch, t)
    return Schedule(total_steps=total_steps, epochs=math.ceil(total_steps / steps_per_epoch),
                    steps_per_epoch=steps_per_epoch, batches_per_epoch=batches_per_epoch,
                    accumulation=t.gradient_accumulation_steps,
                    sample_steps=s.sample_every_n_steps, sample_epochs=s.sample_every_n_epochs,
                    state_steps=t.save_every_n_steps, file_epochs=t.save_every_n_epochs,
                    validate_steps=t.validation_every_n_steps if held_out else 0)


def make_network(n, base, components: dict, total_steps: int, events):
    net = create_network(n, base.arch, components, total_steps)
    for c in components:
        for p in net.parameters_of(c):
            p.data = p.data.float()  # adapters train in fp32 under autocast
    left = (f"; {len(net.left_out)} left out, no loader maps them in a {net.kind} file ({net.left_out[0]}, …)"
            if net.left_out else "")
    events.status("loading", f"{base.describe()}; {net.kind} on {net.counts()} modules{left}")
    return net


def start_from_file(net, path: Path, events) -> None:
    """network_weights: the adapter starts as the file's (a resumed run then loads its own state over it)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    try:
        found = net.start_from(tensors)
    except ValueError as e:
        raise ConfigError("network.network_weights", f"network.network_weights: {path.name}: {e}") from None
    in_file = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}
    if not found:
        raise ConfigError("network.network_weights", f"network.network_weights: {path.name} holds none of this "
                                                     f"network's {len(net.names())} modules (a file for another "
                                                     "base model family, or not a LoRA?)")
    left = in_file - set(found)
    events.status("loading", f"Started from {path.name}: {len(found)} of this network's {len(net.names())} modules"
                             + (f"; {len(left)} of the file's are not in this network and are left out ("
                                f"{sorted(left)[0]}, …)" if left else ""))


def make_optimization(o, net, components: dict, acc, total_steps: int) -> tuple[list, object, object]:
    """(the trained parameters, the optimizer, its learning-rate schedule), both registered for resuming."""
    denoiser_lr = o.unet_lr or o.learning_rate
    lrs = {"unet": denoiser_lr, "transformer": denoiser_lr, "text_encoder": o.text_encoder_lr,
           "text_encoder_2": o.text_encoder_lr}
    groups = [g for c in components for g in net.param_groups(c, lrs[c]) if g["params"]]
    params = [p for g in groups for p in g["params"]]
    optimizer = acc.prepare(make_optimizer(o, groups, acc.device))
    lr_schedule = make_scheduler(o, optimizer, total_steps)
    return params, optimizer, lr_schedule


def gradient_clipping(acc, max_norm: float) -> Callable[[list[torch.Tensor]], None]:
    def clip(params: list[torch.Tensor]) -> None:
        acc.clip_grad_norm_(params, max_norm)

    return clip if max_norm else lambda params: None


def resume(run_dir: Path, acc, net, optimizer, lr_schedule, events) -> Progress:
    progress = Progress()
    if (state := checkpoint.latest(run_dir)) is not None:
        checkpoint.load(state, acc, net, progress, optimizer, lr_schedule)
        events.status("loading", f"Resuming from step {progress.step} (epoch {progress.epoch + 1})")
    events.emit("start", step=progress.step)
    return progress


def cache_latents(items, vae, acc, d, run_dir: Path, events, memo: dict) -> dict:
    """(item index, flipped) -> latent, encoded once (`memo` holds those already encoded on this base); on disk too
    with cache_latents_to_disk."""
    flips = (False, True) if d.flip_aug else (False,)
    new = sum((item.path, item.bucket, flip) not in memo for item in items for flip in flips)
    events.status("caching", f"Encoding {len(items)} images to latents" if new else
                  f"Latents of {len(items)} images already encoded on this base")
    disk = run_dir / "cache" / "latents" if d.cache_latents_to_disk else None
    cache = {}
    for i, item in enumerate(items):
        for flip in flips:
            encode = (lambda item=item, flip=flip: encode_image(item, flip, vae, acc.device, disk))
            cache[(i, flip)] = remembered(memo, item, flip, encode)
    return cache


def remembered(memo: dict, item, flip: bool, encode: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The latent of one picture in its bucket, encoded once per loaded base (encoding is deterministic)."""
    key = (item.path, item.bucket, flip)
    if key not in memo:
        memo[key] = encode()
    return memo[key]


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
        shift = vae.config.get("shift_factor")  # SD 3.5 / FLUX.1 VAEs: (z - shift) * scale; SD ones have none
        latent = latent * vae.config.scaling_factor if shift is None else (latent - shift) * vae.config.scaling_factor
    if disk is not None:
        disk.mkdir(parents=True, exist_ok=True)
        save_file({"latent": latent.cpu().contiguous()}, str(disk / f"{key}.safetensors"))
    return latent


def sample_prompts(cfg) -> list[SamplePrompt]:
    """The sample prompts with the trigger word in them (and in their negative prompts), options parsed."""
    trigger = cfg.data.trigger_word
    return [parse_prompt(with_trigger(line, trigger), cfg.family) for line in cfg.sample.sample_prompts]


def with_trigger(line: str, trigger: str) -> str:
    """{trigger} replaced; with no trigger word, the tag it stood for goes with its comma (not ", a yellow ring")."""
    if trigger:
        return line.replace("{trigger}", trigger)
    return re.sub(r"\{trigger\}\s*,\s*|,?\s*\{trigger\}", "", line).strip()


def caption_encoder(base, cfg, items, acc, train_te: bool, events, caches: Caches, prompts: list[str] = ()):
    """captions -> (hidden, pooled). With a frozen text encoder and fixed captions, every caption is encoded once
    (into `caches.captions`, which runs on the same frozen encoders and clip skip may share). SD 3.5 / FLUX.1: the
    pipeline's own prompt encoding (CLIP + T5), through which the samples are drawn too: the sample `prompts` (and
    their negative prompts) are cached with the captions, so the text encoders leave the device once they are;
    with CLIP trained, `flow_te_encoder`."""
    d = cfg.data
    fixed = not d.shuffle_caption and d.caption_dropout_rate == 0 and d.caption_tag_dropout_rate == 0
    texts = {item.caption for item in items}
    if base.arch in FLOW_ARCHES:
        from trainer.flow_parts import MAX_SEQUENCE

        length = MAX_SEQUENCE.get(base.variant, MAX_SEQUENCE["sd3"])
        texts |= {*prompts, ""} if prompts else set()
        if train_te:
            return flow_te_encoder(base, texts, acc, length, fixed and d.cache_text_encoder_outputs, events,
                                   caches.release_text_encoders)

        def run(captions):
            with torch.no_grad():
                return text.encode_flow(base.pipeline, base.arch, captions, length, acc.device)
    else:
        warn_cut_captions(base, items, d.max_token_length, events)

        def run(captions):
            return text.encode(base.arch, base.tokenizers, base.text_encoders, captions, cfg.model.clip_skip,
                               acc.device, d.max_token_length)

    if train_te or not d.cache_text_encoder_outputs or not fixed:
        return run
    events.status("caching", "Encoding captions once (the text encoder is frozen)")
    cached = caches.captions
    if missing := sorted(texts - set(cached)):
        for te in base.text_encoders:  # (back, when an earlier sweep trial sent them off)
            te.to(acc.device)
        with torch.no_grad(), acc.autocast():
            for c in missing:
                cached[c] = run([c])
    if base.arch in FLOW_ARCHES and caches.release_text_encoders:
        release(base.text_encoders, events, "Captions and sample prompts cached; the text encoders (T5 included) "
                                            "moved off the device")

    def lookup(captions):
        hidden = torch.cat([cached[c][0] for c in captions])
        pooled = torch.cat([cached[c][1] for c in captions]) if base.arch in ("sdxl", *FLOW_ARCHES) else None
        return hidden, pooled

    return lookup


def warn_cut_captions(base, items, max_tokens: int, events) -> None:
    by_caption = {}
    for item in items:
        by_caption.setdefault(item.caption, []).append(item.path.name)
    cut = text.cut_captions(base.tokenizers[0], sorted(by_caption), max_tokens)
    if cut:
        names = [name for c in cut for name in by_caption[c]]
        needed = text.tokens_needed(base.tokenizers[0], cut)
        more = ("" if max_tokens == 225 else f"; max_token_length = {min(needed, 225)} reads "
                + ("them whole" if needed <= 225 else "225 of them"))
        events.status("loading", f"{len(names)} caption(s) longer than {max_tokens} tokens: the text encoder never "
                                 f"reads their end ({', '.join(names[:5])}{', …' if len(names) > 5 else ''}){more}")


def flow_te_encoder(base, texts: set[str], acc, length: int, cache: bool, events, release_t5: bool = True):
    """SD 3.5 / FLUX.1 with CLIP trained: CLIP runs every step through its adapter (gradients reach it), T5 stays
    frozen: its part of every text (captions, sample prompts) is encoded once and T5 leaves the device when the
    captions are fixed (as sd-scripts' partial text-encoder cache), else encoded every step without gradients."""
    pipe = base.pipeline
    for te in base.text_encoders:  # CLIP trains here (and T5 encodes): on the device, even after an earlier trial
        te.to(acc.device)
    memo: dict = {}

    def t5(captions):
        if memo:
            return torch.cat([memo[c] for c in captions])
        with torch.no_grad(), acc.autocast():
            return text.encode_flow_t5(pipe, captions, length, acc.device)

    if cache:
        events.status("caching", "Encoding the T5 part of the captions and sample prompts once (CLIP trains, T5 is "
                                 "frozen)")
        memo |= {c: t5([c]) for c in sorted(texts)}
        if release_t5:
            release(base.text_encoders[-1:], events, "T5 part cached; T5 moved off the device (CLIP stays: it "
                                                     "trains)")

    def encode(captions):
        return text.encode_flow_clip(pipe, base.arch, captions, t5(captions), acc.device)

    return encode


def release(encoders, events, message: str) -> None:
    """SD 3.5 / FLUX.1 text encoders whose outputs are all cached go back to the CPU (T5-XXL: ~9.5 GB in fp16)."""
    for te in encoders:
        te.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    events.status("caching", message)


def sdxl_time_ids(items) -> list[torch.Tensor]:
    """SDXL's size conditioning of each item: its original size, the crop of its bucket, the bucket's size."""
    out = []
    for item in items:
        bw, bh = item.bucket
        _, (top, left) = data.cover_crop_box(item.size[0], item.size[1], bw, bh)
        out.append(text.sdxl_time_ids((item.size[1], item.size[0]), (top, left), (bh, bw)))
    return out

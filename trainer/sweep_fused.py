"""Trials trained together on one loaded base (issue #16), as mLoRA does: the trials' batches are stacked into one
forward of the frozen UNet (SD 3.5 / FLUX.1: transformer), and each sample goes through its own trial's adapter.

How a sample is routed. Every trial gets its own structural copy of the UNet (and of the text encoders it trains):
`shared_copy` copies the module tree but not one weight, so a copy costs Python objects, not memory. The trial's
adapter is injected into its copy by the ordinary `trainer.networks.create`, so the trial's Network, export,
checkpoints, samples and held-out loss are exactly a single run's, on its copy. The fused forward runs the original
tree, in which every adapted module is replaced by a `Router`. The samples of a forward lie in spans, one per
trial (`Plan`); the router runs the frozen base layer once over all of them, then

- peft LoRA layers (lora, locon, rslora, lora_fa): adds each trial's lora_B(lora_A(x_k))·scaling to that trial's
  span of the shared output: peft's own forward, and what its `adapter_names` mixed batch and mLoRA's multi-LoRA
  layer do;
- any other wrapper (LyCORIS LoHa / LoKr / DoRA rebuild the weight in their forward): runs that trial's own
  wrapped module on its span (a chunked forward: the adapted layer's work is not shared, everything else is).

Everything between adapted layers (norms, attention, res-blocks, samplers, the time embedding) runs once for all
samples. A trial that trains the text encoder encodes its captions through its own copy of the encoder (with its
adapter); its hidden states join the shared UNet forward like the others'. The loop below is the single run's (trainer/train.py) with its forward shared: each trial keeps its data
order, noise, seed, optimizer and schedule, and steps, samples, validates and saves through trainer.train's own
functions on its own Run.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from peft.tuners.adalora import AdaLoraLayer
from peft.tuners.lora import LoraLayer
from torch import nn

from trainer.events import EventWriter
from trainer.loss import TrainingError
from trainer.setup import Caches, Run, assemble, choose_components
from trainer.train import (Batch, Meter, baseline, cancel, end_epoch, epoch_batches, finish, log_step, make_batch,
                           optimizer_step, position_rng, sample_all, save_state, training_line, validate)
from trainer.validation import eval_mode

ADAPTER = "default"  # peft's adapter name in trainer/networks/lora.py
SHARED_FORWARD = ("lora", "locon", "rslora", "lora_fa")  # the base layer's output is shared
CHUNKED_FORWARD = ("loha", "lokr", "dora")  # each trial's LyCORIS module runs on its own span


def solo_reason(cfg) -> str:
    """Why a trial cannot share a forward with others and trains on its own ("" when it can)."""
    n = cfg.network
    if n.network_type not in SHARED_FORWARD + CHUNKED_FORWARD:
        return (f"network_type {n.network_type!r}: its layers are not routed through a shared forward (routed: "
                f"{', '.join(SHARED_FORWARD + CHUNKED_FORWARD)})")
    if n.network_dropout:
        return (f"network_dropout = {n.network_dropout}: the dropout masks are drawn inside the forward, so in a "
                "shared one they would differ from the run's alone")
    return ""


# --- one base, many trials ---

def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the original's tensors (no weight is copied)."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def trial_base(base, train_te: bool):
    """The base as one trial sees it: its own UNet tree (and text-encoder trees if it trains them), shared weights."""
    pipe = copy.copy(base.pipeline)
    object.__setattr__(pipe, base.denoiser_name, shared_copy(base.denoiser))
    for name in ("text_encoder", "text_encoder_2") if train_te else ():
        if getattr(base.pipeline, name, None) is not None:
            object.__setattr__(pipe, name, shared_copy(getattr(base.pipeline, name)))
    return dataclasses.replace(base, pipeline=pipe)


@dataclass
class Loaded:
    """What the sweep loads once: the base (its denoiser goes to the device with the first trial), the accelerator,
    the latents and caption caches."""

    base: object
    acc: object
    caches: Caches = field(default_factory=Caches)


def trial_run(cfg, run_dir: Path, loaded: Loaded) -> Run:
    """A trial's Run on the loaded base: the single run's `assemble`, on the trial's own copy of the trees."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    train_te = choose_components(cfg, loaded.base)[1]
    view = trial_base(loaded.base, train_te)
    components, _ = choose_components(cfg, view)
    return assemble(cfg, Path(run_dir), time.time(), loaded.acc, EventWriter(run_dir), view, components, train_te,
                    loaded.caches)


# --- routing ---

class Plan:
    """The spans of the forward running now: (trial key, first sample, end), in batch order."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, int, int]] = []


class Router(nn.Module):
    """One adapted module of the base, shared by the trials; each span of the batch goes through its trial's layer."""

    def __init__(self, base: nn.Module, plan: Plan):
        super().__init__()
        self.base = base
        self.plan = plan
        self.layers: dict[int, nn.Module] = {}  # trial key -> its wrapped module; plain dict: they live in its copy

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        spans = self.plan.spans
        if not spans:
            return self.base(x, *args, **kwargs)
        if x.shape[0] != spans[-1][2]:
            raise RuntimeError(f"a routed layer got {x.shape[0]} samples, the plan holds {spans[-1][2]}")
        layers = [self.layers.get(key) for key, _, _ in spans]
        if stackable(layers, spans):
            return batched_lora_added(layers, self.base(x, *args, **kwargs), x)
        shared = self.base(x, *args, **kwargs) if any(layer is None or shares_base(layer) for layer in layers) else None
        out = []
        for layer, (_, a, b) in zip(layers, spans):
            if layer is None:
                out.append(shared[a:b])
            elif shares_base(layer):
                out.append(lora_added(layer, shared[a:b], x[a:b]))
            else:
                out.append(layer(x[a:b], *args, **kwargs))
        return torch.cat(out) if len(out) > 1 else out[0]


def shares_base(layer: nn.Module) -> bool:
    """A plain peft LoRA layer: base(x) + lora_B(lora_A(x))·scaling, so base(x) can be computed once for all.
    (AdaLoRA's layer is a LoraLayer too, but its A, E and B are bare parameters with a forward of their own.)"""
    return (isinstance(layer, LoraLayer) and not isinstance(layer, AdaLoraLayer) and list(layer.lora_A) == [ADAPTER] and not layer.lora_variant
            and not layer.merged and not layer.disable_adapters)


def lora_added(layer, base_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """peft's LoRA forward (tuners/lora/layer.py, Linear and _ConvNd) on a base output computed elsewhere."""
    lora_a, lora_b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    x = layer._cast_input_dtype(x, lora_a.weight.dtype)
    return (base_out + lora_b(lora_a(layer.lora_dropout[ADAPTER](x))) * layer.scaling[ADAPTER]).to(base_out.dtype)


def stackable(layers: list, spans: list[tuple[int, int, int]]) -> bool:
    """Can the trials' LoRAs of this layer run as one batched matmul: Linear LoRAs without dropout, one per span, the
    spans of one length (the usual sweep: every trial a batch of the same size)?"""
    if len(layers) < 2 or any(layer is None or not shares_base(layer) for layer in layers):
        return False
    return (all(isinstance(layer.lora_A[ADAPTER], nn.Linear) and isinstance(layer.lora_dropout[ADAPTER], nn.Identity)
                for layer in layers)
            and len({b - a for _, a, b in spans}) == 1)


def batched_lora_added(layers: list, base_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`lora_added` for every span at once: the K trials' A and B stacked, two batched matmuls (as mLoRA's batched
    LoRA operator), instead of K pairs of matmuls on slices and a concatenation. Lower ranks are padded with zero
    rows of A and columns of B to the highest: their products add exact zeros."""
    k = len(layers)
    rank = max(layer.lora_A[ADAPTER].weight.shape[0] for layer in layers)
    a = torch.stack([padded(layer.lora_A[ADAPTER].weight, 0, rank) for layer in layers])  # [K, r, in]
    b = torch.stack([padded(layer.lora_B[ADAPTER].weight, 1, rank) for layer in layers])  # [K, out, r]
    x = layers[0]._cast_input_dtype(x, a.dtype).reshape(k, -1, a.shape[-1])
    scales = torch.tensor([layer.scaling[ADAPTER] for layer in layers], dtype=a.dtype, device=a.device)
    delta = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2)) * scales[:, None, None]
    return (base_out + delta.reshape(base_out.shape)).to(base_out.dtype)


def padded(weight: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`weight` with zeros appended along `dim` (0 or 1) up to `size`."""
    missing = size - weight.shape[dim]
    return weight if not missing else torch.nn.functional.pad(weight, (0, missing) if dim else (0, 0, 0, missing))


def install(denoiser: nn.Module, runs: list[Run], plan: Plan) -> Callable[[], None]:
    """Routers at every module of the UNet / transformer any trial adapts (trial key = its index in `runs`);
    returns the undo."""
    routers: dict[str, Router] = {}
    for key, run in enumerate(runs):
        for target in run.net.targets.values():
            if target.component != run.base.denoiser_name:
                continue
            if target.path not in routers:
                routers[target.path] = Router(denoiser.get_submodule(target.path), plan)
            routers[target.path].layers[key] = run.base.denoiser.get_submodule(target.path)
    for path, router in routers.items():
        set_submodule(denoiser, path, router)

    def undo() -> None:
        for path, router in routers.items():
            set_submodule(denoiser, path, router.base)

    return undo


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


# --- the loop ---

@dataclass
class Cursor:
    """One trial's place in its data: its Run, the epoch it is in and that epoch's batches."""

    name: str
    run: Run
    meter: Meter = field(default_factory=Meter)
    epoch: int = 0
    batches: list = field(default_factory=list)
    state: str = "training"  # training | finished | cancelled | failed | pruned
    message: str = ""


@dataclass
class Work:
    cursor: Cursor
    batch: Batch
    noise: torch.Tensor
    timesteps: torch.Tensor
    input_noise: torch.Tensor  # the noise the input is made with: `noise` itself without input perturbation


@dataclass
class Group:
    """Trials that share each forward of one base UNet (a group of one is a trial trained on its own)."""

    denoiser: nn.Module  # the loaded base's UNet / transformer, where the routers go
    acc: object
    cursors: list[Cursor]
    plan: Plan = field(default_factory=Plan)

    @contextmanager
    def routing(self, part: list[tuple[Cursor, tuple]]):
        """The plan for a forward of these (trial, inputs), one after another. It must hold through the backward
        too: gradient checkpointing runs the forward again there."""
        keys = {id(c): k for k, c in enumerate(self.cursors)}
        ends = list(itertools.accumulate(len(inputs[0]) for _, inputs in part))
        self.plan.spans = [(keys[id(c)], end - len(inputs[0]), end) for (c, inputs), end in zip(part, ends)]
        try:
            yield
        finally:
            self.plan.spans = []

    def forward(self, part: list[tuple[Cursor, tuple]]) -> list[torch.Tensor]:
        """Inside `routing(part)`: each trial's per-sample loss of its (latents, noise, points, hidden, added),
        from one forward of the stacked inputs, each sample through its own trial's adapter."""
        with self.acc.autocast():
            per = part[0][0].run.loss_fn.per_sample(self.denoiser, *stacked([inputs for _, inputs in part]))
        return [per[a:b] for _, a, b in self.plan.spans]

    def routed(self, items: list[tuple[Cursor, tuple]]) -> list[torch.Tensor]:
        """`forward` over items of any shapes: one forward per shape."""
        out: list = [None] * len(items)
        for members in by_shape(items):
            part = [items[j] for j in members]
            with self.routing(part):
                for j, per in zip(members, self.forward(part)):
                    out[j] = per
        return out

    def measure_held_out(self, cursors: list[Cursor]) -> None:
        """The held-out loss of these trials at their current step from routed forwards, one per picture over all
        of them (the frozen UNet's work shared as in training); each trial's HeldOut keeps it as `known`, so the
        single run's validate() logs it. Trials whose held-out pictures differ in number measure alone."""
        runs = [c.run for c in cursors if c.run.held_out is not None and c.run.acc.is_main_process]
        if len(runs) < 2 or len({len(r.held_out.latents) for r in runs}) > 1:
            return
        by_run = {id(c.run): c for c in cursors}
        roots = [self.denoiser, *(m for r in runs for m in r.net.torch_modules())]
        with eval_mode(roots), torch.no_grad():
            losses = [[per.mean().item() for per in self.routed([(by_run[id(r)], r.held_out.inputs(r, j))
                                                                 for r in runs])]
                      for j in range(len(runs[0].held_out.latents))]
        for i, r in enumerate(runs):
            r.held_out.known = (r.progress.step, sum(row[i] for row in losses) / len(losses))


def by_shape(items: list[tuple[Cursor, tuple]]) -> list[list[int]]:
    """The items' indices grouped by latent and text shape: inputs of different buckets cannot stack."""
    shapes: dict = {}
    for j, (_, (latents, _, _, hidden, *_)) in enumerate(items):
        shapes.setdefault((tuple(latents.shape[1:]), tuple(hidden.shape[1:])), []).append(j)
    return list(shapes.values())


def stacked(parts: list[tuple]) -> tuple:
    """Several trials' inputs (latents, noise, timesteps, hidden, added_cond[, input_noise]), one after another."""
    return tuple(_cat(column) for column in zip(*parts))


def _cat(column: tuple):
    if column[0] is None:
        return None
    if isinstance(column[0], dict):
        return {k: torch.cat([a[k] for a in column]) for k in column[0]}
    return torch.cat(column)


def train_group(group: Group, stop, judge: Callable[[list[Cursor]], None]) -> None:
    """Train the group's trials to their ends, together; `judge` may prune trials after each fused step.
    On `stop`, every trial stops at its next optimizer step with a resumable state (state "cancelled")."""
    group.measure_held_out([c for c in group.cursors if c.run.progress.step == 0])  # the baselines
    for c in group.cursors:
        start(c)
    settle(group.cursors)
    judge(group.cursors)  # a resumed sweep first judges the checkpoints reached before it stopped
    while active := [c for c in group.cursors if c.state == "training"]:
        fused_step(group, [draw(c) for c in active])
        stepped = [c for c in active if c.state == "training" and step_optimizer(c)]
        group.measure_held_out([c for c in stepped if held_out_due(c)])
        stopping = stop.requested  # asked once: the trials stop at the same step, before any is judged past it
        for c in stepped:
            after_step(c, stopping)
        settle(active)
        judge(group.cursors)


def fused_step(group: Group, works: list[Work]) -> None:
    """Forward and backward of the trials' batches, one stacked forward per shape; a trial whose loss breaks
    fails, the others go on."""
    items = [(w.cursor, (w.batch.latents, w.noise, w.timesteps, w.batch.hidden, w.batch.added_cond, w.input_noise))
             for w in works]
    for members in by_shape(items):
        part = [items[j] for j in members]
        with group.routing(part):
            total = 0.0
            for j, per_sample in zip(members, group.forward(part)):
                c = works[j].cursor
                try:
                    loss = c.run.loss_fn.reduce(per_sample, works[j].timesteps)
                except TrainingError as e:
                    fail(c, e)
                    continue
                c.meter.add(loss.item())
                total = total + (loss + c.run.net.regularization()) / c.run.schedule.accumulation
            if isinstance(total, torch.Tensor):
                group.acc.backward(total)


def settle(cursors: list[Cursor]) -> None:
    """Trials that reached their last step write their final file now (and leave the batch)."""
    for c in cursors:
        if c.state == "finished":
            finish(c.run)
            c.state = "done"


def start(c: Cursor) -> None:
    run, p, s = c.run, c.run.progress, c.run.schedule
    run.events.status("training", training_line(s))
    if p.step == 0:
        baseline(run)
    c.epoch = p.epoch
    c.batches = epoch_batches(run, c.epoch) if c.epoch < s.epochs else []
    if s.finished(p.step) or c.epoch >= s.epochs:
        c.state = "finished"


def draw(c: Cursor) -> Work:
    """The trial's next batch, augmented and noised from its own position's random stream, as alone."""
    run, i = c.run, c.run.progress.batch
    c.meter.start()
    batch = make_batch(run, c.batches[i], position_rng(run, c.epoch, i))
    return Work(c, batch, *run.loss_fn.draw(batch.latents))  # the noise and points the single loop's loss draws


def step_optimizer(c: Cursor) -> bool:
    """After the backward: the optimizer step and its log line at the accumulation boundary (True then)."""
    run, p, s = c.run, c.run.progress, c.run.schedule
    p.batch += 1
    if p.batch % s.accumulation and p.batch < len(c.batches):
        return False
    optimizer_step(run)
    log_step(run, c.epoch, c.meter)
    return True


def held_out_due(c: Cursor) -> bool:
    """Does the step just taken measure the held-out loss (a checkpoint, or a file saved now)?"""
    p, s = c.run.progress, c.run.schedule
    epoch_ends = p.batch >= len(c.batches)
    return s.should_validate(p.step) or s.finished(p.step) or epoch_ends and (
        s.should_save_file(c.epoch + 1) or c.epoch + 1 >= s.epochs)


def after_step(c: Cursor, stopping: bool) -> None:
    """What the single loop does after an optimizer step (sample, validate, save, the epoch's end), then
    finished / cancelled."""
    run, p, s = c.run, c.run.progress, c.run.schedule
    if s.should_sample(p.step):
        sample_all(run)
    if s.should_validate(p.step):
        validate(run, c.epoch + 1)
    if s.should_save_state(p.step):
        save_state(run, c.epoch)
    epoch = c.epoch
    if p.batch >= len(c.batches):
        end_epoch(run, c.epoch)
        c.epoch += 1
        c.batches = epoch_batches(run, c.epoch) if c.epoch < s.epochs else []
    if s.finished(p.step) or c.epoch >= s.epochs:
        c.state = "finished"
    elif stopping:
        cancel(run, epoch)
        c.state = "cancelled"


def fail(c: Cursor, error: Exception) -> None:
    c.state, c.message = "failed", str(error)
    c.run.events.emit("error", message=str(error))

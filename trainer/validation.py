"""Held-out loss: the training objective on pictures the run never trains on, at fixed points and fixed noise.

SD 1/2/XL score the denoising loss at fixed timesteps; SD 3.5 / FLUX.1 the flow-matching loss at fixed σ (see
`fixed_points`). The pictures, points and noise are the same at every measurement, and the loss is the plain MSE
of the prediction (no min-SNR weighting, no noise offset), so the curve compares across steps, runs and methods
that share the base and the held-out pictures. The noise comes from its own generators: measuring draws nothing
from the training's random stream.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from datasets_tools.dataset_folder import MIN_TRAIN, held_count, held_out
from trainer import data
from trainer.loss import DenoisingLoss, FlowMatchingLoss

if TYPE_CHECKING:
    from trainer.setup import Run

TIMESTEPS = 4  # per picture: the centres of equal parts of the noise schedule (flow: of σ's distribution)
NOISE_SEED = 1_000_003  # + the picture's index


@dataclass(frozen=True)
class Choice:
    train: list  # (image, caption, repeats) as data.scan returns them
    held_out: list
    note: str  # which pictures are held out, or why none are; "" when none were asked for


def choose(found: list, fraction: float, folder: str, seed: int, caption_extension: str = ".txt") -> Choice:
    """Split `found` by `fraction` (at least one picture, chosen by the seed), or hold out `folder`'s pictures."""
    if folder:
        try:
            held = data.scan(Path(folder), caption_extension)
        except data.DatasetError:
            return Choice(found, [], f"Held-out loss off: validation_dir {folder} is not a folder")
        if not held:
            return Choice(found, [], f"Held-out loss off: validation_dir {folder} holds no pictures")
        return Choice(found, held, f"Held-out loss on {len(held)} picture(s) of {folder}")
    if not fraction:
        return Choice(found, [], "")
    chosen, k = held_out(len(found), fraction, seed), held_count(len(found), fraction)
    if not chosen:
        return Choice(found, [], f"Held-out loss off: {len(found)} picture(s) are too few to hold {k} out and train "
                                 f"on at least {MIN_TRAIN}; add pictures or set validation_split = 0")
    held = [f for i, f in enumerate(found) if i in chosen]
    names = ", ".join(path.name for path, _, _ in held)
    return Choice([f for i, f in enumerate(found) if i not in chosen], held,
                  f"Held-out loss on {k} of {len(found)} pictures, never trained on: {names}")


@dataclass
class HeldOut:
    """The held-out pictures ready to score: latents, captions, SDXL size conditioning, fixed noise and points."""

    paths: list[Path]
    latents: list[torch.Tensor]
    captions: list[str]
    time_ids: list[torch.Tensor] | None
    noise: list[torch.Tensor]  # per picture [TIMESTEPS, C, H, W]
    timesteps: list[torch.Tensor]  # per picture [TIMESTEPS]: DDPM timesteps, or σ for flow matching
    step: int | None = None  # of the last measurement, whose value is kept
    value: float = 0.0
    known: tuple[int, float] | None = None  # (step, value) measured elsewhere: a sweep measures its trials together

    def measure(self, run: Run) -> float:
        """Mean loss over the pictures and timesteps with the adapter as it is: no grad, eval mode (restored)."""
        if self.known is not None and self.known[0] == run.progress.step:
            return self.known[1]
        with eval_mode(run.net.torch_modules()), torch.no_grad(), run.acc.autocast():
            losses = [run.loss_fn.per_sample(run.base.denoiser, *self.inputs(run, j)).mean().item()
                      for j in range(len(self.latents))]
        return sum(losses) / len(losses)

    def inputs(self, run: Run, j: int) -> tuple:
        """(latents, noise, points, hidden states, added conditioning) of picture j: its TIMESTEPS samples."""
        k = len(self.timesteps[j])
        hidden, pooled = run.encode([self.captions[j]])
        added = None
        if self.time_ids is not None:
            added = {"text_embeds": pooled.expand(k, -1),
                     "time_ids": self.time_ids[j][None].expand(k, -1).to(hidden.device, hidden.dtype)}
        elif pooled is not None:  # SD 3.5 / FLUX.1: the pooled text projections
            added = {"pooled": pooled.expand(k, -1)}
        latents = self.latents[j][None].expand(k, -1, -1, -1)
        return latents, self.noise[j], self.timesteps[j], hidden.expand(k, -1, -1), added


@contextmanager
def eval_mode(roots):
    """Every module under `roots` in eval mode for the block, then each back in its own mode. `train()` recurses
    (and libraries override it: peft's DoRA clears its cache), so it is called on the roots, and on the way back in
    tree order only where a module's mode differs from its parent's: O(modules), not O(modules × depth)."""
    modes = {m: m.training for root in roots for m in root.modules()}  # parents before their children
    for root in roots:
        root.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            if m.training != mode:
                m.train(mode)
        for m, mode in modes.items():  # a module reached through two parents: its own flag last
            m.training = mode


def fixed_timesteps(num_train_timesteps: int, count: int = TIMESTEPS) -> torch.Tensor:
    return torch.tensor([(2 * i + 1) * num_train_timesteps // (2 * count) for i in range(count)])


def fixed_sigmas(loss_fn: FlowMatchingLoss, latent: torch.Tensor, count: int = TIMESTEPS) -> torch.Tensor:
    """σ at the centres of `count` equal parts of the distribution training draws σ from: u at the logit-normal's
    quantiles (2i + 1) / 2·count, then shifted as training shifts it for a picture of this latent's size."""
    q = (2 * torch.arange(count, dtype=torch.float64) + 1) / (2 * count)
    u = torch.sigmoid(torch.special.ndtri(q) * loss_fn.logit_std + loss_fn.logit_mean)
    return loss_fn.shifted(u, latent.shape[-2] * latent.shape[-1] // 4).float()


def fixed_points(loss_fn: DenoisingLoss | FlowMatchingLoss, latent: torch.Tensor) -> torch.Tensor:
    """Where a picture is scored: the DDPM objective at fixed timesteps, the flow-matching one at fixed σ."""
    if isinstance(loss_fn, FlowMatchingLoss):
        return fixed_sigmas(loss_fn, latent)
    return fixed_timesteps(loss_fn.scheduler.config.num_train_timesteps)


def prepare(items: list, latents: list[torch.Tensor], time_ids, loss_fn: DenoisingLoss | FlowMatchingLoss,
            device) -> HeldOut:
    noise = [torch.randn((TIMESTEPS, *z.shape), generator=torch.Generator().manual_seed(NOISE_SEED + j),
                         dtype=z.dtype).to(device) for j, z in enumerate(latents)]
    return HeldOut([item.path for item in items], latents, [item.caption for item in items], time_ids, noise,
                   [fixed_points(loss_fn, z).to(device) for z in latents])

"""The denoising loss, set up once from the config so the training loop has no option branches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


@dataclass
class DenoisingLoss:
    scheduler: DDPMScheduler  # the noise schedule of the base model
    prediction_type: str  # "epsilon" | "v_prediction"
    min_snr_gamma: float = 0.0  # https://arxiv.org/abs/2303.09556 ; 0 = off
    noise_offset: float = 0.0  # https://www.crosslabs.org/blog/diffusion-with-offset-noise ; 0 = off
    mixed_precision: str = "no"

    def __call__(self, unet, latents, hidden, added_cond=None, generator=None) -> torch.Tensor:
        """Mean loss of one batch: noise the latents at random timesteps and score the UNet's prediction."""
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        if self.noise_offset:
            offset = torch.randn((b, latents.shape[1], 1, 1), generator=generator, dtype=latents.dtype)
            noise = noise + self.noise_offset * offset.to(latents.device)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (b,), generator=generator).to(latents.device)
        return self.reduce(self.per_sample(unet, latents, noise, timesteps, hidden, added_cond), timesteps)

    def reduce(self, per_sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The batch's loss from its samples' MSE (min-SNR weighted when asked); checked to be finite."""
        if self.min_snr_gamma:
            snr = compute_snr(self.scheduler, timesteps)
            weight = snr.clamp(max=self.min_snr_gamma) / (snr + 1 if self.prediction_type == "v_prediction" else snr)
            per_sample = per_sample * weight
        loss = per_sample.mean()
        self.check(loss)
        return loss

    def per_sample(self, unet, latents, noise, timesteps, hidden, added_cond=None) -> torch.Tensor:
        """The unweighted MSE of each sample's prediction at the given noise and timesteps."""
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        pred = unet(noisy, timesteps, hidden, added_cond_kwargs=added_cond).sample
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def check(self, loss: torch.Tensor) -> None:
        # one device sync per step: the loss is logged anyway
        value = loss.item()
        if not math.isfinite(value):
            hint = (" fp16 overflows easily: try mixed_precision = \"bf16\" (or \"no\")."
                    if self.mixed_precision == "fp16" else "")
            raise TrainingError(f"the loss became {value}: the learning rate is probably too high; lower "
                                f"learning_rate / unet_lr / text_encoder_lr (e.g. by 10x).{hint} "
                                "No file was written from the broken weights.")

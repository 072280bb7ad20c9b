"""The denoising (SD 1/2/XL) and flow-matching (SD 3.5 / FLUX.1) losses, set up once from the config so the
training loop has no option branches."""

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
    multires_iterations: int = 0  # pyramid noise, as kohya's multires_noise_iterations; 0 = off
    multires_discount: float = 0.3
    debiased: bool = False  # weight 1/√SNR, https://arxiv.org/abs/2310.08442
    noise_offset_random: bool = False  # each batch's offset drawn from [0, noise_offset), as kohya's
    ip_noise_gamma: float = 0.0  # input perturbation, https://arxiv.org/abs/2301.11706 ; 0 = off
    ip_noise_random: bool = False  # each batch's γ drawn from [0, ip_noise_gamma)
    min_timestep: int = 0  # timesteps are drawn from [min_timestep, max_timestep)
    max_timestep: int | None = None  # None: the schedule's end

    def __call__(self, unet, latents, hidden, added_cond=None, generator=None) -> torch.Tensor:
        """Mean loss of one batch: noise the latents at random timesteps and score the UNet's prediction."""
        noise, timesteps, input_noise = self.draw(latents, generator)
        per_sample = self.per_sample(unet, latents, noise, timesteps, hidden, added_cond, input_noise)
        return self.reduce(per_sample, timesteps)

    def draw(self, latents: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch's noise (with the offset), timesteps and the noise its input is made with (the noise itself
        without input perturbation), in kohya's order, which every caller keeps."""
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        if self.noise_offset:
            strength = self.noise_offset
            if self.noise_offset_random:
                strength *= torch.rand(1, generator=generator).item()
            offset = torch.randn((b, latents.shape[1], 1, 1), generator=generator, dtype=latents.dtype)
            noise = noise + strength * offset.to(latents.device)
        if self.multires_iterations:
            noise = pyramid_noise(noise, self.multires_iterations, self.multires_discount, generator)
        end = self.max_timestep or self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(self.min_timestep, end, (b,), generator=generator).to(latents.device)
        return noise, timesteps, perturbed(noise, self.ip_noise_gamma, self.ip_noise_random, generator)

    def reduce(self, per_sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The batch's loss from its samples' MSE (min-SNR and / or debiased weighted when asked, in kohya's
        order); checked to be finite."""
        v = self.prediction_type == "v_prediction"
        snr = compute_snr(self.scheduler, timesteps) if self.min_snr_gamma or self.debiased else None
        if self.min_snr_gamma:
            per_sample = per_sample * snr.clamp(max=self.min_snr_gamma) / (snr + 1 if v else snr)
        if self.debiased:
            snr = snr.clamp(max=1000)  # t = 0: very large
            per_sample = per_sample * (1 / (snr + 1) if v else snr.rsqrt())
        loss = per_sample.mean()
        self.check(loss)
        return loss

    def per_sample(self, unet, latents, noise, timesteps, hidden, added_cond=None, input_noise=None) -> torch.Tensor:
        """The unweighted MSE of each sample's prediction at the given noise and timesteps; the input is made with
        `input_noise` when given (input perturbation), the target always with `noise`."""
        noisy = self.scheduler.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        pred = unet(noisy, timesteps, hidden, added_cond_kwargs=added_cond).sample
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def check(self, loss: torch.Tensor) -> None:
        check_finite_loss(loss, self.mixed_precision)


def perturbed(noise: torch.Tensor, gamma: float, random_strength: bool, generator=None) -> torch.Tensor:
    """The noise a model input is made with under input perturbation: noise + γ·ξ (kohya's ip_noise_gamma), γ drawn
    from [0, gamma) per batch with `random_strength`; `noise` itself when gamma is 0."""
    if not gamma:
        return noise
    strength = gamma * (torch.rand(1, generator=generator).item() if random_strength else 1)
    xi = torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)
    return noise + strength * xi


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator=None) -> torch.Tensor:
    """Multires noise (kohya's pyramid_noise_like): noise drawn at ever coarser scales (each 2-4x smaller, at random)
    upsampled and added with weight discount^i, then scaled back to unit variance."""
    b, c, h, w = noise.shape
    for i in range(iterations):  # i = 0 adds fresh noise of the full size at weight 1, as kohya's loop does
        r = 2 + 2 * torch.rand(1, generator=generator).item()
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = torch.randn((b, c, hn, wn), generator=generator, dtype=noise.dtype).to(noise.device)
        noise = noise + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def check_finite_loss(loss: torch.Tensor, mixed_precision: str) -> None:
    """Raise TrainingError naming the likely cause when the loss is NaN / inf."""
    # one device sync per step: the loss is logged anyway
    value = loss.item()
    if not math.isfinite(value):
        hint = (" fp16 overflows easily: try mixed_precision = \"bf16\" (or \"no\")."
                if mixed_precision == "fp16" else "")
        raise TrainingError(f"the loss became {value}: the learning rate is probably too high; lower "
                            f"learning_rate / unet_lr / text_encoder_lr (e.g. by 10x).{hint} "
                            "No file was written from the broken weights.")


TRAIN_GUIDANCE = 1.0  # FLUX.1 dev's distilled-guidance input while training (kohya sd-scripts' FLUX examples)


@dataclass
class FlowMatchingLoss:
    """Rectified flow for SD 3.5 / FLUX.1: x_t = (1 - σ)·x0 + σ·ε, the transformer predicts the velocity ε - x0.

    σ is drawn logit-normal (u = sigmoid(N(logit_mean, logit_std)), Esser et al. 2024, as diffusers'
    `compute_density_for_timestep_sampling("logit_normal")`) and shifted as the model's scheduler shifts it:
    SD 3.5 by its fixed `shift` (3.0): σ = s·u / (1 + (s - 1)·u); FLUX.1 dev by the resolution-dependent shift
    (`use_dynamic_shifting`): μ = calculate_shift(image tokens, base/max_image_seq_len, base/max_shift),
    σ = e^μ / (e^μ + 1/u - 1); FLUX.1 schnell's scheduler has shift 1 (σ = u). Plain MSE, unweighted (the
    examples' weighting_scheme "logit_normal" weighs every σ 1). Same interface as DenoisingLoss: `__call__`,
    `per_sample` (at given noise and σ), `reduce`, `check`; `added_cond` = {"pooled": pooled projections}."""

    arch: str  # "sd3" | "flux"
    shift: float = 1.0
    dynamic_shift: tuple | None = None  # FLUX.1 dev: (base_image_seq_len, max_image_seq_len, base_shift, max_shift)
    guidance: float | None = None  # FLUX.1 dev's guidance input; None: the model has no guidance embedder
    logit_mean: float = 0.0
    logit_std: float = 1.0
    num_train_timesteps: int = 1000  # SD3's transformer takes σ·1000; FLUX's takes σ and scales it itself
    mixed_precision: str = "no"
    ip_noise_gamma: float = 0.0  # input perturbation, as DenoisingLoss's
    ip_noise_random: bool = False

    @classmethod
    def for_model(cls, base, mixed_precision: str = "no", ip_noise_gamma: float = 0.0,
                  ip_noise_random: bool = False) -> FlowMatchingLoss:
        """From the base's own scheduler config and transformer (guidance embedder or not)."""
        sc = base.pipeline.scheduler.config
        dynamic = ((sc.base_image_seq_len, sc.max_image_seq_len, sc.base_shift, sc.max_shift)
                   if sc.get("use_dynamic_shifting") else None)
        guided = base.arch == "flux" and base.denoiser.config.get("guidance_embeds")
        return cls(base.arch, float(sc.shift), dynamic, TRAIN_GUIDANCE if guided else None,
                   num_train_timesteps=sc.num_train_timesteps, mixed_precision=mixed_precision,
                   ip_noise_gamma=ip_noise_gamma, ip_noise_random=ip_noise_random)

    def __call__(self, model, latents, hidden, added_cond=None, generator=None) -> torch.Tensor:
        """Mean loss of one batch: latents moved along the straight path to noise at logit-normal σ."""
        noise, sigmas, input_noise = self.draw(latents, generator)
        return self.reduce(self.per_sample(model, latents, noise, sigmas, hidden, added_cond, input_noise), sigmas)

    def draw(self, latents: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch's noise, shifted σ and the noise its input is made with, in the order every caller draws them."""
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        u = torch.sigmoid(torch.randn(latents.shape[0], generator=generator) * self.logit_std + self.logit_mean)
        sigmas = self.shifted(u, latents.shape[-2] * latents.shape[-1] // 4).to(latents.device)
        return noise, sigmas, perturbed(noise, self.ip_noise_gamma, self.ip_noise_random, generator)

    def shifted(self, u: torch.Tensor, image_tokens: int) -> torch.Tensor:
        """σ from u in (0, 1): the family's shift; `image_tokens` = (h/2)·(w/2) latent patches."""
        if self.dynamic_shift is not None:
            base_len, max_len, base_shift, max_shift = self.dynamic_shift
            mu = base_shift + (max_shift - base_shift) * (image_tokens - base_len) / (max_len - base_len)
            return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        return self.shift * u / (1 + (self.shift - 1) * u)

    def reduce(self, per_sample: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        loss = per_sample.mean()
        self.check(loss)
        return loss

    def per_sample(self, model, latents, noise, sigmas, hidden, added_cond=None, input_noise=None) -> torch.Tensor:
        """The unweighted MSE of each sample's velocity prediction at the given noise and σ (the input made with
        `input_noise` when given, as kohya's flux_train_utils perturbs it)."""
        s = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
        noisy = (1 - s) * latents + s * (noise if input_noise is None else input_noise)
        target = noise - latents
        pooled = added_cond["pooled"]
        if self.arch == "flux":
            pred, target = self.flux_forward(model, noisy, target, sigmas, hidden, pooled)
            return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2))
        pred = model(hidden_states=noisy, timestep=sigmas * self.num_train_timesteps, encoder_hidden_states=hidden,
                     pooled_projections=pooled, return_dict=False)[0]
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def flux_forward(self, model, noisy, target, sigmas, hidden, pooled) -> tuple[torch.Tensor, torch.Tensor]:
        """FLUX.1 sees latents packed into 2x2 patches with their (0, row, col) ids, text ids all zero; the
        target is packed the same way (the MSE over elements does not depend on the order)."""
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        txt_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = (None if self.guidance is None
                    else torch.full((b,), self.guidance, device=noisy.device, dtype=torch.float32))
        pred = model(hidden_states=packed, timestep=sigmas, guidance=guidance, pooled_projections=pooled,
                     encoder_hidden_states=hidden, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return pred, FluxPipeline._pack_latents(target, b, c, h, w)

    def check(self, loss: torch.Tensor) -> None:
        check_finite_loss(loss, self.mixed_precision)

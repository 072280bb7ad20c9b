"""kohya's noise options (multires noise, noise offset and input perturbation at random strength, a timestep range)
and debiased estimation: the same noise, model inputs and weights as sd-scripts computes them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors import safe_open

from tests.test_training import losses, make_run, train_run
from tests.tiny_models import BETAS
from trainer import config
from trainer.loss import DenoisingLoss, FlowMatchingLoss, pyramid_noise


def kohya_pyramid_noise_like(noise, iterations=6, discount=0.4):
    """sd-scripts' library/custom_train_functions.pyramid_noise_like, its `random.random()` drawn from torch."""
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = torch.rand(1).item() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def test_multires_noise_is_kohyas_and_coarser_than_white_noise():
    torch.manual_seed(3)
    white = torch.randn(4, 4, 32, 32)
    torch.manual_seed(4)
    ours = pyramid_noise(white.clone(), 6, 0.3)
    torch.manual_seed(4)
    assert torch.allclose(ours, kohya_pyramid_noise_like(white.clone(), 6, 0.3), atol=1e-6)
    assert ours.std().item() == pytest.approx(1.0, abs=1e-5)
    white_blocks = F.avg_pool2d(white, 8).var().item()  # the energy of 8x8 blocks: ~1/64 for white noise
    assert white_blocks == pytest.approx(1 / 64, rel=0.2) and F.avg_pool2d(ours, 8).var().item() > 1.25 * white_blocks


def test_draw_with_multires_noise_repeats_under_the_same_seed():
    loss = DenoisingLoss(DDPMScheduler(**BETAS), "epsilon", multires_iterations=6, multires_discount=0.3)
    latents = torch.zeros(2, 4, 16, 16)
    first = loss.draw(latents, torch.Generator().manual_seed(5))
    again = loss.draw(latents, torch.Generator().manual_seed(5))
    plain = DenoisingLoss(DDPMScheduler(**BETAS), "epsilon").draw(latents, torch.Generator().manual_seed(5))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.allclose(first[0], plain[0])


def kohya_noisy_latents(latents, scheduler, noise_offset, ip_noise_gamma, min_timestep, max_timestep):
    """sd-scripts' get_noise_noisy_latents_and_timesteps with both random strengths on (no adaptive noise scale)."""
    noise = torch.randn_like(latents, device=latents.device)
    offset = torch.rand(1, device=latents.device) * noise_offset
    noise = noise + offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
    timesteps = torch.randint(min_timestep, max_timestep, (latents.shape[0],), device="cpu")
    strength = torch.rand(1, device=latents.device) * ip_noise_gamma
    return noise, timesteps, scheduler.add_noise(latents, noise + strength * torch.randn_like(latents), timesteps)


class Recorder(torch.nn.Module):
    """A UNet that predicts zeros and keeps what it was given."""

    def forward(self, noisy, timesteps, hidden, added_cond_kwargs=None):
        self.seen = (noisy, timesteps)
        return type("Out", (), {"sample": torch.zeros_like(noisy)})


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_input_perturbation_and_a_timestep_range_make_kohyas_input_and_leave_the_target(prediction):
    scheduler, latents = DDPMScheduler(**BETAS), torch.randn(3, 4, 8, 8)
    torch.manual_seed(11)
    noise, timesteps, noisy = kohya_noisy_latents(latents, scheduler, 0.1, 0.2, 500, 900)
    loss = DenoisingLoss(scheduler, prediction, min_snr_gamma=0, noise_offset=0.1, noise_offset_random=True,
                         ip_noise_gamma=0.2, ip_noise_random=True, min_timestep=500, max_timestep=900)
    unet = Recorder()
    torch.manual_seed(11)
    value = loss(unet, latents, torch.zeros(3, 77, 32))
    assert torch.equal(unet.seen[1], timesteps) and torch.allclose(unet.seen[0], noisy, atol=1e-6)
    target = noise if prediction == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    assert value.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-6)  # the target holds no perturbation
    assert not torch.allclose(noisy, scheduler.add_noise(latents, noise, timesteps), atol=1e-3)


def test_timesteps_stay_in_their_range():
    loss = DenoisingLoss(DDPMScheduler(**BETAS), "epsilon", min_timestep=200, max_timestep=300)
    _, timesteps, input_noise = loss.draw(torch.zeros(4000, 1, 1, 1), torch.Generator().manual_seed(0))
    assert (timesteps.min().item(), timesteps.max().item()) == (200, 299)
    plain_noise, _, same = DenoisingLoss(DDPMScheduler(**BETAS), "epsilon").draw(torch.zeros(2, 4, 8, 8))
    assert same is plain_noise  # no perturbation: the input is made with the noise itself


def test_flow_matching_perturbs_the_input_as_kohyas_flux_train_utils():
    loss = FlowMatchingLoss("sd3", shift=3.0, ip_noise_gamma=0.5)
    latents = torch.randn(2, 4, 8, 8)
    noise, sigmas, input_noise = loss.draw(latents, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    torch.randn(latents.shape, generator=g), torch.randn(2, generator=g)  # the noise and σ's draws
    assert torch.allclose(input_noise, noise + 0.5 * torch.randn(latents.shape, generator=g))
    seen = []

    def model(hidden_states, **kw):
        seen.append(hidden_states)
        return (torch.zeros_like(hidden_states),)

    per = loss.per_sample(model, latents, noise, sigmas, None, {"pooled": None}, input_noise)
    s = sigmas.view(-1, 1, 1, 1)
    assert torch.allclose(seen[0], (1 - s) * latents + s * input_noise)
    assert torch.allclose(per, (noise - latents).pow(2).mean(dim=(1, 2, 3)))


def kohya_debiased(loss, timesteps, scheduler, v_prediction=False):
    """sd-scripts' apply_debiased_estimation, with all_snr as prepare_scheduler_for_custom_training makes it."""
    alphas = scheduler.alphas_cumprod
    all_snr = (alphas.sqrt() / (1.0 - alphas).sqrt()) ** 2
    snr_t = torch.stack([all_snr[t] for t in timesteps])
    snr_t = torch.minimum(snr_t, torch.ones_like(snr_t) * 1000)
    return (1 / (snr_t + 1) if v_prediction else 1 / torch.sqrt(snr_t)) * loss


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_debiased_estimation_weighs_as_kohya(prediction, gamma):
    scheduler = DDPMScheduler(**BETAS)
    per_sample, timesteps = torch.rand(6), torch.tensor([0, 1, 10, 200, 600, 999])
    ours = DenoisingLoss(scheduler, prediction, min_snr_gamma=gamma, debiased=True).reduce(per_sample, timesteps)
    weighted = per_sample
    if gamma:  # kohya applies min-SNR first, then the debiased weight
        snr = (scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod))[timesteps]
        weighted = weighted * snr.clamp(max=gamma) / (snr + 1 if prediction == "v_prediction" else snr)
    expected = kohya_debiased(weighted, timesteps, scheduler, prediction == "v_prediction").mean()
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_run_with_both_trains_and_says_so_in_its_file(tiny_models, tmp_path):
    run_dir, _ = make_run(tmp_path, tiny_models["sd1"][1], {"training": {
        "max_train_epochs": 1, "multires_noise_iterations": 6, "multires_noise_discount": 0.3,
        "debiased_estimation_loss": True, "noise_offset": 0.05, "noise_offset_random_strength": True,
        "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True, "min_timestep": 100, "max_timestep": 900}})
    final = train_run(run_dir)
    assert len(losses(run_dir)) == 3 and all(torch.isfinite(torch.tensor(list(losses(run_dir).values()))))
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_multires_noise_iterations"], meta["ss_multires_noise_discount"],
            meta["ss_debiased_estimation"]) == ("6", "0.3", "True")
    assert (meta["ss_ip_noise_gamma"], meta["ss_ip_noise_gamma_random_strength"],
            meta["ss_noise_offset_random_strength"], meta["ss_min_timestep"], meta["ss_max_timestep"]) == (
        "0.1", "True", "True", "100", "900")


def test_a_timestep_range_must_be_a_range():
    with pytest.raises(config.ConfigError, match="training.min_timestep = 600: must be below max_timestep .500."):
        config.build("character", "sd15", {"training": {"min_timestep": 600, "max_timestep": 500}})
    with pytest.raises(config.ConfigError, match="training.max_timestep = 0: must be >= 1"):
        config.build("character", "sd15", {"training": {"max_timestep": 0}})


@pytest.mark.parametrize("field, value", [("multires_noise_iterations", 6), ("debiased_estimation_loss", True),
                                          ("min_timestep", 200), ("zero_terminal_snr", True)])
def test_flow_models_refuse_them(field, value):
    with pytest.raises(config.ConfigError, match=f"training.{field} = .*flow matching"):
        config.build("character", "flux", {"training": {field: value}})


def kohya_zero_terminal_snr(scheduler: DDPMScheduler) -> DDPMScheduler:
    """sd-scripts' custom_train_functions.fix_noise_scheduler_betas_for_zero_terminal_snr, line for line."""
    alphas_bar_sqrt = (1 - scheduler.betas).cumprod(0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    betas = 1 - torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    scheduler.betas, scheduler.alphas = betas, 1.0 - betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    return scheduler


def test_zero_terminal_snr_trains_the_schedule_sd_scripts_trains(tiny_models, tmp_path):
    """A v-prediction run with zero_terminal_snr: its schedule is sd-scripts' rescaled one (the last timestep pure
    noise), min-SNR weighting stays finite at SNR 0, the file says so; an ε model is refused by name."""
    from trainer.setup import make_loss
    from trainer.loading import load_base

    layer = {"model": {"prediction_type": "v_prediction"},
             "training": {"max_train_epochs": 1, "zero_terminal_snr": True, "min_snr_gamma": 5.0}}
    run_dir, cfg = make_run(tmp_path, tiny_models["sd1"][1], layer)
    base = load_base(tiny_models["sd1"][1], prediction_type="v_prediction")
    ours = make_loss(cfg, base, type("Acc", (), {"mixed_precision": "no"})()).scheduler
    theirs = kohya_zero_terminal_snr(DDPMScheduler.from_config(base.pipeline.scheduler.config))
    assert ours.alphas_cumprod[-1].item() == 0 and theirs.alphas_cumprod[-1].item() < 1e-12
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-5, atol=1e-7)
    final = train_run(run_dir)
    assert len(losses(run_dir)) == 3 and all(torch.isfinite(torch.tensor(list(losses(run_dir).values()))))
    with safe_open(str(final), "pt") as f:
        assert f.metadata()["ss_zero_terminal_snr"] == "True"
    epsilon = config.build("character", "sd15", {"training": {"zero_terminal_snr": True}})
    with pytest.raises(config.ConfigError, match=r"training.zero_terminal_snr = true: it is for v-prediction models "
                                                 r"and this base is SD 1.x, epsilon; set it false"):
        make_loss(epsilon, load_base(tiny_models["sd1"][1]), None)

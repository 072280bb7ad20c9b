"""kohya's multires noise and debiased estimation: the same noise and weights as sd-scripts computes them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors import safe_open

from tests.test_training import losses, make_run, train_run
from tests.tiny_models import BETAS
from trainer import config
from trainer.loss import DenoisingLoss, pyramid_noise


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
        "debiased_estimation_loss": True}})
    final = train_run(run_dir)
    assert len(losses(run_dir)) == 3 and all(torch.isfinite(torch.tensor(list(losses(run_dir).values()))))
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_multires_noise_iterations"], meta["ss_multires_noise_discount"],
            meta["ss_debiased_estimation"]) == ("6", "0.3", "True")


@pytest.mark.parametrize("field, value", [("multires_noise_iterations", 6), ("debiased_estimation_loss", True)])
def test_flow_models_refuse_them(field, value):
    with pytest.raises(config.ConfigError, match=f"training.{field} = .*flow matching"):
        config.build("character", "flux", {"training": {field: value}})

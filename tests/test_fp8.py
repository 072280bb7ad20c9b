"""model.unet_quantization = "fp8" (issue #17, point 4): the frozen denoiser stored in float8 e4m3 and cast up layer by
layer as it runs (diffusers' layerwise casting), the adapter in fp32. On the tiny FLUX.1, SD 3.5 and SD 1.5 models on
CPU: the linear layers' weights really are fp8 at rest (norms, embeddings, convolutions and the adapter not), the run trains to a file of the same
keys, its losses are near the full-precision run's but not equal to them (the rounding is really applied)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from tests.test_flow_training import FLOW_TINY, flow  # noqa: F401 (flow: the tiny FLUX.1 / SD 3.5 models)
from tests.test_training import TINY, draw_dataset, losses
from trainer import config, methods, sweep_space
from trainer.events import read_all
from trainer.quantize import FP8
from trainer.setup import setup
from trainer.train import train

FEW = {"training": {"max_train_epochs": 0, "max_train_steps": 4, "save_every_n_epochs": 0}}


def fp8_config(tmp_path, arch: str, base, quantization: str, *more: dict):
    dataset = draw_dataset(tmp_path / "pictures")
    family = "sd15" if arch == "sd1" else arch
    layers = [TINY, FLOW_TINY if arch != "sd1" else {}, FEW,
              {"model": {"pretrained_model_name_or_path": str(base), "unet_quantization": quantization},
               "data": {"train_data_dir": str(dataset)}}, *more]
    return config.build("character", family, *layers)


def base_of(arch: str, flow, tiny_models):  # noqa: F811
    return tiny_models["sd1"][0] if arch == "sd1" else flow[arch]["folder"]


@pytest.mark.parametrize("arch", ["flux", "sd3", "sd1"])
def test_the_frozen_layers_are_held_in_fp8_and_the_adapter_is_not(flow, tiny_models, tmp_path, arch):  # noqa: F811
    run = setup(fp8_config(tmp_path, arch, base_of(arch, flow, tiny_models), "fp8"), tmp_path / "run")
    denoiser = run.base.denoiser
    stored = {name: m.weight.dtype for name, m in denoiser.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and "lora_" not in name}
    in_fp8 = [n for n, d in stored.items() if d == FP8]
    kept = {n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Conv2d) or "norm" in n or "pos_embed" in n}
    blocks = [n for n in stored if ".attn" in n and "to_" in n or ".ff" in n]  # attention and MLP projections
    assert blocks and set(blocks) <= set(in_fp8) and not set(in_fp8) & kept
    assert all(stored[n] == torch.float32 for n in kept if n in stored)  # kept as computed
    assert all(p.dtype == torch.float32 for p in run.params)  # the adapter trains in full precision
    said = [e["message"] for e in read_all(run.run_dir) if e["type"] == "status"]
    assert any(f"held in fp8 ({len(in_fp8)} layers, computed in float32)" in m for m in said), said


@pytest.mark.parametrize("arch", ["flux", "sd1"])
def test_an_fp8_base_trains_a_file_like_the_full_precision_one(flow, tiny_models, tmp_path, arch):  # noqa: F811
    base = base_of(arch, flow, tiny_models)
    runs = {}
    for quantization in ("none", "fp8"):
        run_dir = tmp_path / quantization
        train(fp8_config(tmp_path / f"data-{quantization}", arch, base, quantization), run_dir)
        runs[quantization] = (losses(run_dir), load_file(str(run_dir / "output" / "lora.safetensors")))
    (full, full_file), (fp8, fp8_file) = runs["none"], runs["fp8"]
    assert list(fp8) == list(full) == [1, 2, 3, 4] and all(math.isfinite(v) for v in fp8.values())
    assert {k: v.shape for k, v in fp8_file.items()} == {k: v.shape for k, v in full_file.items()}
    gaps = [abs(fp8[s] - full[s]) / full[s] for s in full]
    print(f"{arch}: fp8 losses {max(gaps):.3%} from full precision at most")
    assert 0 < max(gaps) < 0.1, gaps


@pytest.mark.parametrize("method", [m for m in methods.names(trained_through="peft") if m != "locon"])  # no convs
def test_every_peft_method_trains_on_an_fp8_base(flow, tmp_path, method):  # noqa: F811
    """fp8 is offered with every peft method: each trains on FLUX.1's fp8 transformer to finite losses and a file
    (VeRA failed: peft's input-casting switch, which diffusers' layerwise casting flips, assumed a flag it lacks)."""
    cfg = fp8_config(tmp_path, "flux", flow["flux"]["folder"], "fp8", {"network": {"network_type": method}})
    final = train(cfg, tmp_path / "run")
    steps = losses(tmp_path / "run")
    assert list(steps) == [1, 2, 3, 4] and all(math.isfinite(v) for v in steps.values()), steps
    assert final is not None and load_file(str(final))


def test_a_sweep_refuses_an_fp8_base(tiny_models, tmp_path):
    cfg = fp8_config(tmp_path, "sd1", tiny_models["sd1"][0], "fp8")
    base = config.deep_merge(config.to_dict(cfg), {"data": {"validation_split": 0.34}})
    with pytest.raises(config.ConfigError, match="model.unet_quantization = 'fp8'"):
        sweep_space.check(base, {"network_dim": {"values": [4, 8]}}, "grid", 0)

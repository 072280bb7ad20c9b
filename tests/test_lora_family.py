"""The LoRA family trained for real on the tiny models: each method's file holds exactly its trained update under
kohya's names, loads where LoRA files load, and the options around them (bias modes, QLoRA) do what they say."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from tests import lora_files
from tests.test_networks import assert_header_holds_the_tensors, base_weights
from tests.test_training import losses, make_run
from trainer import config
from trainer.checkpoint import latest, load_adapter
from trainer.loading import load_base
from trainer.methods import CATALOG
from trainer.networks import create, find_targets
from trainer.train import train

pytestmark = pytest.mark.slow


def trained(tiny_models, tmp_path, arch: str, network: dict, form: int = 1):
    """Train 6 steps; return (run dir, config, final file, the network re-made from the run's last state)."""
    run_dir, cfg = make_run(tmp_path, tiny_models[arch][form], {"network": network})
    final = train(cfg, run_dir)
    steps = losses(run_dir)
    assert len(steps) == 6 and all(torch.isfinite(torch.tensor(v)) for v in steps.values()), steps
    model = load_base(tiny_models[arch][form])
    names = ["text_encoder", "text_encoder_2"][: len(model.text_encoders)]
    net = create(cfg.network, arch, {"unet": model.unet} | dict(zip(names, model.text_encoders)), total_steps=6)
    load_adapter(latest(run_dir), net)
    return run_dir, cfg, final, net


def unused_by_sdxl(name: str, names: list[str]) -> bool:
    """SDXL conditions on CLIP-L's penultimate layer: its last layer gets no gradient and keeps a zero update."""
    layer = re.compile(r"lora_te1_text_model_encoder_layers_(\d+)_")
    last = max((int(m.group(1)) for n in names if (m := layer.match(n))), default=-1)
    return name.startswith(f"lora_te1_text_model_encoder_layers_{last}_")


def assert_file_is_the_update(final, net, fresh) -> dict:
    stored = lora_files.modules(final)
    assert set(stored) == set(net.names())
    for name, params in stored.items():
        assert name in fresh, f"{name} maps to no module of the base"
        want = net.delta(name)
        assert want.shape == fresh[name].shape, name
        assert want.abs().max() > 0 or unused_by_sdxl(name, list(stored)), f"{name} did not train"
        got = lora_files.delta(params, fresh[name].shape, fresh[name])
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item(), name
    with safe_open(str(final), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("arch, kind", [("sd1", "dora"), ("sdxl", "dora"), ("sd1", "vera"), ("sd2", "vera"),
                                        ("sd1", "adalora"), ("sdxl", "adalora"), ("sd1", "rslora"),
                                        ("sd1", "lora_fa")])  # its frozen A comes back from the checkpoint
def test_a_method_trains_and_its_file_is_its_update(tiny_models, tmp_path, arch, kind):
    network = {"network_type": kind, "conv_dim": 0 if CATALOG[kind].convs == "never" else 2, "conv_alpha": 1.0}
    _, _, final, net = trained(tiny_models, tmp_path, arch, network)
    meta = assert_file_is_the_update(final, net, base_weights(load_base(tiny_models[arch][1])))
    assert_header_holds_the_tensors(final, {t.name for t in net.targets.values() if t.conv3x3})
    assert (meta["ss_network_dim"] == "Dynamic") == CATALOG[kind].dynamic_rank
    args = json.loads(meta["ss_network_args"])
    stored = lora_files.modules(final)
    if kind == "dora":  # LyCORIS' names, with the magnitude per input channel that both UIs read
        assert meta["ss_network_module"] == "lycoris.kohya" and args["dora_wd"] == "True"
        assert meta["modelspec.architecture"].endswith("/lycoris")
        for name, params in stored.items():
            assert params["dora_scale"].shape[0] == 1 and params["dora_scale"].shape[1] == params[
                "lora_down.weight"].shape[1], name
    else:
        assert meta["ss_network_module"] == "networks.lora" and args["trained_as"] == kind
        assert all(set(p) == {"lora_down.weight", "lora_up.weight", "alpha"} for p in stored.values())
    if kind == "adalora":  # ranks re-allocated: they differ per module and average the target
        ranks = [p["lora_down.weight"].shape[0] for p in stored.values()]
        assert len(set(ranks)) > 1 and max(ranks) <= 6, ranks  # init_r = ceil(1.5 x 4)
        assert sum(ranks) <= 4 * len(ranks), ranks
    if kind == "vera":  # one shared random A per component: every layer's lora_down is a slice of it
        downs = [p["lora_down.weight"] for n, p in stored.items() if n.startswith("lora_unet")]
        widest = max(downs, key=lambda d: d.shape[1])
        assert all(torch.equal(d, widest[:, : d.shape[1]]) for d in downs)


@pytest.mark.parametrize("kind", ["vera", "adalora", "rslora", "lora_fa"])
def test_lora_shaped_files_load_in_diffusers(tiny_models, tmp_path, caplog, kind):
    network = {"network_type": kind, "conv_dim": 0}
    fast = {"optimizer": {"learning_rate": 1e-2, "unet_lr": 1e-2, "text_encoder_lr": 1e-2}}  # VeRA's usual rate
    run_dir, cfg = make_run(tmp_path, tiny_models["sd1"][1], {"network": network}, fast)
    final = train(cfg, run_dir)
    model = load_base(tiny_models["sd1"][0])
    pipe = model.pipeline

    def image():
        return pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    before = image()
    components = {"unet": model.unet, "text_encoder": model.text_encoders[0]}
    layers = {t.name: t for t in find_targets("sd1", components, with_convs=False)}
    caplog.clear()
    pipe.load_lora_weights(str(final))
    complaints = [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    assert not [m for m in complaints if "unexpected" in m.lower() or "not loaded" in m.lower()], complaints
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder"}
    assert abs(image() - before).max() > 1e-4
    for name, params in lora_files.modules(final).items():  # diffusers applies each module at the file's scale
        layer = components[layers[name].component].get_submodule(layers[name].path)
        got = layer.get_delta_weight(next(iter(layer.lora_A))).float()
        want = lora_files.delta(params, got.shape)
        assert (got - want).norm() <= 1e-3 * want.norm(), name


def test_bias_modes_train_biases_the_file_leaves_out(tiny_models, tmp_path):
    base = load_base(tiny_models["sd1"][1])
    for mode in ("lora_only", "all"):
        run_dir, cfg, final, net = trained(tiny_models, tmp_path / mode, "sd1", {"network_bias": mode})
        unet = net.components["unet"]
        q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
        trained_bias = unet.get_submodule(q).base_layer.bias
        assert trained_bias.requires_grad and not torch.equal(trained_bias, base.unet.get_submodule(q).bias)
        norm = unet.get_submodule("down_blocks.0.attentions.0.norm").bias  # not an adapted layer
        assert torch.equal(norm, base.unet.get_submodule("down_blocks.0.attentions.0.norm").bias) == (
            mode == "lora_only")
        assert not any("bias" in k or k.endswith("diff_b") for k in lora_files.modules(final)), "no bias keys"
        assert_file_is_the_update(final, net, base_weights(base))


def test_bias_modes_and_quantization_are_refused_where_they_cannot_apply():
    with pytest.raises(config.ConfigError, match=r"network_bias = 'all': peft's bias mode works with lora, locon"):
        config.build("lokr", "sd15", {"network_bias": "all"})
    with pytest.raises(config.ConfigError, match="model.unet_quantization = 'nf4': a quantized UNet"):
        config.build("character", "sd15", {"network_type": "loha", "unet_quantization": "nf4"})
    with pytest.raises(config.ConfigError, match=r"network\.prune_energy = 0\.9: pruning reduces LoRA-form files"):
        config.build("character", "sd15", {"network_type": "dora", "prune_energy": 0.9})
    with pytest.raises(config.ConfigError, match=r"network\.loraplus_lr_ratio = 16\.0: LoRA\+ speeds up"):
        config.build("character", "sd15", {"network_type": "vera", "loraplus_lr_ratio": 16})
    with pytest.raises(config.ConfigError, match="vera adapts linear layers only"):
        config.build("character", "sd15", {"network_type": "vera", "conv_dim": 4})


def test_qlora_without_bitsandbytes_and_cuda_says_why(tiny_models, tmp_path):
    from trainer.__main__ import user_message
    from trainer.quantize import QuantizationUnavailable

    run_dir, cfg = make_run(tmp_path, tiny_models["sd1"][1], {"model": {"unet_quantization": "nf4"}})
    with pytest.raises(QuantizationUnavailable) as info:
        train(cfg, run_dir)
    message = user_message(info.value)
    assert 'model.unet_quantization = "nf4" (QLoRA) needs' in message and "a CUDA GPU (this run is on cpu)" in message
    assert 'set it to "none"' in message
    assert not (run_dir / "output").exists()  # nothing half-written


def test_pruning_when_saving_keeps_the_energy_asked_and_records_it(tiny_models, tmp_path):
    network = {"network_type": "locon", "conv_dim": 4, "conv_alpha": 2.0, "network_dim": 8, "prune_energy": 0.6}
    run_dir, cfg = make_run(tmp_path / "pruned", tiny_models["sd1"][1], {"network": network})
    pruned = train(cfg, run_dir)
    full_dir, full_cfg = make_run(tmp_path / "full", tiny_models["sd1"][1], {"network": network | {"prune_energy": 0}})
    full = train(full_cfg, full_dir)
    assert pruned.stat().st_size < 0.9 * full.stat().st_size
    small, big = lora_files.modules(pruned), lora_files.modules(full)
    assert set(small) == set(big)  # the same run (same seed), only reduced
    shapes = base_weights(load_base(tiny_models["sd1"][1]))
    for name in big:
        want = lora_files.delta(big[name], shapes[name].shape).flatten(1).double()
        sigma = torch.linalg.svdvals(want)
        got = lora_files.delta(small[name], shapes[name].shape).flatten(1).double()
        kept = small[name]["lora_down.weight"].shape[0]
        dropped = float(sigma[kept:].square().sum())
        assert float((want - got).norm() ** 2) == pytest.approx(dropped, rel=1e-3, abs=1e-12), name
        assert sigma[:kept].square().sum() >= 0.6 * sigma.square().sum() - 1e-12, name
    with safe_open(str(pruned), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_resize"])["energy"] == 0.6 and meta["ss_network_dim"] == "Dynamic"
    assert_header_holds_the_tensors(pruned, {n for n, p in small.items() if p["lora_down.weight"].shape[-1] == 3})


def test_adalora_resumed_after_its_budget_is_fixed_keeps_the_masked_ranks(tiny_models):
    """A resumed run has no rank pattern in memory: it is read back from E's zeros, then enforced."""
    from tests.test_networks import components, net_config, randomize

    net = create(net_config("adalora"), "sd1", components(load_base(tiny_models["sd1"][1])), total_steps=10)
    randomize(net)
    name = next(iter(net.names()))
    e = net.layer(name).lora_E["default"]
    with torch.no_grad():
        e[0] = 0.0  # as the budget left it before the checkpoint
    net.after_step(9)  # past total - tfinal = 8: the final phase
    pattern = net.tuners["unet"].peft_config["default"].rank_pattern
    assert pattern[f"{net.targets[name].path}.lora_E.default"][0] is False
    assert sum(map(sum, pattern.values())) == sum(p.numel() for n, p in net.components["unet"].named_parameters()
                                                  if "lora_E" in n) - 1
    with torch.no_grad():
        e[0] = 1.0  # an optimizer step moved it
    net.after_step(10)
    assert e[0].item() == 0.0

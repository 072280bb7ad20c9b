"""Every adapter method through the same checks: it wraps kohya's targets, changes the output, and its exported file
reproduces its weight update under the names ComfyUI, WebUI and diffusers read."""

import json
from dataclasses import replace

import pytest
import torch

from tests import lora_files
from tests.conftest import ARCHES
from trainer.config import NetworkConfig
from trainer.export import to_kohya, save_atomic
from trainer.loading import load_base
from trainer.methods import CATALOG
from trainer.networks import NETWORKS, create, find_targets

KINDS = sorted(NETWORKS)


def net_config(kind: str, **over) -> NetworkConfig:
    values = dict(network_type=kind, network_dim=4, network_alpha=2.0, conv_alpha=1.0, network_dropout=0.0,
                  lokr_factor=4, conv_dim=0 if CATALOG[kind].convs == "never" else 2)
    return NetworkConfig(**(values | over))


def components(model) -> dict:
    names = ["text_encoder", "text_encoder_2"][: len(model.text_encoders)]
    return {"unet": model.unet} | dict(zip(names, model.text_encoders))


def randomize(net) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for c in net.components:
            for p in net.parameters_of(c):
                p.add_(torch.randn_like(p) * 0.05)


def base_weights(arch_model) -> dict[str, torch.Tensor]:
    """kohya name -> weight of that module in an untouched base model (every conv included)."""
    return {t.name: arch_model_module(arch_model, t).weight for t in
            find_targets(arch_model.arch, components(arch_model), with_convs=True)}


def arch_model_module(model, target):
    return components(model)[target.component].get_submodule(target.path)


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("kind", KINDS)
def test_export_reproduces_the_update(tiny_models, tmp_path, arch, kind):
    model = load_base(tiny_models[arch][1])
    fresh = base_weights(load_base(tiny_models[arch][1]))
    net = create(net_config(kind), arch, components(model))
    assert net.counts()["unet"] > 0 and all(net.counts()[c] > 0 for c in components(model))
    randomize(net)
    path = save_atomic(to_kohya(net, torch.float32), {"ss_network_module": "x"}, tmp_path / "out.safetensors")
    stored = lora_files.modules(path)
    assert set(stored) == set(net.names())
    for name, params in stored.items():
        assert name in fresh, f"{name} maps to no module of the base"
        want = net.delta(name)
        assert want.shape == fresh[name].shape
        got = lora_files.delta(params, fresh[name].shape, fresh[name])
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), name
        assert params["alpha"].dim() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_changes_output_and_multiplier_zero_restores_it(tiny_models, kind):
    model = load_base(tiny_models["sd1"][1])
    latents, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)

    def out():
        with torch.no_grad():
            return model.unet(latents, torch.tensor([10]), context).sample

    before = out()
    net = create(net_config(kind), "sd1", components(model))
    randomize(net)
    assert (out() - before).abs().max() > 1e-4
    net.set_multiplier(0.0)
    assert torch.allclose(out(), before, atol=1e-6)
    net.set_multiplier(1.0)
    assert (out() - before).abs().max() > 1e-4


def test_plain_lora_targets_no_3x3_conv_and_locon_does(tiny_models):
    model = load_base(tiny_models["sd1"][1])
    lora = {t.name: t for t in find_targets("sd1", components(model), with_convs=False)}
    locon = {t.name: t for t in find_targets("sd1", components(model), with_convs=True)}
    assert not any(t.conv3x3 for t in lora.values())
    assert set(lora) < set(locon)
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in locon and locon["lora_unet_down_blocks_0_resnets_0_conv1"].conv3x3
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in lora
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in lora


def test_sdxl_names_are_sgm(tiny_models):
    model = load_base(tiny_models["sdxl"][1])
    names = {t.name for t in find_targets("sdxl", components(model), with_convs=True)}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_proj_in" in names
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_k" in names
    assert "lora_unet_input_blocks_1_0_in_layers_2" in names  # a res-block conv (LoCon)
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc1" in names
    assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj" in names
    assert not any("down_blocks" in n or "up_blocks" in n for n in names)


def test_lokr_never_writes_tucker(tiny_models):
    model = load_base(tiny_models["sd1"][1])
    net = create(net_config("lokr", conv_dim=8), "sd1", components(model))
    assert not any(k.endswith("lokr_t2") for k in to_kohya(net, torch.float16))


@pytest.mark.parametrize("arch, te_count, unet_count", [("sd1", 72, 192), ("sdxl", 264, 722)])
def test_full_size_module_counts_match_kohya(arch, te_count, unet_count):
    """Full-size models from the shipped configs, on the meta device: kohya sd-scripts wraps exactly this many."""
    import json

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.single_file import MODEL_CONFIGS

    def te(name, cls):
        return cls(CLIPTextConfig(**json.loads((MODEL_CONFIGS / arch / name / "config.json").read_text())))

    with init_empty_weights():
        comps = {"unet": UNet2DConditionModel.from_config(json.loads((MODEL_CONFIGS / arch / "unet" / "config.json")
                                                                     .read_text())),
                 "text_encoder": te("text_encoder", CLIPTextModel)}
        if arch == "sdxl":
            comps["text_encoder_2"] = te("text_encoder_2", CLIPTextModelWithProjection)
    targets = find_targets(arch, comps, with_convs=False)
    assert sum(t.component == "unet" for t in targets) == unet_count
    assert sum(t.component != "unet" for t in targets) == te_count
    assert len({t.name for t in targets}) == len(targets)
    names = {t.name for t in targets}
    if arch == "sd1":
        assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2" in names
        assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in names
    else:
        assert "lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_0_proj" in names
        assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0" in names
        assert "lora_te2_text_model_encoder_layers_31_self_attn_v_proj" in names


def stored_rank(params: dict[str, torch.Tensor]) -> tuple[int, float] | None:
    """(rank, alpha) as a loader scales the module by alpha / rank (tests/lora_files.delta); None for a LoKr
    module whose factors are both full (applied at scale 1)."""
    for key in ("lora_down.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
        if key in params:
            return params[key].shape[0], float(params["alpha"])
    return None


def assert_header_holds_the_tensors(path, conv3x3: set[str]) -> dict[str, str]:
    """ss_network_dim / ss_network_alpha are the linear modules' rank and alpha, ss_network_args' conv_dim /
    conv_alpha the 3x3 convs' ("Dynamic" where modules differ); no conv keys in a file without convs."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    ranks = {name: stored_rank(params) for name, params in lora_files.modules(path).items()}
    args = json.loads(meta["ss_network_args"])

    def header(values: list) -> str:
        return str(values[0]) if len(set(values)) == 1 else "Dynamic"

    linear = [r for n, r in ranks.items() if r and n not in conv3x3]
    conv = [r for n, r in ranks.items() if r and n in conv3x3]
    assert meta["ss_network_dim"] == header([r for r, _ in linear])
    assert meta["ss_network_alpha"] == header([a for _, a in linear])
    if conv:
        assert (args["conv_dim"], args["conv_alpha"]) == (header([r for r, _ in conv]), header([a for _, a in conv]))
    elif not set(ranks) & conv3x3:
        assert "conv_dim" not in args and "conv_alpha" not in args
    return meta


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("kind", KINDS)
def test_the_header_says_the_rank_and_alpha_the_tensors_hold(tiny_models, tmp_path, arch, kind):
    """The config asks for dim 8 / alpha 4; rsLoRA stores alpha 4·√8 and VeRA alpha = rank: the header follows."""
    model = load_base(tiny_models[arch][1])
    cfg = net_config(kind, network_dim=8, network_alpha=4.0)
    net = create(cfg, arch, components(model))
    asked = {"ss_network_dim": "8", "ss_network_alpha": "4.0", "ss_network_args": json.dumps(net.network_args())}
    path = save_atomic(to_kohya(net, torch.float16), asked, tmp_path / "out.safetensors")
    meta = assert_header_holds_the_tensors(path, {t.name for t in net.targets.values() if t.conv3x3})
    if kind in ("rslora", "vera"):
        assert float(meta["ss_network_alpha"]) == pytest.approx(4 * 8 ** 0.5 if kind == "rslora" else 8.0, rel=1e-6)


def kohya_max_norm(state: dict[str, torch.Tensor], max_norm_value: float) -> tuple[dict, int, list[float]]:
    """sd-scripts' LoRANetwork.apply_max_norm_regularization (networks/lora.py) on a kohya state dict, line for line:
    (the scaled state, keys scaled, the norms after)."""
    state, keys_scaled, norms = {k: v.clone() for k, v in state.items()}, 0, []
    for down_key in [k for k in state if "lora_down" in k and "weight" in k]:
        up_key, alpha_key = down_key.replace("lora_down", "lora_up"), down_key.replace("lora_down.weight", "alpha")
        down, up, alpha = state[down_key], state[up_key], state[alpha_key]
        scale = alpha / down.shape[0]
        if up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
            updown = (up.squeeze(2).squeeze(2) @ down.squeeze(2).squeeze(2)).unsqueeze(2).unsqueeze(3)
        elif up.shape[2:] == (3, 3) or down.shape[2:] == (3, 3):
            updown = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            updown = up @ down
        updown *= scale
        norm = updown.norm().clamp(min=max_norm_value / 2)
        desired = torch.clamp(norm, max=max_norm_value)
        ratio = desired.cpu() / norm.cpu()
        if ratio != 1:
            keys_scaled += 1
            state[up_key] *= ratio ** 0.5
            state[down_key] *= ratio ** 0.5
        norms.append((updown.norm() * ratio).item())
    return state, keys_scaled, norms


def deltas(net) -> dict[str, torch.Tensor]:
    return {name: net.delta(name).float().clone() for name in net.names()}


@pytest.mark.parametrize("kind", ["lora", "locon", "rslora", "lora_fa"])
def test_max_norm_scales_what_sd_scripts_scales(tiny_models, kind):
    """scale_weight_norms on the LoRA-form methods: the modules above the limit come out as sd-scripts' arithmetic
    leaves them (their file's factors equal to 1e-6), the others untouched; the step's figures are kohya's."""
    model = load_base(tiny_models["sd1"][1])
    net = create(net_config(kind), "sd1", components(model))
    randomize(net)
    before = deltas(net)
    file_before = {key: t.clone() for key, t in to_kohya(net, torch.float32).items()}  # it may share the weights
    norms = {name: float(d.norm()) for name, d in before.items()}
    limit = sorted(norms.values())[len(norms) // 2]  # half the modules above it
    net.cfg = replace(net.cfg, scale_weight_norms=limit)
    figures = net.max_norm()
    theirs, keys_scaled, their_norms = kohya_max_norm(file_before, limit)
    assert figures["keys_scaled"] == keys_scaled == sum(n > limit for n in norms.values()) >= len(norms) // 2 - 1
    assert figures["mean_norm"] == pytest.approx(sum(their_norms) / len(their_norms), rel=1e-5)
    assert figures["max_norm"] == pytest.approx(limit, rel=1e-5)
    after = deltas(net)
    for name, delta in after.items():
        if norms[name] > limit:
            assert float(delta.norm()) == pytest.approx(limit, rel=1e-5)
            torch.testing.assert_close(delta, before[name] * (limit / norms[name]), rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(delta, before[name])
    ours = to_kohya(net, torch.float32)
    if kind in ("lora", "locon"):  # the same factors, not only the same products
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-8)
    again = net.max_norm()  # at the limit now: moved by rounding at most (kohya counts those as scaled too)
    assert again["max_norm"] == pytest.approx(limit, rel=1e-6)
    for name, delta in deltas(net).items():
        torch.testing.assert_close(delta, after[name], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_max_norm_on_lycoris_methods_is_lycoris_own(tiny_models, kind):
    """LyCORIS modules are scaled by LyCORIS' apply_max_norm, as sd-scripts does for a LyCORIS network: afterwards no
    module's own update is above the limit, and the modules below it are unchanged."""
    model = load_base(tiny_models["sd1"][1])
    net = create(net_config(kind), "sd1", components(model))
    randomize(net)
    own = {name: float(m.apply_max_norm(1e9)[1]) for name, m in net.modules.items()}  # a limit nothing reaches
    limit = sorted(own.values())[len(own) // 2]
    net.cfg = replace(net.cfg, scale_weight_norms=limit)
    before = deltas(net)
    figures = net.max_norm()
    assert figures["keys_scaled"] == sum(n > limit for n in own.values()) > 0
    after = {name: float(m.apply_max_norm(1e9)[1]) for name, m in net.modules.items()}
    assert max(after.values()) <= limit * (1 + 1e-5) and figures["max_norm"] == pytest.approx(max(after.values()))
    unchanged = [name for name, n in own.items() if n <= limit]
    assert unchanged and all(torch.equal(net.delta(name).float(), before[name]) for name in unchanged)


def test_max_norm_is_off_at_zero_and_refused_where_it_cannot_work(tiny_models):
    from trainer import config

    model = load_base(tiny_models["sd1"][1])
    net = create(net_config("lora"), "sd1", components(model))
    randomize(net)
    assert net.max_norm() == {}
    with pytest.raises(config.ConfigError, match=r"network.scale_weight_norms = 1.0: it works with lora, locon, "
                                                 r"loha, lokr, dora, rslora, lora_fa, not with 'vera'"):
        config.build("character", "sd15", {"network_type": "vera", "scale_weight_norms": 1.0})

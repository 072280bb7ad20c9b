"""Text-encoder LoRA on SD 3.5 / FLUX.1 (issue #17): with text_encoder_lr > 0 the CLIP encoders (FLUX.1 CLIP-L,
SD 3.5 CLIP-L and CLIP-G) train with the transformer, never T5; their captions go through the adapted CLIP every
step while T5's part is cached; the file holds the CLIP modules under kohya's lora_te1 / lora_te2 (FLUX.1) or
diffusers' text_encoder(_2).text_model (SD 3.5), which ComfyUI's key logic maps and diffusers' load_lora_weights
applies; a cancelled run resumes to the uninterrupted losses."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from tests.test_flow_names import (comfy_apply_kohya, comfy_apply_lycoris, comfy_clip_keys, comfy_lycoris_keys,
                                   comfy_unet_keys, te_out)
from tests.test_flow_training import (FAMILIES, assert_file_holds_the_update, assert_resume_reproduces,  # noqa: F401
                                      flow, make_flow_run, updated)
from tests.test_training import losses
from tests.tiny_models import flux_to_original, hf_clip, sd3_to_original
from trainer import config, flow_names, text
from trainer.kohya_names import by_module
from trainer.loading import load_base
from trainer.loss import FlowMatchingLoss
from trainer.networks import create
from trainer.setup import FLOW_CLIPS, setup
from trainer.train import StopFlag, finish, loop
from trainer.transformer_files import flux_to_diffusers

TE_LR = 3e-3  # the tiny CLIP moves visibly in a few steps; not the transformer's 2e-3 (FLOW_TINY)
TE_ON = {"network": {"network_train_unet_only": False}, "optimizer": {"text_encoder_lr": TE_LR}}
TOL = 1e-5
T5 = {"flux": "text_encoder_2", "sd3": "text_encoder_3"}
FLOW_TINY_LR = 2e-3  # tests/test_flow_training.py FLOW_TINY's unet_lr
CLIP_NAME = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


def clips(pipe, arch: str) -> dict:
    return {c: getattr(pipe, c) for c in FLOW_CLIPS[arch]}


def trained_run(tmp_path, flow, arch: str, *layers: dict):
    """A whole run with text-encoder LoRA, kept in memory: (the Run after training, its final file)."""
    run_dir, cfg = make_flow_run(tmp_path, arch, flow[arch]["folder"], TE_ON, *layers)
    run = setup(config.load(run_dir / "config.toml"), run_dir)
    initial = {k: v.clone() for k, v in run.net.state_dict().items()}
    assert loop(run, StopFlag())
    return run, finish(run), initial


def te_deltas(net) -> dict:
    return {name: net.delta(name) for name in net.names() if not name.startswith("transformer.")}


@pytest.mark.parametrize("arch", FAMILIES)
def test_clip_encodes_as_the_pipeline_from_a_cached_t5_part(flow, arch):
    """encode_flow_clip(T5's part) is the pipeline's encode_prompt exactly, and gradients reach CLIP's adapter."""
    model = load_base(flow[arch]["folder"])
    captions = ["zxq, red circle", "a blue square on grey"]
    with torch.no_grad():  # (no_grad picks other kernels: ~1e-6 from the same encoding with gradients)
        want = text.encode_flow(model.pipeline, arch, captions, 16)
        t5 = text.encode_flow_t5(model.pipeline, captions, 16)
        got = text.encode_flow_clip(model.pipeline, arch, captions, t5)
    assert all(torch.equal(w, g) for w, g in zip(want, got))

    cfg = config.build("character", arch, {"network_dim": 4}, TE_ON)
    net = create(cfg.network, arch, {"transformer": model.denoiser} | clips(model.pipeline, arch))
    assert set(net.counts()) == {"transformer", *FLOW_CLIPS[arch]}
    assert net.counts()["text_encoder"] == 6 * 2  # q, k, v, out, fc1, fc2 of each of the tiny CLIP's 2 layers
    for p in (p for c in FLOW_CLIPS[arch] for p in net.parameters_of(c)):  # B starts at 0: A would get no gradient
        p.data.normal_(0, 0.1)
    hidden, pooled = text.encode_flow_clip(model.pipeline, arch, captions, t5)
    loss = FlowMatchingLoss.for_model(model)(model.denoiser, torch.randn(2, 16, 8, 8), hidden, {"pooled": pooled},
                                            generator=torch.Generator().manual_seed(0))
    loss.backward()
    for c in FLOW_CLIPS[arch]:
        grads = [p.grad for p in net.parameters_of(c)]
        assert all(g is not None for g in grads) and all(g.abs().sum() > 0 for g in grads), c
    assert all(p.grad is None for p in getattr(model.pipeline, T5[arch]).parameters())  # T5 ran without gradients


@pytest.mark.parametrize("arch", FAMILIES)
def test_the_clip_adapter_alone_lowers_a_fixed_batch_loss(flow, arch):
    """Only CLIP's adapter steps (30 AdamW steps; the transformer's stays at its init, ΔW = 0): the flow-matching
    loss on one fixed batch falls, so the captions re-encoded through the adapted CLIP carry a useful gradient."""
    model = load_base(flow[arch]["folder"])
    cfg = config.build("character", arch, {"network_dim": 4}, TE_ON)
    net = create(cfg.network, arch, {"transformer": model.denoiser} | clips(model.pipeline, arch))
    captions = ["zxq, red circle"] * 4
    with torch.no_grad():
        t5 = text.encode_flow_t5(model.pipeline, captions, 16)
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    loss_fn = FlowMatchingLoss.for_model(model)

    def fixed_loss():
        hidden, pooled = text.encode_flow_clip(model.pipeline, arch, captions, t5)
        return loss_fn(model.denoiser, latents, hidden, {"pooled": pooled}, generator=torch.Generator().manual_seed(0))

    opt = torch.optim.AdamW([p for c in FLOW_CLIPS[arch] for p in net.parameters_of(c)], lr=1e-2)
    with torch.no_grad():
        before = fixed_loss().item()
    for _ in range(30):
        loss = fixed_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = fixed_loss().item()
    # measured: FLUX.1 2.303 -> 2.255 (CLIP-L gives only the pooled vector), SD 3.5 2.271 -> 2.166 (CLIP-L/G tokens too)
    assert after < before - 0.03, (before, after)


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_run_trains_clip_with_its_rate_and_leaves_t5(flow, tmp_path, arch):
    run, final, initial = trained_run(tmp_path, flow, arch)
    assert set(run.net.counts()) == {"transformer", *FLOW_CLIPS[arch]}
    te_params = {id(p) for c in FLOW_CLIPS[arch] for p in run.net.parameters_of(c)}
    rates = {g["initial_lr"]: {id(p) in te_params for p in g["params"]} for g in run.optimizer.param_groups}
    assert rates == {FLOW_TINY_LR: {False}, TE_LR: {True}}, rates  # text_encoder_lr on CLIP's groups only
    moved = {k for k, v in run.net.state_dict().items() if not torch.equal(v, initial[k])}
    assert {k.split(".")[0] for k in moved} == {"transformer", *FLOW_CLIPS[arch]}
    assert {k for k in initial if k.startswith(FLOW_CLIPS[arch])} <= moved  # every CLIP tensor trained
    fresh = load_base(flow[arch]["folder"])
    t5, t5_fresh = getattr(run.base.pipeline, T5[arch]), getattr(fresh.pipeline, T5[arch])
    assert all(torch.equal(a, b.to(a.device)) for a, b in zip(t5_fresh.state_dict().values(),
                                                              t5.state_dict().values()))
    assert not any("lora" in n for n, _ in t5.named_modules())  # T5 carries no adapter
    events = (run.run_dir / "events.jsonl").read_text()
    assert "T5 part cached; T5 moved off the device (CLIP stays: it trains)" in events
    assert next(t5.parameters()).device.type == "cpu"
    steps = losses(run.run_dir)
    assert len(steps) == 6 and all(torch.isfinite(torch.tensor(v)) for v in steps.values())
    assert final.is_file()


def comfy_clip_map(arch: str, pipe) -> dict[str, str]:
    """model_lora_keys_clip on the HF-layout CLIPs: kohya lora_te1 / lora_te2 keys and the diffusers
    `text_encoder(_2).text_model.encoder.layers.{b}.{c}` keys (comfy/lora.py adds both)."""
    hf = {CLIP_NAME[c]: hf_clip(te) for c, te in clips(pipe, arch).items()}
    keys = comfy_clip_keys(arch, hf)
    for b in range(32):
        for c in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                  "mlp.fc2"):
            for component, clip in CLIP_NAME.items():
                k = f"text_model.encoder.layers.{b}.{c}.weight"
                if k in hf.get(clip, {}):
                    keys[f"{component}.text_model.encoder.layers.{b}.{c}"] = f"{clip}.{k}"
    return keys


def clip_weights_from_file(arch: str, sd: dict, pipe) -> dict[str, torch.Tensor]:
    """The CLIP weights (HF layout, "clip_l.text_model…") patched by the file's CLIP keys as ComfyUI patches them."""
    keymap = comfy_clip_map(arch, pipe)
    hf = {f"{CLIP_NAME[c]}.{k}": v for c, te in clips(pipe, arch).items() for k, v in hf_clip(te).items()}
    if arch == "flux":
        te_sd = {k: v for k, v in sd.items() if k.startswith("lora_te")}
        assert {k.split(".")[0] for k in te_sd} <= set(keymap)
        patched, _ = comfy_apply_kohya(hf, keymap, te_sd)
        return patched
    patched = dict(hf)
    for stem in {k.rsplit(".lora_", 1)[0] for k in sd if k.startswith("text_encoder")}:
        target = keymap[stem]
        patched[target] = patched[target] + sd[stem + ".lora_B.weight"].float() @ sd[stem + ".lora_A.weight"].float()
    return patched


@pytest.mark.parametrize("arch", FAMILIES)
def test_the_file_holds_the_clip_update_and_diffusers_applies_it(flow, tmp_path, caplog, arch):
    run, final, _ = trained_run(tmp_path, flow, arch, {"training": {"max_train_epochs": 1}})
    sd, fresh = load_file(str(final)), load_base(flow[arch]["folder"])
    fmt = "kohya" if arch == "flux" else "diffusers"
    prefixes = {"flux": ("lora_te1_text_model_encoder_layers_",),
                "sd3": ("text_encoder.text_model.encoder.layers.", "text_encoder_2.text_model.encoder.layers.")}[arch]
    stems = {k.split(".lora_")[0] if fmt == "diffusers" else k.split(".")[0] for k in sd}
    for prefix in prefixes:
        assert len([s for s in stems if s.startswith(prefix)]) == 12, prefix  # 6 Linears x 2 layers
    modules = flow_names.plan(arch, fresh.denoiser, clips(fresh.pipeline, arch))
    assert flow_names.check_file(arch, modules, sd, fmt) == []
    if arch == "flux":  # every key: a BFL transformer weight or a CLIP-L weight, as ComfyUI maps them
        keymap = comfy_unet_keys(flux_to_original(fresh.denoiser)) | comfy_clip_map(arch, fresh.pipeline)
        assert {k.split(".")[0] for k in sd} <= set(keymap)
    else:
        assert {s for s in stems if not s.startswith("transformer.")} <= set(comfy_clip_map(arch, fresh.pipeline))
    if arch == "flux":
        assert all(float(sd[k]) == 2.0 for k in sd if k.startswith("lora_te") and k.endswith(".alpha"))

    net = run.net
    assert_file_holds_the_update(arch, {k: v for k, v in sd.items() if not k.startswith(("lora_te", "text_enc"))},
                                 fresh.denoiser, TransformerOnly(net))
    deltas = te_deltas(net)
    assert min(d.abs().max().item() for d in deltas.values()) > 1e-4  # every CLIP module moved
    patched = clip_weights_from_file(arch, sd, fresh.pipeline)
    worst = 0.0
    for name, d in deltas.items():
        component, path = name.split(".", 1)
        key = f"{CLIP_NAME[component]}.text_model.{path.removeprefix('text_model.')}.weight"
        base = hf_clip(getattr(fresh.pipeline, component))[key.split(".", 1)[1]]
        worst = max(worst, (patched[key] - base - d.cpu()).abs().max().item())
    assert worst <= TOL, worst

    assert_diffusers_applies_clip(arch, sd, fresh, deltas, tmp_path)


class TransformerOnly:
    """A network seen through its transformer modules only (for the transformer-file check of test_flow_training)."""

    def __init__(self, net):
        self.net, self.method = net, net.method

    def names(self):
        return [n for n in self.net.names() if n.startswith("transformer.")]

    def delta(self, name):
        return self.net.delta(name)


def assert_diffusers_applies_clip(arch: str, sd: dict, fresh, deltas: dict, tmp_path) -> None:
    """diffusers' load_lora_weights: each CLIP's output moves by the trained update (CLIP weights + ΔW by hand)."""
    want = {}
    for c, te in clips(fresh.pipeline, arch).items():
        merged = type(te)(te.config).eval()
        merged.load_state_dict(te.state_dict())
        with torch.no_grad():
            for path, m in merged.named_modules():
                if f"{c}.{path}" in deltas:
                    m.weight += deltas[f"{c}.{path}"].cpu()
            want[c] = te_out(merged)
    with torch.no_grad():
        before = {c: te_out(te) for c, te in clips(fresh.pipeline, arch).items()}
    if arch == "flux":  # its converter hard-codes FLUX.1's linear1 widths (tests/test_flow_training.py)
        sd = {k: v for k, v in sd.items() if "single_blocks_0_linear1" not in k}
    path = tmp_path / "for-diffusers.safetensors"
    save_file(sd, str(path))
    fresh.pipeline.load_lora_weights(str(path))
    with torch.no_grad():
        for c, te in clips(fresh.pipeline, arch).items():
            got = te_out(te)
            assert (want[c] - before[c]).abs().max().item() > 1e-3, c  # the update is not lost in the tolerance
            assert (got - want[c]).abs().max().item() <= 1e-4, (c, (got - want[c]).abs().max().item())


@pytest.mark.parametrize("arch", FAMILIES)
def test_resume_after_a_cancel_reproduces_the_losses(flow, tmp_path, arch):
    assert_resume_reproduces(flow, tmp_path, arch, TE_ON)


@pytest.mark.parametrize("method", ["rslora", "lora_fa", "vera", "adalora"])
def test_the_lora_variants_train_clip(flow, tmp_path, method):
    """rsLoRA (alpha·√r stored), LoRA-FA (A frozen), VeRA (scalings folded into up) and AdaLoRA (a rank per module)
    on FLUX.1's CLIP-L: plain LoRA in the file, which holds their trained update."""
    lr = {"vera": 1e-1, "adalora": 5e-2}.get(method, TE_LR)  # VeRA's scalings and AdaLoRA's E start at 0
    run, final, initial = trained_run(tmp_path, flow, "flux", {"network": {"network_type": method},
                                                               "training": {"max_train_epochs": 1},
                                                               "optimizer": {"text_encoder_lr": lr}})
    sd, fresh = load_file(str(final)), load_base(flow["flux"]["folder"])
    assert flow_names.check_file("flux", flow_names.plan("flux", fresh.denoiser, clips(fresh.pipeline, "flux")), sd,
                                 "kohya") == []
    deltas = te_deltas(run.net)
    moved = [name for name, d in deltas.items() if d.abs().max().item() > 1e-5]
    assert len(moved) == 12 if method != "adalora" else len(moved) > 6, moved  # AdaLoRA may move a rank elsewhere
    patched = clip_weights_from_file("flux", sd, fresh.pipeline)
    base = {f"clip_l.{k}": v for k, v in hf_clip(fresh.pipeline.text_encoder).items()}
    for name, d in deltas.items():
        key = f"clip_l.text_model.{name.split('.', 1)[1].removeprefix('text_model.')}.weight"
        assert (patched.get(key, base[key]) - base[key] - d.cpu()).abs().max().item() <= TOL, name
    if method == "rslora":
        assert all(float(sd[k]) == pytest.approx(2.0 * 2) for k in sd if k.startswith("lora_te") and
                   k.endswith(".alpha"))  # alpha·√r, r = 4


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("method", ["loha", "lokr", "dora"])
def test_lycoris_trains_clip_under_the_keys_comfyui_maps(flow, tmp_path, arch, method):
    """LoHa / LoKr / DoRA on CLIP: the LyCORIS file names each CLIP module by its kohya stem (lora_te1 / lora_te2),
    which model_lora_keys_clip maps; applied as ComfyUI applies LyCORIS tensors, it gives the trained update of the
    CLIP modules and of the transformer's."""
    run, final, _ = trained_run(tmp_path, flow, arch, {"network": {"network_type": method},
                                                       "training": {"max_train_epochs": 1}})
    sd, fresh = load_file(str(final)), load_base(flow[arch]["folder"])
    assert flow_names.check_lycoris_file(arch, flow_names.plan(arch, fresh.denoiser, clips(fresh.pipeline, arch)),
                                         sd) == []
    stems = set(by_module(sd))
    for prefix in ("lora_te1_", "lora_te2_")[: len(FLOW_CLIPS[arch])]:
        assert len([s for s in stems if s.startswith(prefix)]) == 12, prefix
    original = flux_to_original(fresh.denoiser) if arch == "flux" else sd3_to_original(fresh.denoiser)
    hf = {f"{CLIP_NAME[c]}.{k}": v for c, te in clips(fresh.pipeline, arch).items() for k, v in hf_clip(te).items()}
    keymap = comfy_lycoris_keys(arch, fresh.denoiser, original) | {
        k: (v, None, None) for k, v in comfy_clip_map(arch, fresh.pipeline).items()}
    assert stems <= set(keymap), sorted(stems - set(keymap))
    patched = comfy_apply_lycoris(original | hf, keymap, sd)

    deltas = te_deltas(run.net)
    assert min(d.abs().max().item() for d in deltas.values()) > 1e-6  # every CLIP module moved
    worst = max((patched[clip_key(name)] - hf[clip_key(name)] - d.cpu()).abs().max().item()
                for name, d in deltas.items())
    assert worst <= TOL, worst
    transformer = {k: v for k, v in patched.items() if k in original}
    back = flux_to_diffusers(transformer) if arch == "flux" else convert_sd3_transformer_checkpoint_to_diffusers(
        transformer)
    want = updated(fresh.denoiser, {n: run.net.delta(n).cpu() for n in run.net.names() if n.startswith("transformer.")})
    assert max((back[k] - want[k]).abs().max().item() for k in want) <= TOL


def clip_key(name: str) -> str:
    """A CLIP module of the network ("text_encoder.<path>") -> its weight in the HF layout ("clip_l.text_model.…")."""
    component, path = name.split(".", 1)
    return f"{CLIP_NAME[component]}.text_model.{path.removeprefix('text_model.')}.weight"


def test_what_is_not_built_is_refused_by_field():
    with pytest.raises(config.ConfigError, match="text encoders alone are not trained on SD 3.5") as e:
        config.build("character", "sd3", {"network_train_text_encoder_only": True}, TE_ON)
    assert e.value.field == "network.network_train_text_encoder_only"
    for arch in FAMILIES:  # the presets' SD 3.5 / FLUX.1 variants stay on the transformer (sd-scripts: an option)
        cfg = config.build("character", arch)
        assert cfg.network.network_train_unet_only and cfg.optimizer.text_encoder_lr == 0

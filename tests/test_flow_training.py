"""SD 3.5 / FLUX.1 LoRA training on the tiny models through the real loading, setup, loop and export: the
flow-matching loss falls on a fixed batch, a run writes a file whose every key patches a base module of its shape
(trainer/flow_names.py's check, and ComfyUI's key logic for FLUX.1), diffusers' `load_lora_weights` applies it
as the trained update, and a cancelled run resumes to the uninterrupted losses."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.test_flow_names import comfy_apply_kohya, comfy_apply_lycoris, comfy_lycoris_keys, comfy_unet_keys
from tests.test_training import TINY, draw_dataset, losses
from tests.tiny_models import flow_layouts, flux_to_original, sd3_to_original
from trainer import checkpoint, config, flow_names, text
from trainer.kohya_names import by_module
from trainer.loading import load_base
from trainer.loss import FlowMatchingLoss
from trainer.networks import create
from trainer.train import StopFlag, train
from trainer.transformer_files import flux_to_diffusers

FAMILIES = ("flux", "sd3")
ARCHITECTURE = {"flux": "flux-1-dev/lora", "sd3": "stable-diffusion-3-5-medium/lora"}
VERSION = {"flux": "flux1", "sd3": "5-medium"}  # sd-scripts: flux_utils.MODEL_VERSION_FLUX_V1, the MMDiT model_type
FLOW_TINY = {"sample": {"sample_sampler": "euler", "sample_every_n_epochs": 0},
             "optimizer": {"learning_rate": 2e-3, "unet_lr": 2e-3}}  # a few steps move the tiny model visibly
TOL = 1e-5  # weights; outputs through the whole transformer (merged weights vs diffusers' unmerged LoRA): OUT_TOL
OUT_TOL = 1e-4


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-train-models")
    return {arch: flow_layouts(arch, root) for arch in FAMILIES} | {
        "flux-schnell": flow_layouts("flux", root, variant="schnell")}


def make_flow_run(tmp_path, arch: str, base, *layers: dict):
    run_dir = tmp_path / "run"
    dataset = draw_dataset(run_dir / "dataset")
    cfg = config.build("character", arch, TINY, FLOW_TINY, {"model": {"pretrained_model_name_or_path": str(base)},
                                                            "data": {"train_data_dir": str(dataset)}}, *layers)
    config.save(cfg, run_dir / "config.toml")
    return run_dir, cfg


def trained_net(cfg, arch: str, folder, run_dir):
    model = load_base(folder)
    net = create(cfg.network, arch, {"transformer": model.denoiser})
    checkpoint.load_adapter(checkpoint.latest(run_dir), net)
    return model, net


def transformer_inputs(arch: str):
    g = torch.Generator().manual_seed(5)
    if arch == "flux":
        return dict(hidden_states=torch.randn(1, 16, 64, generator=g),
                    encoder_hidden_states=torch.randn(1, 3, 32, generator=g),
                    pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([0.5]),
                    img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(3, 3), guidance=torch.tensor([1.0]),
                    return_dict=False)
    return dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 3, 32, generator=g),
                pooled_projections=torch.randn(1, 192, generator=g), timestep=torch.tensor([500.0]),
                return_dict=False)


@pytest.mark.parametrize("arch", ["flux", "sd3", "flux-schnell"])
def test_loss_falls_on_a_fixed_batch(flow, arch):
    family = arch.split("-")[0]
    model = load_base(flow[arch]["folder"])
    loss_fn = FlowMatchingLoss.for_model(model)
    if arch == "flux":
        assert (loss_fn.guidance, loss_fn.dynamic_shift) == (1.0, (256, 4096, 0.5, 1.15))
    elif arch == "sd3":
        assert (loss_fn.guidance, loss_fn.shift, loss_fn.dynamic_shift) == (None, 3.0, None)
    else:  # schnell: no guidance embedder, shift 1
        assert (loss_fn.guidance, loss_fn.shift, loss_fn.dynamic_shift) == (None, 1.0, None)
    cfg = config.build("character", family, TINY, FLOW_TINY)
    before, after = fixed_batch_losses(model, family, create(cfg.network, family, {"transformer": model.denoiser}))
    assert after < 0.85 * before, (before, after)  # measured: FLUX 2.30 -> 1.49, SD3 2.27 -> 1.79


def fixed_batch_losses(model, family: str, net, lr: float = 1e-2, steps: int = 40) -> tuple[float, float]:
    """The flow-matching loss on one fixed batch (pictures, captions, σ and noise) before and after `steps` AdamW
    steps of `net`; every loss on the way is finite."""
    loss_fn = FlowMatchingLoss.for_model(model)
    hidden, pooled = text.encode_flow(model.pipeline, family, ["zxq, red circle"] * 4, 16)
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(1))

    def fixed_loss(grad=False):
        with torch.set_grad_enabled(grad):
            return loss_fn(model.denoiser, latents, hidden.detach(), {"pooled": pooled.detach()},
                           generator=torch.Generator().manual_seed(0))

    opt = torch.optim.AdamW(net.parameters_of("transformer"), lr=lr)
    before = fixed_loss().item()
    seen = []
    for _ in range(steps):
        loss = fixed_loss(grad=True)
        seen.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(torch.tensor(seen)))
    return before, fixed_loss().item()


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("method", ["loha", "lokr", "dora"])
def test_lycoris_loss_falls_on_a_fixed_batch(flow, arch, method):
    model = load_base(flow[arch]["folder"])
    cfg = config.build("character", arch, TINY, FLOW_TINY, {"network": {"network_type": method}})
    torch.manual_seed(0)  # LyCORIS' initial factors
    net = create(cfg.network, arch, {"transformer": model.denoiser})
    assert net.kind == method and len(net.names()) == {"flux": 20, "sd3": 26}[arch]  # SD3: attn2 q/k/v left out
    before, after = fixed_batch_losses(model, arch, net, lr=3e-2 if method == "lokr" else 1e-2)  # LoKr: higher lr
    # measured (FLUX; SD3): LoHa 2.30 -> 1.17; 2.27 -> 1.06, LoKr 2.30 -> 1.51; 2.27 -> 1.86,
    # DoRA 2.30 -> 1.37; 2.27 -> 1.79
    assert after < 0.85 * before, (before, after)


def test_timestep_shifts_are_the_families():
    u = torch.tensor([0.25, 0.5, 0.75])
    sd3 = FlowMatchingLoss("sd3", shift=3.0)
    assert torch.allclose(sd3.shifted(u, 64), 3 * u / (1 + 2 * u))
    flux = FlowMatchingLoss("flux", dynamic_shift=(256, 4096, 0.5, 1.15))
    small, large = flux.shifted(u, 256), flux.shifted(u, 4096)  # 512 px and 1024 px pictures
    assert torch.allclose(small, torch.exp(torch.tensor(0.5)) / (torch.exp(torch.tensor(0.5)) + 1 / u - 1))
    assert (large > small).all()  # more image tokens: more noise, as FLUX.1's sampler shifts


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_run_writes_a_file_every_loader_reads(flow, tmp_path, caplog, arch):
    files = flow[arch]
    run_dir, cfg = make_flow_run(tmp_path, arch, files["folder"])
    final = train(config.load(run_dir / "config.toml"), run_dir)
    steps = losses(run_dir)
    assert len(steps) == 6 and all(torch.isfinite(torch.tensor(v)) for v in steps.values())
    messages = [e for e in (run_dir / "events.jsonl").read_text().splitlines() if "moved off the device" in e]
    assert messages, "the text encoders were not released after caching"

    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == ARCHITECTURE[arch]
    assert meta["ss_base_model_version"] == VERSION[arch] and meta["ss_v2"] == "False"
    assert "modelspec.prediction_type" not in meta and meta["modelspec.trigger_phrase"] == "zxq"
    sd = load_file(str(final))
    fresh = load_base(files["folder"])
    modules = flow_names.plan(arch, fresh.denoiser)
    fmt = "kohya" if arch == "flux" else "diffusers"
    assert flow_names.check_file(arch, modules, sd, fmt) == []
    if arch == "flux":  # ComfyUI's own key logic on the original (BFL) layout: every key patches a weight
        assert {k.split(".")[0] for k in sd} <= set(comfy_unet_keys(flux_to_original(fresh.denoiser)))
    else:
        assert all(k.startswith("transformer.transformer_blocks.") for k in sd)

    _, net = trained_net(cfg, arch, files["folder"], run_dir)
    deltas = assert_file_holds_the_update(arch, sd, fresh.denoiser, net)

    assert_diffusers_applies(arch, sd, fresh, deltas, tmp_path, caplog)


def assert_diffusers_applies(arch: str, sd: dict, fresh, deltas: dict, tmp_path, caplog,
                             min_change: float = 20 * OUT_TOL) -> None:
    """diffusers' load_lora_weights: the same update, a changed output. Its kohya FLUX converter hard-codes FLUX.1's
    widths for single_blocks.linear1 (checked at full width in tests/test_flow_names.py), so on the tiny model that
    module is left out of the file it reads, and out of the update compared."""
    owner = flow_names.kohya_names(arch, fresh.denoiser)
    if arch == "flux":
        sd = {k: v for k, v in sd.items() if "single_blocks_0_linear1" not in k}
    want = {k: v.clone() for k, v in fresh.denoiser.state_dict().items()}
    for name, d in deltas.items():
        if arch == "sd3" or owner[name] != "lora_unet_single_blocks_0_linear1":
            want[name.removeprefix("transformer.") + ".weight"] += d
    path = tmp_path / "for-diffusers.safetensors"
    save_file(sd, str(path))
    expected = copy.deepcopy(fresh.denoiser)
    expected.load_state_dict(want)
    inputs = transformer_inputs(arch)
    with torch.no_grad():
        base_out, want_out = fresh.denoiser(**inputs)[0], expected(**inputs)[0]
    caplog.clear()
    fresh.pipeline.load_lora_weights(str(path))
    complaints = [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR")
                  and not r.getMessage().startswith("No LoRA keys associated to CLIPText")]  # none trained
    assert not [m for m in complaints if "unexpected" in m.lower() or "not loaded" in m.lower()], complaints
    with torch.no_grad():
        got = fresh.pipeline.transformer(**inputs)[0]
    changed, off = (got - base_out).abs().max().item(), (got - want_out).abs().max().item()
    assert changed > min_change and off <= OUT_TOL, (changed, off)


def trained_deltas(arch: str, net) -> dict:
    """ΔW of every trained module, checked to have moved."""
    deltas = {name: net.delta(name) for name in net.names()}
    # (DoRA where nothing trained: ~5e-6 from its stored norm's rounding; a trained module moves by ~1e-3)
    still = sorted(name for name, d in deltas.items() if not d.abs().max() > 1e-4)
    # every module trained but SD3's last context query (context_pre_only: its output is dropped, no gradient);
    # AdaLoRA may move a module's whole rank elsewhere (rank 0: a zero module in the file), never most of them
    if net.method.dynamic_rank:
        assert len(still) < len(deltas) / 2, still
    else:
        assert still == (["transformer.transformer_blocks.1.attn.add_q_proj"] if arch == "sd3" else []), still
    return deltas


def updated(transformer, deltas: dict) -> dict:
    """The diffusers weights with the trained ΔWs added."""
    want = {k: v.clone() for k, v in transformer.state_dict().items()}
    for name, d in deltas.items():
        want[name.removeprefix("transformer.") + ".weight"] += d
    return want


def assert_file_holds_the_update(arch: str, sd: dict, transformer, net) -> dict:
    """The file's update, patched into the original (BFL) weights as ComfyUI patches them (FLUX.1) or added to the
    diffusers weights as diffusers reads its format (SD 3.5), equals the trained adapter's ΔW of every module."""
    deltas = trained_deltas(arch, net)
    want = updated(transformer, deltas)
    if arch == "flux":
        original = flux_to_original(transformer)
        patched, _ = comfy_apply_kohya(original, comfy_unet_keys(original), sd)
        back = flux_to_diffusers(patched)
    else:
        back = {k: v.clone() for k, v in transformer.state_dict().items()}
        for key in {k.rsplit(".lora_", 1)[0] for k in sd}:
            path = key.removeprefix("transformer.") + ".weight"
            back[path] += sd[key + ".lora_B.weight"].float() @ sd[key + ".lora_A.weight"].float()
    assert max((back[k] - want[k]).abs().max().item() for k in want) <= TOL
    return deltas


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("method", ["rslora", "lora_fa", "vera", "adalora"])
def test_the_lora_variants_export_their_update(flow, tmp_path, caplog, arch, method):
    """rsLoRA (alpha·√r stored), LoRA-FA (A frozen), VeRA (scalings folded into up; q/k/v share its A, so a fused
    module keeps rank r) and AdaLoRA (a rank per module) are plain LoRA in the file, which diffusers applies."""
    # in 3 steps the update must stand out of OUT_TOL: VeRA's scalings and AdaLoRA's E start at 0, LoRA-FA trains B only
    lr = {"vera": 1e-1, "adalora": 5e-2, "lora_fa": 5e-3}.get(method, FLOW_TINY["optimizer"]["learning_rate"])
    run_dir, cfg = make_flow_run(tmp_path, arch, flow[arch]["folder"], {"network": {"network_type": method},
                                                                         "training": {"max_train_epochs": 1},
                                                                         "optimizer": {"learning_rate": lr,
                                                                                       "unet_lr": lr}})
    final = train(config.load(run_dir / "config.toml"), run_dir)
    sd, fresh = load_file(str(final)), load_base(flow[arch]["folder"])
    assert flow_names.check_file(arch, flow_names.plan(arch, fresh.denoiser), sd,
                                 "kohya" if arch == "flux" else "diffusers") == []
    _, net = trained_net(cfg, arch, flow[arch]["folder"], run_dir)
    assert net.kind == method
    deltas = assert_file_holds_the_update(arch, sd, fresh.denoiser, net)
    if method == "vera" and arch == "flux":  # one shared down for the fused q|k|v(|mlp): rank r, not 3r / 4r
        assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == cfg.network.network_dim
    assert_diffusers_applies(arch, sd, fresh, deltas, tmp_path, caplog, min_change=10 * OUT_TOL)


@pytest.mark.parametrize("arch", FAMILIES)
def test_loraplus_trains_b_faster_on_the_transformer(flow, tmp_path, arch):
    """LoRA+ through the existing parameter groups: the optimizer gets A at the learning rate and B at ratio × it."""
    import trainer.setup

    make, seen = trainer.setup.make_optimizer, {}

    def spy(cfg, groups, device):
        seen["optimizer"] = make(cfg, groups, device)
        return seen["optimizer"]

    trainer.setup.make_optimizer = spy
    try:
        run_dir, cfg = make_flow_run(tmp_path, arch, flow[arch]["folder"], {"network": {"loraplus_lr_ratio": 16.0},
                                                                             "training": {"max_train_epochs": 1}})
        final = train(config.load(run_dir / "config.toml"), run_dir)
    finally:
        trainer.setup.make_optimizer = make
    a, b = seen["optimizer"].param_groups  # the transformer's A, then its B
    assert a["initial_lr"] == cfg.optimizer.unet_lr and b["initial_lr"] == pytest.approx(16 * a["initial_lr"])
    assert all(p.shape[1] == 4 for p in b["params"]) and all(p.shape[0] == 4 for p in a["params"])  # B [out, r]
    assert len(b["params"]) == len(trained_net(cfg, arch, flow[arch]["folder"], run_dir)[1].names())
    assert final.is_file() and all(torch.isfinite(torch.tensor(v)) for v in losses(run_dir).values())


LYCORIS = ("loha", "lokr", "dora")
SD3_LEFT_OUT = [f"transformer.transformer_blocks.0.attn2.to_{p}" for p in "qkv"]  # no key ComfyUI maps (flow_names)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("method", LYCORIS)
def test_lycoris_files_apply_as_comfyui_applies_them(flow, tmp_path, caplog, arch, method):
    """LoHa / LoKr / DoRA train on the split Linears and the file keeps them split, under the keys ComfyUI maps
    (`lycoris_<diffusers path>`, sliced into the fused weights by offset): applied as ComfyUI applies it, it gives
    the trained update; the metadata is LyCORIS'; the export says diffusers cannot load it, and it cannot."""
    run_dir, cfg = make_flow_run(tmp_path, arch, flow[arch]["folder"], {"network": {"network_type": method},
                                                                         "training": {"max_train_epochs": 1}})
    with caplog.at_level("WARNING", logger="trainer.export"):
        final = train(config.load(run_dir / "config.toml"), run_dir)
    assert flow_names.LYCORIS_LOADERS in caplog.text
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == ARCHITECTURE[arch].replace("/lora", "/lycoris")
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_base_model_version"] == VERSION[arch]
    assert json.loads(meta["ss_network_args"])["algo"] == ("lora" if method == "dora" else method)
    assert any("left out, no loader maps them" in e for e in (run_dir / "events.jsonl").read_text().splitlines()) \
        == (arch == "sd3")

    sd, fresh = load_file(str(final)), load_base(flow[arch]["folder"])
    assert flow_names.check_lycoris_file(arch, flow_names.plan(arch, fresh.denoiser), sd) == []
    original = flux_to_original(fresh.denoiser) if arch == "flux" else sd3_to_original(fresh.denoiser)
    keymap = comfy_lycoris_keys(arch, fresh.denoiser, original)
    assert set(by_module(sd)) <= set(keymap), sorted(set(by_module(sd)) - set(keymap))
    _, net = trained_net(cfg, arch, flow[arch]["folder"], run_dir)
    assert net.left_out == (SD3_LEFT_OUT if arch == "sd3" else [])
    want = updated(fresh.denoiser, trained_deltas(arch, net))
    patched = comfy_apply_lycoris(original, keymap, sd)
    back = flux_to_diffusers(patched) if arch == "flux" else convert_sd3_transformer_checkpoint_to_diffusers(patched)
    worst = max((back[k] - want[k]).abs().max().item() for k in want)
    assert worst <= TOL, worst

    path = tmp_path / "lycoris.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError):
        fresh.pipeline.load_lora_weights(str(path))


class StopAt(StopFlag):
    """Cancels the run once it has logged `step`, as the worker's SIGTERM handler would."""

    def __init__(self, run_dir, step: int):
        self.run_dir, self.step = run_dir, step

    @property
    def requested(self) -> bool:
        return max(losses(self.run_dir), default=0) >= self.step


@pytest.mark.parametrize("arch", FAMILIES)
def test_resume_after_a_cancel_reproduces_the_losses(flow, tmp_path, arch):
    assert_resume_reproduces(flow, tmp_path, arch)


def assert_resume_reproduces(flow, tmp_path, arch: str, *layers: dict) -> None:
    """A run cancelled after its state at step 2 resumes to the uninterrupted run's losses at steps 3-6."""
    alone, cfg = make_flow_run(tmp_path / "alone", arch, flow[arch]["folder"], *layers)
    train(cfg, alone)
    reference = losses(alone)
    cut, cfg = make_flow_run(tmp_path / "cut", arch, flow[arch]["folder"], *layers)
    assert train(cfg, cut, StopAt(cut, 2)) is None
    assert checkpoint.latest(cut).name == "step-00000002"
    assert train(config.load(cut / "config.toml"), cut) is not None
    resumed = losses(cut)
    assert set(resumed) == set(reference) == set(range(1, 7))
    for step in range(3, 7):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_what_is_not_built_is_refused_by_name(flow):
    base = str(flow["flux"]["folder"])
    with pytest.raises(config.ConfigError, match="locon adapts 3x3 convs, and FLUX.1's transformer has none") as e:
        config.build("character", "flux", {"pretrained_model_name_or_path": base, "network_type": "locon",
                                           "conv_dim": 8})
    assert e.value.field == "network.network_type"
    with pytest.raises(config.ConfigError, match="conv_dim = 4: SD 3.5's transformer has no 3x3 convs") as e:
        config.build("character", "sd3", {"network_type": "loha", "conv_dim": 4})
    assert e.value.field == "network.conv_dim"
    with pytest.raises(config.ConfigError, match="the text encoders alone are not trained on SD 3.5") as e:
        config.build("character", "sd3", {"network_train_unet_only": False, "network_train_text_encoder_only": True,
                                          "text_encoder_lr": 5e-5})  # CLIP with the transformer: test_flow_te.py
    assert e.value.field == "network.network_train_text_encoder_only"
    with pytest.raises(config.ConfigError, match="set min_snr_gamma = 0"):
        config.build("character", "flux", {"min_snr_gamma": 5.0})
    with pytest.raises(config.ConfigError, match="flow-matching Euler"):
        config.build("character", "flux", {"sample_sampler": "euler_a"})
    with pytest.raises(config.ConfigError, match="is FLUX.1: set family = 'flux'"):
        config.build("character", "sd15", {"pretrained_model_name_or_path": base})


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_run_samples_from_its_cached_prompt_embeddings(flow, tmp_path, monkeypatch, arch):
    """Samples (FLUX.1's with its guidance) from the sample prompt's embeddings, cached with the captions: T5-XXL
    runs before training (then leaves the device) and never while sampling; the step-0 sample (the adapter's update
    still zero) is the picture the pipeline draws with its own encoders."""
    from PIL import Image
    from transformers import T5EncoderModel

    from trainer import sampling
    from trainer.events import read_all

    calls, forward, generate = [], T5EncoderModel.forward, sampling.generate
    monkeypatch.setattr(T5EncoderModel, "forward", lambda self, *a, **k: calls.append("t5") or forward(self, *a, **k))

    def sample(*a, **k):
        calls.append("sample")
        return generate(*a, **k)

    monkeypatch.setattr(sampling, "generate", sample)
    run_dir, cfg = make_flow_run(tmp_path, arch, flow[arch]["folder"], {
        "training": {"max_train_epochs": 1}, "sample": {"sample_every_n_epochs": 1, "sample_steps": 2,
                                                        "sample_prompts": ["{trigger}, a red circle"]}})
    assert train(config.load(run_dir / "config.toml"), run_dir).is_file()
    events = read_all(run_dir)
    assert calls.count("sample") == 2 and "t5" in calls and "t5" not in calls[calls.index("sample"):], calls
    assert any(e.get("message") == "Captions and sample prompts cached; the text encoders (T5 included) moved off "
               "the device" for e in events)
    samples = [e for e in events if e["type"] == "sample"]
    assert [e["step"] for e in samples] == [0, 3]
    image = Image.open(run_dir / samples[-1]["path"])
    assert image.size == (64, 64)
    assert ("Steps: 2, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 3.5" if arch == "flux" else
            "Steps: 2, Sampler: Euler, CFG scale: 4.5") in image.text["parameters"], image.text["parameters"]
    s, prompt = cfg.sample, cfg.sample.sample_prompts[0].replace("{trigger}", cfg.data.trigger_word)
    want = generate(load_base(str(flow[arch]["folder"])), prompt, sampler=s.sample_sampler, steps=2,
                    cfg_scale=s.sample_cfg_scale, seed=s.sample_seed, width=64, height=64)
    first = Image.open(run_dir / samples[0]["path"]).convert("RGB")
    assert list(first.getdata()) == list(want.convert("RGB").getdata())


def file_delta(params: dict) -> torch.Tensor:
    """ΔW a loader builds from one module of a file (kohya form: up @ down · alpha/r; diffusers form: B @ A)."""
    down, up = params["lora_down.weight"].double(), params["lora_up.weight"].double()
    scale = params["alpha"].item() / down.shape[0] if "alpha" in params else 1.0
    return up.flatten(1) @ down.flatten(1) * scale


@pytest.mark.parametrize("arch", FAMILIES)
def test_pruning_when_saving_gives_each_module_its_best_rank_two_update(flow, tmp_path, caplog, arch):
    """prune_rank = 2 on a flow run: every module of the saved file (FLUX.1's fused q/k/v as one update) is the best
    rank-2 approximation of the trained one, in the family's file form, and the loaders apply it."""
    from trainer import export
    from trainer.kohya_names import lora_modules

    run_dir, cfg = make_flow_run(tmp_path, arch, flow[arch]["folder"], {"network": {"prune_rank": 2},
                                                                         "training": {"max_train_epochs": 1}})
    final = train(config.load(run_dir / "config.toml"), run_dir)
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    sd = load_file(str(final))
    fresh = load_base(flow[arch]["folder"])
    _, net = trained_net(cfg, arch, flow[arch]["folder"], run_dir)
    pruned, full = lora_modules(sd), lora_modules(export.to_kohya(net, torch.float32))  # the unpruned file
    assert set(pruned) == set(full) and len(pruned) > 10
    for name, params in pruned.items():
        assert params["lora_down.weight"].shape[0] == 2 < full[name]["lora_down.weight"].shape[0], name
        u, s, vh = torch.linalg.svd(file_delta(full[name]), full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert (file_delta(params) - best).abs().max() <= 1e-6 * max(best.abs().max().item(), 1e-3), name
    assert meta["ss_network_dim"] == "2" and json.loads(meta["ss_resize"])["rank"] == 2
    assert meta["ss_network_alpha"] == "2.0"  # FLUX.1: the alpha in the file; SD 3.5 (folded into B): as trained
    fmt = "kohya" if arch == "flux" else "diffusers"
    assert flow_names.check_file(arch, flow_names.plan(arch, fresh.denoiser), sd, fmt) == []
    if arch == "flux":  # ComfyUI's key logic patches every module of the file
        original = flux_to_original(fresh.denoiser)
        _, hit = comfy_apply_kohya(original, comfy_unet_keys(original), sd)
        assert len(hit) == len(pruned)
    else:
        assert_diffusers_applies(arch, sd, fresh, {name: file_delta(p).float() for name, p in pruned.items()},
                                 tmp_path, caplog)

"""SD 3.5 and FLUX.1 (issue #17, its foundation): detected from the checkpoint in every layout people keep, loaded
to the same model, the wrong or missing pieces named, sampled with flow-matching Euler; training refused by name."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny_models import flow_layouts, save_both
from trainer import config
from trainer.loading import load_base
from trainer.sampling import generate, parameters_text
from trainer.single_file import CheckpointError, detect, family_of, read_safetensors_shapes
from trainer.flow_parts import Parts
from trainer.transformer_files import flux_to_diffusers

FAMILIES = ("sd3", "flux")
SPLIT = {"sd3": ("clip_l", "clip_g", "t5", "vae"), "flux": ("clip_l", "t5", "vae")}
VARIANT = {"sd3": ("sd3.5-medium", "SD 3.5 Medium"), "flux": ("flux1-dev", "FLUX.1 dev")}
DRAW = dict(sampler="euler", steps=3, cfg_scale=3.5, width=64, height=32)


@pytest.fixture(scope="session")
def flow(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """family -> its tiny model as a diffusers folder, one all-in-one file and the split files (see flow_layouts)."""
    root = tmp_path_factory.mktemp("flow-models")
    return {arch: flow_layouts(arch, root) for arch in FAMILIES}


def split_parts(layout: dict[str, Path], arch: str, **change) -> Parts:
    given = {part: layout[part] for part in SPLIT[arch]} | {"t5_tokenizer": layout["t5_tokenizer"]}
    return Parts(**{k: v for k, v in (given | change).items() if v is not None})


def load_layout(flow, arch: str, layout: str):
    files = flow[arch]
    if layout == "folder":
        return load_base(files["folder"])
    if layout == "single":
        return load_base(files["single"], parts=Parts(t5_tokenizer=files["t5_tokenizer"]))
    return load_base(files["transformer"], parts=split_parts(files, arch))


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_the_files_are_in_the_real_key_layouts(flow):
    """What diffusers' and ComfyUI's single-file code look for (diffusers CHECKPOINT_KEY_NAMES, ComfyUI's
    supported_models prefixes)."""
    sd3, flux = (read_safetensors_shapes(flow[a]["single"]) for a in FAMILIES)
    assert "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias" in sd3
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in sd3  # SD 3.5 Medium's MMDiT-X
    assert "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight" in sd3
    assert "text_encoders.t5xxl.transformer.shared.weight" in sd3
    assert any(k.startswith("first_stage_model.encoder.down.0.") for k in sd3)
    assert "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale" in flux
    assert "model.diffusion_model.single_blocks.0.linear1.weight" in flux
    assert "model.diffusion_model.guidance_in.in_layer.weight" in flux
    assert "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight" in flux
    assert any(k.startswith("vae.decoder.up.0.") for k in flux)
    bare = read_safetensors_shapes(flow["flux"]["transformer"])  # as flux1-dev.safetensors
    assert "double_blocks.0.img_attn.qkv.weight" in bare and not any(k.startswith("model.") for k in bare)
    assert "encoder.down.0.block.0.conv1.weight" in read_safetensors_shapes(flow["flux"]["vae"])  # as ae.safetensors


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_layout_loads_to_the_same_model(flow, arch):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    models = {layout: load_layout(flow, arch, layout) for layout in ("folder", "single", "split")}
    want = models["folder"]
    pipeline = StableDiffusion3Pipeline if arch == "sd3" else FluxPipeline
    for layout, model in models.items():
        assert (model.arch, model.variant, model.prediction_type) == (arch, VARIANT[arch][0], "flow_matching"), layout
        assert model.describe() == f"{VARIANT[arch][1]}, flow-matching"
        assert type(model.pipeline) is pipeline
        assert len(model.text_encoders) == len(model.tokenizers) == (3 if arch == "sd3" else 2)
        parts = [(model.denoiser, want.denoiser), (model.vae, want.vae)] + list(zip(model.text_encoders,
                                                                                   want.text_encoders))
        for got, expected in parts:
            a, b = got.state_dict(), expected.state_dict()
            assert a.keys() == b.keys(), (layout, type(got).__name__, sorted(a.keys() ^ b.keys())[:4])
            assert all(torch.equal(a[k], b[k]) for k in a), (layout, type(got).__name__)
        assert model.pipeline.scheduler.config.shift == want.pipeline.scheduler.config.shift
        t5 = model.text_encoders[-1]  # its tied embedding is held once, in every layout
        assert t5.shared.weight.data_ptr() == t5.encoder.embed_tokens.weight.data_ptr()


def test_family_is_read_without_loading(flow):
    for arch in FAMILIES:
        assert [family_of(flow[arch][k]) for k in ("folder", "single", "transformer")] == [arch] * 3
    assert family_of("black-forest-labs/FLUX.1-dev") == "flux"
    assert family_of("stabilityai/stable-diffusion-3.5-large") == "sd3"


def test_flux_conversion_is_diffusers_own_at_full_width():
    """diffusers' converter only handles the full-size width (3072); ours reads it from the file. On a file of
    full-size first dimensions (the ones that are split) both give the same tensors, key for key."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    torch.manual_seed(0)
    hidden, mlp = 3072, 4 * 3072
    shapes = {"img_in": (hidden, 64), "txt_in": (hidden, 8), "time_in.in_layer": (hidden, 4),
              "time_in.out_layer": (hidden, 4), "vector_in.in_layer": (hidden, 6), "vector_in.out_layer": (hidden, 4),
              "guidance_in.in_layer": (hidden, 4), "guidance_in.out_layer": (hidden, 4),
              "final_layer.linear": (64, 4), "final_layer.adaLN_modulation.1": (2 * hidden, 4)}
    for i in range(2):
        d = f"double_blocks.{i}."
        shapes |= {d + "img_mod.lin": (6 * hidden, 2), d + "txt_mod.lin": (6 * hidden, 2),
                   d + "img_attn.qkv": (3 * hidden, 2), d + "txt_attn.qkv": (3 * hidden, 2),
                   d + "img_attn.proj": (hidden, 2), d + "txt_attn.proj": (hidden, 2), d + "img_mlp.0": (mlp, 2),
                   d + "img_mlp.2": (hidden, 2), d + "txt_mlp.0": (mlp, 2), d + "txt_mlp.2": (hidden, 2)}
        shapes |= {f"single_blocks.{i}.modulation.lin": (3 * hidden, 2),
                   f"single_blocks.{i}.linear1": (3 * hidden + mlp, 2), f"single_blocks.{i}.linear2": (hidden, 2)}
    sd = {}
    for name, shape in shapes.items():
        sd[name + ".weight"], sd[name + ".bias"] = torch.randn(shape), torch.randn(shape[0])
    for i in range(2):
        for norm in ("img_attn.norm.query_norm", "img_attn.norm.key_norm", "txt_attn.norm.query_norm",
                     "txt_attn.norm.key_norm"):
            sd[f"double_blocks.{i}.{norm}.scale"] = torch.randn(128)
        for norm in ("norm.query_norm", "norm.key_norm"):
            sd[f"single_blocks.{i}.{norm}.scale"] = torch.randn(128)
    ours, theirs = flux_to_diffusers(dict(sd)), convert_flux_transformer_checkpoint_to_diffusers(dict(sd))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_missing_parts_are_named(flow):
    files = flow["flux"]
    with pytest.raises(CheckpointError) as e:
        load_base(files["transformer"])
    message = str(e.value)
    assert "a FLUX.1 dev transformer without" in message
    for what in ("CLIP-L", "T5-XXL", "VAE (ae.safetensors"):
        assert what in message
    with pytest.raises(CheckpointError, match=r"without the T5-XXL text encoder \(t5xxl_fp16.safetensors\)\. Give it"):
        load_base(files["transformer"], parts=split_parts(files, "flux", t5=None))
    sd3 = flow["sd3"]
    with pytest.raises(CheckpointError, match="SD 3.5 Medium transformer without the CLIP-G text encoder"):
        load_base(sd3["transformer"], parts=split_parts(sd3, "sd3", clip_g=None))


def test_wrong_parts_are_named(flow, tiny_models, tmp_path):
    files, sd3 = flow["flux"], flow["sd3"]
    sdxl = tiny_models["sdxl"][1]
    with pytest.raises(CheckpointError, match="sdxl.safetensors is an SDXL checkpoint, not an SD 3.5 or FLUX.1 "
                                              "transformer"):
        load_base(sdxl, parts=split_parts(files, "flux"))
    with pytest.raises(CheckpointError, match=r"t5: .*clip_l.safetensors is a CLIP text encoder, not the T5-XXL"):
        load_base(files["transformer"], parts=split_parts(files, "flux", t5=files["clip_l"]))
    with pytest.raises(CheckpointError, match=r"vae: .* is an SDXL checkpoint, not the VAE"):
        load_base(files["transformer"], parts=split_parts(files, "flux", vae=sdxl))
    sd_vae = tmp_path / "sd-vae.safetensors"  # an SD 1.x/SDXL VAE (4 latent channels) named as ae.safetensors
    save_file({k.removeprefix("first_stage_model."): v for k, v in load_file(tiny_models["sd1"][1]).items()
               if k.startswith("first_stage_model.")}, sd_vae)
    with pytest.raises(CheckpointError, match="vae: sd-vae.safetensors has width 4 .* a 4-channel SD VAE"):
        load_base(files["transformer"], parts=split_parts(files, "flux", vae=sd_vae))
    with pytest.raises(CheckpointError, match="the two look swapped"):
        load_base(sd3["transformer"], parts=split_parts(sd3, "sd3", clip_l=sd3["clip_g"], clip_g=sd3["clip_l"]))
    with pytest.raises(CheckpointError, match="has no clip_g part"):
        load_base(files["transformer"], parts=split_parts(files, "flux", clip_g=sd3["clip_g"]))
    with pytest.raises(CheckpointError, match=r"t5: .*has width 32 where this SD 3.5 transformer takes 40"):
        _sd3_with_wider_context(sd3, tmp_path)
    with pytest.raises(CheckpointError, match="go with a transformer file"):
        load_base(sd3["folder"], parts=split_parts(sd3, "sd3"))


def _sd3_with_wider_context(sd3, tmp_path):
    state = load_file(sd3["transformer"])
    state["context_embedder.weight"] = torch.zeros(state["context_embedder.weight"].shape[0], 40)
    path = tmp_path / "wider.safetensors"
    save_file(state, path)
    load_base(path, parts=split_parts(sd3, "sd3"))


def test_t5_tokenizer_is_named_when_missing(flow, monkeypatch, tmp_path):
    import trainer.transformer_files as tf

    monkeypatch.setattr(tf, "T5_TOKENIZER_DIR", tmp_path / "none")
    with pytest.raises(CheckpointError, match="the T5-XXL tokenizer is needed and not found offline"):
        load_base(flow["flux"]["single"])


def test_detection_says_what_a_file_is(flow, tmp_path):
    assert detect(read_safetensors_shapes(flow["sd3"]["transformer"])) == "sd3"
    with pytest.raises(CheckpointError, match="this file is a T5 text encoder, not a base model"):
        detect(read_safetensors_shapes(flow["flux"]["t5"]), "t5xxl_fp16.safetensors")
    with pytest.raises(CheckpointError, match="this file is a CLIP text encoder"):
        detect(read_safetensors_shapes(flow["sd3"]["clip_g"]))
    fill = {k: v for k, v in read_safetensors_shapes(flow["flux"]["transformer"]).items()}
    fill["img_in.weight"] = (fill["img_in.weight"][0], 384)
    with pytest.raises(CheckpointError, match="FLUX.1 Fill / Depth"):
        detect(fill, "flux1-fill-dev.safetensors")
    with pytest.raises(CheckpointError, match="flow-matching model"):
        load_base(flow["flux"]["folder"], prediction_type="v_prediction")


@pytest.mark.parametrize("arch", FAMILIES)
def test_sampling_draws_the_right_picture(flow, arch):
    model = load_layout(flow, arch, "folder")
    first = generate(model, "a red circle", seed=1, **DRAW)
    assert first.size == (64, 32)
    assert np.array_equal(pixels(first), pixels(generate(model, "a red circle", seed=1, **DRAW)))
    assert not np.array_equal(pixels(first), pixels(generate(model, "a red circle", seed=2, **DRAW)))
    assert not np.array_equal(pixels(first), pixels(generate(model, "a blue square", seed=1, **DRAW)))
    other_guidance = dict(DRAW, cfg_scale=1.0)
    assert not np.array_equal(pixels(first), pixels(generate(model, "a red circle", seed=1, **other_guidance)))
    split = load_layout(flow, arch, "split")  # the same weights draw the same picture, pixel for pixel
    assert np.array_equal(pixels(first), pixels(generate(split, "a red circle", seed=1, **DRAW)))
    with pytest.raises(ValueError, match="flow-matching Euler"):
        generate(model, "a red circle", seed=1, **dict(DRAW, sampler="euler_a"))


def test_flux_schnell_is_told_apart_and_samples(tmp_path):
    files = flow_layouts("flux", tmp_path, variant="schnell")
    model = load_base(files["single"], parts=Parts(t5_tokenizer=files["t5_tokenizer"]))
    assert (model.variant, model.pipeline.scheduler.config.use_dynamic_shifting) == ("flux1-schnell", False)
    assert generate(model, "a red circle", seed=1, **DRAW).size == (64, 32)


def test_parameters_say_how_it_was_drawn():
    text = parameters_text("a cat", sampler="euler", steps=20, cfg_scale=3.5, seed=7, width=64, height=32,
                           model="flux1-dev", negative="ugly", arch="flux")
    assert text == ("a cat\nSteps: 20, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 7, "
                    "Size: 64x32, Model: flux1-dev")
    sd3 = parameters_text("a cat", sampler="euler", steps=28, cfg_scale=5.0, seed=7, width=64, height=32,
                          model="sd3.5", negative="ugly", arch="sd3")
    assert sd3.splitlines()[1:] == ["Negative prompt: ugly", "Steps: 28, Sampler: Euler, CFG scale: 5.0, Seed: 7, "
                                                             "Size: 64x32, Model: sd3.5"]


@pytest.mark.parametrize("arch", FAMILIES)
def test_they_train_with_their_own_family_and_the_linear_methods(flow, tiny_models, arch):
    """Every method but LoCon trains the transformer's Linears (tests/test_flow_training.py); a base given with an SD
    family, LoCon (3x3 convs: the transformer has none) or a preset without a variant for the family is refused by
    name, saying why."""
    name = {"sd3": "SD 3.5", "flux": "FLUX.1"}[arch]
    for base in (flow[arch]["single"], flow[arch]["transformer"], flow[arch]["folder"]):
        with pytest.raises(config.ConfigError, match=rf"is {re.escape(name)}: set family = '{arch}' \(its preset "
                                                     r"variant\), not 'sd15'") as e:
            config.build(None, "sd15", {"pretrained_model_name_or_path": str(base), "max_train_steps": 1})
        assert e.value.field == "model.pretrained_model_name_or_path"
    cfg = config.build("character", family_of(flow[arch]["single"]),
                       {"pretrained_model_name_or_path": str(flow[arch]["folder"])})
    assert (cfg.family, cfg.network.network_type, cfg.sample.sample_sampler) == (arch, "lora", "euler")
    assert cfg.network.network_train_unet_only and cfg.training.min_snr_gamma == 0 and cfg.data.resolution == 1024
    for method in ("loha", "lokr", "dora", "vera", "adalora", "rslora", "lora_fa"):
        assert config.build("character", arch, {"network_type": method}).network.network_type == method
    with pytest.raises(config.ConfigError, match=rf"locon adapts 3x3 convs, and {re.escape(name)}'s transformer") as e:
        config.build("character", arch, {"network_type": "locon", "conv_dim": 8})
    assert e.value.field == "network.network_type"
    for preset, method in (("style", "lora"), ("scene", "lora"), ("lokr", "lokr")):  # every preset has the family's
        cfg = config.build(preset, arch)
        assert (cfg.family, cfg.network.network_type, cfg.network.conv_dim, cfg.data.resolution) == (
            arch, method, 0, 1024)
        assert cfg.optimizer.unet_lr <= 3e-4 and cfg.training.min_snr_gamma == 0 and cfg.model.gradient_checkpointing
    with pytest.raises(config.ConfigError, match=rf"is not {re.escape(name)}$"):
        config.build("character", arch, {"pretrained_model_name_or_path": str(tiny_models["sdxl"][1])})


def test_the_train_tab_says_what_trains(flow, tiny_models):
    from ui.train_tab import explain_base

    for arch, name in (("sd3", "SD 3.5"), ("flux", "FLUX.1")):
        said = explain_base(str(flow[arch]["single"]))
        assert said.startswith(f"⚠ Detected: **{name}**.") and "train the transformer's Linears" in said, said
        assert "every method but LoCon" in said and "LyCORIS files for loha, lokr, dora" in said, said
        assert "text-encoder LoRA (network_train_unet_only = false, text_encoder_lr > 0) trains CLIP with it, " \
               "never T5" in said, said
        assert "CLIP-L and CLIP-G, with every method; pruning when saving works on their LoRA-form files" in said
        assert said.endswith("not built for them yet (issue #17): NF4."), said
    assert explain_base(str(tiny_models["sdxl"][1])) == "Detected: **SDXL** presets apply."


def test_sd_bases_still_train(tiny_models):
    cfg = config.build("character", "sdxl", {"pretrained_model_name_or_path": str(tiny_models["sdxl"][1])})
    assert cfg.model.pretrained_model_name_or_path.endswith("sdxl.safetensors")


def test_ddpm_only_options_are_refused_with_the_reason(flow):
    for arch, name in (("flux", "FLUX.1"), ("sd3", "SD 3.5")):
        with pytest.raises(config.ConfigError, match=rf"{re.escape(name)}'s rectified flow reaches pure noise") as e:
            config.build("character", arch, {"noise_offset": 0.05})
        assert e.value.field == "training.noise_offset"

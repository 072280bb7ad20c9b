"""The compare worker on the tiny SD 3.5 / FLUX.1 models (issue #17): files as we write them (FLUX.1 LoRA in kohya's
format with fused q|k|v, SD 3.5 LoRA in diffusers' format, LoKr / DoRA under LyCORIS keys) are hot-swapped into the
diffusers transformer; each cell is the picture a freshly loaded pipeline draws with the file merged by independent
arithmetic (ComfyUI's, on the original BFL / SAI layout, converted back; diffusers' B @ A for SD 3.5's LoRA), the
touched weights come back bit for bit, and a file of another family is named and skipped."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from PIL import Image
from safetensors.torch import load_file

from tests.test_compare import adapter_file, cells_by_key, cli, pixels, write_spec
from tests.test_flow_names import comfy_apply_kohya, comfy_apply_lycoris, comfy_lycoris_keys, comfy_unet_keys
from tests.test_networks import net_config
from tests.tiny_models import flow_layouts, flux_to_original, sd3_to_original
from trainer import compare as engine
from trainer.compare_spec import CompareError, checked
from trainer.events import read_all
from trainer.export import save_atomic, to_kohya
from trainer.loading import load_base
from trainer.networks import create
from trainer.sampling import generate
from trainer.transformer_files import flux_to_diffusers

FAMILIES = ("flux", "sd3")
VERSION = {"flux": "flux1", "sd3": "5-medium"}  # as sd-scripts writes them
ARCHITECTURE = {"flux": "flux-1-dev", "sd3": "stable-diffusion-3-5-medium"}
DRAW = dict(sampler="euler", steps=2, cfg_scale=3.5, clip_skip=1, negative="", width=64, height=64)
PROMPT = "a red circle"


def flow_file(folder: Path, arch: str, kind: str, path: Path, meta: dict | None = None) -> Path:
    """A file of `kind` as a run of ours writes it (trainer.export), with random factors large enough to change
    the picture; its metadata as our export says the family."""
    model = load_base(folder)
    net = create(net_config(kind, conv_dim=0), arch, {"transformer": model.denoiser})
    torch.manual_seed(11)
    with torch.no_grad():  # a Kronecker product of small factors is smaller still: LoKr's are drawn larger
        for p in net.parameters_of("transformer"):
            p.add_(torch.randn_like(p) * (0.6 if kind == "lokr" else 0.3))
    form = "lycoris" if net.exports_as == "lycoris" else "lora"
    said = {"ss_base_model_version": VERSION[arch], "modelspec.architecture": f"{ARCHITECTURE[arch]}/{form}"}
    return save_atomic(to_kohya(net, torch.float32), said | (meta or {}), path)


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-flow")
    layouts = {arch: flow_layouts(arch, root) for arch in FAMILIES}
    files = {(arch, kind): flow_file(layouts[arch]["folder"], arch, kind, root / f"{arch}-{kind}.safetensors")
             for arch in FAMILIES for kind in ("lora", "lokr", "dora")}
    return layouts, files


def merged_state(arch: str, transformer, path: Path, strength: float) -> dict[str, torch.Tensor]:
    """The diffusers transformer's weights with the file merged at `strength`, by arithmetic that shares nothing
    with trainer.compare: kohya and LyCORIS files as ComfyUI patches the original layout (tests/test_flow_names),
    converted back; SD 3.5's diffusers-format file as diffusers reads it, W += B @ A."""
    sd, base = load_file(str(path)), {k: v.clone() for k, v in transformer.state_dict().items()}
    if arch == "sd3" and all(k.startswith("transformer.") for k in sd):
        full = dict(base)
        for stem in {k.rsplit(".lora_", 1)[0] for k in sd}:
            key = stem.removeprefix("transformer.") + ".weight"
            full[key] = full[key] + sd[stem + ".lora_B.weight"] @ sd[stem + ".lora_A.weight"]
    else:
        original = flux_to_original(transformer) if arch == "flux" else sd3_to_original(transformer)
        if any(k.startswith("lycoris_") for k in sd):
            patched = comfy_apply_lycoris(original, comfy_lycoris_keys(arch, transformer, original), sd)
        else:
            patched = comfy_apply_kohya(original, comfy_unet_keys(original), sd)[0]
        full = flux_to_diffusers(patched) if arch == "flux" else convert_sd3_transformer_checkpoint_to_diffusers(patched)
    return {k: base[k] + strength * (full[k] - base[k]) for k in base}


def fresh_merged(folder: Path, arch: str, path: Path, strength: float):
    model = load_base(folder)
    model.denoiser.load_state_dict(merged_state(arch, model.denoiser, path, strength))
    return model


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_hot_swapped_cell_is_what_a_fresh_pipeline_with_the_file_merged_draws(flow, arch, tmp_path):
    layouts, files = flow
    kinds = ("lora", "lokr")
    folder = write_spec(tmp_path / "c", base=str(layouts[arch]["folder"]), files=[str(files[arch, k]) for k in kinds],
                        labels=list(kinds), strengths=[0, 0.5, 1], prompts=[PROMPT], seeds=[5], **DRAW)
    assert engine.compare(folder, SimpleNamespace(requested=False)) == "done"
    said = {e["label"]: (e["arch"], e["method"], e["problem"]) for e in read_all(folder) if e["type"] == "compare_file"}
    assert said == {"lora": (arch, "lora", ""), "lokr": (arch, "lokr", "")}
    cells = cells_by_key(folder)
    base = pixels(generate(load_base(layouts[arch]["folder"]), PROMPT, seed=5, **DRAW))
    assert np.array_equal(pixels(Image.open(cells[(None, 0.0, 0, 5)])), base)  # strength 0: the base, exactly
    worst = {}
    for i, kind in enumerate(kinds):
        for strength in (0.5, 1.0):
            want = pixels(generate(fresh_merged(layouts[arch]["folder"], arch, files[arch, kind], strength), PROMPT,
                                   seed=5, **DRAW))
            worst[kind, strength] = int(np.abs(pixels(Image.open(cells[(i, strength, 0, 5)])) - want).max())
            assert np.abs(want - base).max() > 20, f"{kind} at {strength} hardly changes the picture"
    print(f"{arch}: largest pixel difference, hot-swapped vs freshly merged:", worst)
    assert max(worst.values()) <= 2, worst
    guidance = "CFG scale: 1, Distilled CFG Scale: 3.5" if arch == "flux" else "CFG scale: 3.5"
    assert f"Sampler: Euler, {guidance}, Seed: 5" in Image.open(cells[(0, 1.0, 0, 5)]).info["parameters"]


@pytest.mark.parametrize("arch", FAMILIES)
def test_the_swapped_weights_are_the_merged_ones_and_come_back_bit_for_bit(flow, arch):
    """Weights, not pictures: at each strength the transformer holds the reference merge (fused modules split by
    rows, swapped halves swapped back), and after the swap every weight is what it was, bit for bit. DoRA's
    renormalised weight is not linear in the strength: checked at 1."""
    layouts, files = flow
    base = load_base(layouts[arch]["folder"])
    before = {k: v.clone() for k, v in base.denoiser.state_dict().items()}
    strengths = {"lora": (1.0, -0.5), "lokr": (1.0, 0.5), "dora": (1.0,)}
    merged = {kind: merged_state(arch, base.denoiser, files[arch, kind], 1.0) for kind in strengths}
    swap = engine.HotSwap(engine.base_weights(base))
    worst = {}
    for kind, values in strengths.items():
        for strength in values:
            swap.use(files[arch, kind], strength)
            now = base.denoiser.state_dict()
            want = {k: before[k] + strength * (v - before[k]) for k, v in merged[kind].items()}
            worst[kind, strength] = max((now[k] - want[k]).abs().max().item() for k in want)
            assert sum(not torch.equal(now[k], before[k]) for k in before) > 10, kind
        swap.use(None, 0.0)
        assert all(torch.equal(v, before[k]) for k, v in base.denoiser.state_dict().items()), f"{kind}: not restored"
    print(f"{arch}: largest weight difference, swapped vs reference merge:", worst)
    assert max(worst.values()) <= 1e-5, worst


@pytest.mark.parametrize("arch, fmt", [("flux", "kohya"), ("sd3", "kohya"), ("sd3", "diffusers")])
def test_every_module_of_a_file_lands_on_its_diffusers_weight(flow, arch, fmt, tmp_path):
    """A LoRA on every Linear flow_names maps (embedders, the final layer with its swapped halves, SD 3.5's last
    context modulation, CLIP-L / CLIP-G), written fused (kohya) or split (diffusers) by flow_names.export: swapped
    in, each diffusers weight is W0 + s · its own split ΔW; restored, the transformer and text encoders are bit for
    bit what they were."""
    from safetensors.torch import save_file

    from tests.test_flow_names import random_loras, tes
    from trainer import flow_names

    base = load_base(flow[0][arch]["folder"])
    loras = random_loras(arch, base.pipeline)
    modules = flow_names.plan(arch, base.denoiser, tes(arch, base.pipeline))
    path = tmp_path / "every.safetensors"
    save_file({k: v.contiguous() for k, v in flow_names.export(arch, modules, loras, fmt).items()}, str(path),
              metadata={"ss_base_model_version": VERSION[arch]})
    models = {"transformer": base.denoiser} | tes(arch, base.pipeline)
    before = {f"{c}.{k}": v.clone() for c, m in models.items() for k, v in m.state_dict().items()}
    found = engine.inspect(0, "every", path, arch, engine.base_weights(base))
    assert (found.arch, found.method, found.problem) == (arch, "lora", "")
    swap = engine.HotSwap(engine.base_weights(base))
    swap.use(path, 0.75)
    now = {f"{c}.{k}": v for c, m in models.items() for k, v in m.state_dict().items()}
    want = dict(before)
    for name, lora in loras.items():
        want[name + ".weight"] = before[name + ".weight"] + 0.75 * lora.delta()
    worst = max((now[k] - want[k]).abs().max().item() for k in want)
    print(f"{arch} {fmt}: {len(loras)} modules, largest weight difference {worst:.2e}")
    assert worst <= 1e-5 and any(k.startswith("text_encoder.") and not torch.equal(now[k], before[k]) for k in now)
    swap.restore()
    assert all(torch.equal(now[k], before[k]) for k in before)


def test_a_file_of_another_family_is_named_and_skipped(flow, tiny_models, tmp_path):
    layouts, files = flow
    bases = {arch: load_base(layouts[arch]["folder"]) for arch in FAMILIES}
    weights = {arch: engine.base_weights(b) for arch, b in bases.items()}
    sd15 = tiny_models["sd1"][1]
    sd15_file = adapter_file(sd15, "sd1", "lora", tmp_path / "sd15.safetensors")
    bare = save_atomic(load_file(str(sd15_file)), {}, tmp_path / "sd15-bare.safetensors")  # no metadata
    flux_bare = save_atomic(load_file(str(files["flux", "lora"])), {}, tmp_path / "flux-bare.safetensors")
    lokr_bare = save_atomic(load_file(str(files["sd3", "lokr"])), {}, tmp_path / "sd3-lokr-bare.safetensors")
    blocks = save_atomic({k: v for k, v in load_file(str(files["sd3", "lokr"])).items()  # names both families use
                          if k.startswith("lycoris_transformer_blocks_0_attn_to_")}, {}, tmp_path / "blocks.safetensors")
    weights["sd1"] = engine.base_weights(load_base(sd15))

    def problem(path, arch):
        return engine.inspect(0, "x", path, arch, weights[arch]).problem

    assert problem(sd15_file, "flux") == "made for SD 1.x, the base is FLUX.1"
    assert problem(bare, "sd3") == "made for SD 1.x / 2.x (its modules are a UNet's), the base is SD 3.5"
    assert problem(files["flux", "lora"], "sd3") == "made for FLUX.1, the base is SD 3.5"
    assert problem(flux_bare, "sd3") == "made for FLUX.1, the base is SD 3.5"  # told by its double/single blocks
    assert problem(files["sd3", "lora"], "flux") == "made for SD 3.5, the base is FLUX.1"
    assert problem(lokr_bare, "sd1") == "made for SD 3.5, the base is SD 1.x"  # SD 3.5's attn2 proj tells
    assert problem(blocks, "sd1") == "made for SD 3.5 or FLUX.1 (its modules are a transformer's), the base is SD 1.x"
    assert problem(blocks, "sd3") == ""  # names both families use: the shapes decide (tiny SD 3.5: 128 wide)
    assert problem(blocks, "flux") == ("lycoris_transformer_blocks_0_attn_to_add_out: its update is (128, 128), the "
                                       "base's weight (64, 64)")
    # a module of the right family that does not fit: named by module and shape
    sd = load_file(str(files["flux", "lora"]))
    sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.zeros(64, 12)  # rows of q only
    wrong = save_atomic(sd, {"ss_base_model_version": "flux1"}, tmp_path / "wrong.safetensors")
    assert problem(wrong, "flux") == ("lora_unet_double_blocks_0_img_attn_qkv: its update is (64, 64), the base's "
                                      "weight (192, 64)")
    # the compare goes on with the files that fit, and says why the others are out
    folder = write_spec(tmp_path / "c", base=str(layouts["flux"]["folder"]),
                        files=[str(files["flux", "lora"]), str(sd15_file), str(files["sd3", "lora"])],
                        labels=["flux", "sd15", "sd3"], strengths=[1], prompts=[PROMPT], seeds=[1], **DRAW)
    assert engine.compare(folder, SimpleNamespace(requested=False)) == "done"
    said = {e["label"]: e["problem"] for e in read_all(folder) if e["type"] == "compare_file"}
    assert said == {"flux": "", "sd15": "made for SD 1.x, the base is FLUX.1",
                    "sd3": "made for SD 3.5, the base is FLUX.1"}
    assert sorted(cells_by_key(folder)) == [(0, 1.0, 0, 1)]


def test_what_a_flow_base_cannot_draw_is_refused_by_name(flow, tmp_path):
    layouts, files = flow
    for change, said in (({"sampler": "euler_a"}, "sampler: FLUX.1 samples with flow-matching Euler: use 'euler'"),
                         ({"width": 72}, "width: FLUX.1 draws sides that are multiples of 16 (got 72)")):
        folder = write_spec(tmp_path / next(iter(change)), base=str(layouts["flux"]["folder"]),
                            files=[str(files["flux", "lora"])], prompts=[PROMPT], **DRAW | change)
        with pytest.raises(CompareError, match=said.replace("(", r"\(").replace(")", r"\)")):
            engine.compare(folder, SimpleNamespace(requested=False))
    with pytest.raises(CompareError, match="parts: t5xxl: no such file"):
        checked(dict(base="x", files=[str(files["flux", "lora"])], prompts=["x"], parts={"t5xxl": "/nowhere"}))
    with pytest.raises(CompareError, match="parts: clip_x is none of clip_l"):
        checked(dict(base="x", files=[str(files["flux", "lora"])], prompts=["x"], parts={"clip_x": "a"}))


def test_the_command_draws_a_split_layout_flux_base_with_its_parts(flow, tmp_path):
    """`python -m trainer compare --base <transformer file> --clip-l ... --t5xxl ... --vae ...`: the separate files
    go into compare.json as `parts`, the worker loads the base so and draws what the diffusers folder of the same
    model draws; the cells say FLUX.1's guidance as Forge writes it."""
    layouts, files = flow
    lay = layouts["flux"]
    out = tmp_path / "split"
    r = cli("--base", lay["transformer"], "--clip-l", lay["clip_l"], "--t5xxl", lay["t5"], "--ae", lay["vae"],
            "--t5-tokenizer", lay["t5_tokenizer"], "--files", files["flux", "lora"], "--strengths", "1",
            "--prompts", PROMPT, "--seeds", "2", "--steps", "2", "--sampler", "euler", "--cfg-scale", "3.5",
            "--width", "64", "--height", "64", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "compare.json").read_text())["parts"] == {
        "clip_l": str(lay["clip_l"]), "t5xxl": str(lay["t5"]), "vae": str(lay["vae"]),
        "t5_tokenizer": str(lay["t5_tokenizer"])}
    folder = write_spec(tmp_path / "folder", base=str(lay["folder"]), files=[str(files["flux", "lora"])],
                        strengths=[1], prompts=[PROMPT], seeds=[2], **DRAW)
    assert engine.compare(folder, SimpleNamespace(requested=False)) == "done"
    got, want = (Image.open(cells_by_key(c)[(0, 1.0, 0, 2)]) for c in (out, folder))
    assert np.abs(pixels(got) - pixels(want)).max() <= 2
    assert "Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 2" in got.info["parameters"]


def test_a_bf16_base_swaps_in_its_own_dtype_and_restores_bit_for_bit(flow):
    """The app compares SD 3.5 / FLUX.1 runs in bf16 (ui.compares.run_settings): the fused parts are written in
    bf16 (W0 + s · ΔW rounded once) and put back exactly."""
    layouts, files = flow
    base = load_base(layouts["flux"]["folder"], dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in base.denoiser.state_dict().items()}
    swap = engine.HotSwap(engine.base_weights(base))
    swap.use(files["flux", "lora"], 1.0)
    now = base.denoiser.state_dict()
    want = merged_state("flux", load_base(layouts["flux"]["folder"]).denoiser, files["flux", "lora"], 1.0)
    qkv = "transformer_blocks.0.attn.to_k.weight"  # a part of the fused img_attn.qkv
    assert now[qkv].dtype == torch.bfloat16 and not torch.equal(now[qkv], before[qkv])
    assert max((now[k].float() - want[k]).abs().max().item() / (want[k].abs().max().item() + 1e-6)
               for k in want) < 1e-2  # bf16 keeps 8 bits of mantissa
    swap.restore()
    assert all(torch.equal(v, before[k]) for k, v in base.denoiser.state_dict().items())

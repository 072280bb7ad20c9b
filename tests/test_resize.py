"""trainer.resize on real exported LoCon files: rank cuts checked against an independent SVD of every module's
update, LoRA-drop against the modules' own norms, the tiny UNet's output, diffusers' loader and the command line."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests import lora_files
from tests.test_networks import components, net_config, randomize
from trainer.__main__ import main
from trainer.export import save_atomic, to_kohya
from trainer.kohya_names import by_module
from trainer.loading import load_base
from trainer.networks import create, find_targets
from trainer.resize import ATTENTION, ResizeError, resize_file, resize_tensors

ROOT = Path(__file__).resolve().parent.parent
BASE_VERSION = {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}


def lora_file(tiny_models, arch: str, path: Path, kind: str = "locon") -> Path:
    cfg = net_config(kind, network_dim=8, network_alpha=4.0, conv_dim=4, conv_alpha=2.0)
    net = create(cfg, arch, components(load_base(tiny_models[arch][1])))
    randomize(net)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
            "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "2.0"}), "ss_output_name": "tiny",
            "ss_base_model_version": BASE_VERSION[arch], "ss_tag_frequency": json.dumps({"d": {"zxq": 3}}),
            "sshs_model_hash": "0123abcd"}
    return save_atomic(to_kohya(net, torch.float32), meta, path)


@pytest.fixture(scope="module")
def sd1_file(tiny_models, tmp_path_factory) -> Path:
    return lora_file(tiny_models, "sd1", tmp_path_factory.mktemp("resize") / "locon.safetensors")


def deltas(modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each module's ΔW as a loader computes it, flattened to [out, in·kh·kw], in float64."""
    return {name: lora_files.delta({k: v.double() for k, v in p.items()},
                                   (p["lora_up.weight"].shape[0], p["lora_down.weight"][0].numel()))
            for name, p in modules.items()}


def ranks(path: Path) -> dict[str, int]:
    return {name: p["lora_down.weight"].shape[0] for name, p in lora_files.modules(path).items()}


def test_a_rank_cut_makes_the_file_smaller_and_every_rank_at_most_the_cap(sd1_file, tmp_path):
    report = resize_file(sd1_file, tmp_path / "r2.safetensors", rank=2, precision="float")
    before, after = sd1_file.stat().st_size, (tmp_path / "r2.safetensors").stat().st_size
    print(f"rank 8/conv 4 -> 2, float32: {before / 2**20:.3f} MB -> {after / 2**20:.3f} MB")
    assert after < 0.6 * before  # linear modules keep 2 of 8, convs 2 of 4
    got = ranks(tmp_path / "r2.safetensors")
    assert set(got) == set(ranks(sd1_file)) and set(got.values()) == {2}
    assert all(m.new_rank == 2 and m.old_rank in (8, 4) for m in report.modules)
    resize_file(sd1_file, tmp_path / "r2-fp16.safetensors", rank=2)  # the default precision, fp16
    assert (tmp_path / "r2-fp16.safetensors").stat().st_size < 0.6 * after


def test_at_save_time_the_trainer_keeps_its_dtype(sd1_file):
    tensors = {k: v.half() for k, v in load_file(str(sd1_file)).items()}
    out, _ = resize_tensors(tensors, rank=3)
    assert {v.dtype for k, v in out.items() if not k.endswith("alpha")} == {torch.float16}
    assert {v.dtype for k, v in out.items() if k.endswith("alpha")} == {torch.float32}


@pytest.mark.parametrize("energy", [0.5, 0.9])
def test_energy_keeps_the_fraction_with_the_fewest_ranks_and_loses_only_the_dropped_sigmas(sd1_file, energy):
    src = lora_files.modules(sd1_file)
    out, report = resize_tensors(load_file(str(sd1_file)), energy=energy)
    before, after = deltas(src), deltas(by_module(out))
    torch.manual_seed(0)
    for m in report.modules:
        s2 = torch.linalg.svdvals(before[m.name]).square()
        kept = torch.cumsum(s2, 0) / s2.sum()
        k = m.new_rank
        assert k == by_module(out)[m.name]["lora_down.weight"].shape[0] and out[f"{m.name}.alpha"].item() == 4.0
        assert kept[k - 1] >= energy and (k == 1 or kept[k - 2] < energy), (m.name, kept)
        assert abs(m.kept - kept[k - 1].item()) < 1e-6
        error = before[m.name] - after[m.name]
        dropped = s2[k:].sum().item()
        assert abs(error.square().sum().item() - dropped) <= 1e-4 * dropped + 1e-12 * s2.sum().item(), m.name
        x = torch.randn(error.shape[1], 16, dtype=torch.float64)
        sigma_next = s2[k].sqrt().item() if k < len(s2) else 0.0
        rounding = 1e-6 * s2[0].sqrt().item()  # the factors are stored in float32
        assert ((error @ x).norm(dim=0) <= (sigma_next * (1 + 1e-4) + rounding) * x.norm(dim=0)).all(), m.name
    cut = [m for m in report.modules if m.new_rank < m.old_rank]
    print(f"energy {energy}: {len(cut)}/{len(report.modules)} modules cut, kept {report.kept_energy:.4f} of Σσ²")
    assert cut and report.kept_energy >= energy


def apply(unet, path: Path, arch: str = "sd1") -> None:
    """Add the file's updates to the UNet's weights, the way ComfyUI merges a LoRA at strength 1."""
    targets = {t.name: t for t in find_targets(arch, {"unet": unet}, with_convs=True)}
    with torch.no_grad():
        for name, params in lora_files.modules(path).items():
            if name.startswith("lora_unet_"):
                weight = unet.get_submodule(targets[name].path).weight
                weight += lora_files.delta(params, weight.shape)


def test_pruning_changes_the_unet_less_than_removing_the_lora(tiny_models, sd1_file, tmp_path):
    report = resize_file(sd1_file, tmp_path / "pruned.safetensors", energy=0.8, drop=0.2, precision="float")
    base = load_base(tiny_models["sd1"][1]).unet
    full, pruned = copy.deepcopy(base), copy.deepcopy(base)
    apply(full, sd1_file)
    apply(pruned, tmp_path / "pruned.safetensors")
    torch.manual_seed(1)
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 64)
    with torch.no_grad():
        out = {k: u(latents, torch.tensor([10, 500]), context).sample for k, u in
               (("base", base), ("full", full), ("pruned", pruned))}
    from_pruning, from_removal = (out["pruned"] - out["full"]).norm(), (out["base"] - out["full"]).norm()
    print(f"kept {report.kept_energy:.3f} of Σσ²: output change {from_pruning:.4g} vs {from_removal:.4g} without")
    assert 0 < from_pruning < from_removal


def test_drop_removes_exactly_the_least_energy_modules(sd1_file):
    unet_only = {k: v for k, v in load_file(str(sd1_file)).items() if k.startswith("lora_unet_")}
    before = deltas(by_module(unet_only))
    energy = {name: d.square().sum().item() for name, d in before.items()}
    out, report = resize_tensors(unet_only, drop=0.25)
    n = int(0.25 * len(energy))
    assert n >= 3
    assert set(by_module(out)) == set(sorted(energy, key=energy.get)[n:])
    assert {m.name for m in report.dropped} == set(sorted(energy, key=energy.get)[:n])
    for name, d in deltas(by_module(out)).items():  # the kept ones are re-factored, with the same update
        assert (d - before[name]).norm() <= 1e-6 * before[name].norm(), name


def test_drop_keeps_text_encoder_attention_layers_whole_for_webui(tiny_models, tmp_path):
    tensors = load_file(str(lora_file(tiny_models, "sdxl", tmp_path / "xl.safetensors")))
    layer = "lora_te2_text_model_encoder_layers_{}_self_attn_{}_proj"
    for proj in ("q", "k", "v", "out"):  # layer 0: the weakest attention layer of all, as a whole
        tensors[f"{layer.format(0, proj)}.lora_up.weight"] *= 1e-2
    tensors[f"{layer.format(1, 'q')}.lora_up.weight"] *= 1e-3  # layer 1: only its q is the weakest module
    energy = {name: d.square().sum().item() for name, d in deltas(by_module(tensors)).items()}
    out, report = resize_tensors(tensors, drop=0.4)
    kept, dropped = set(by_module(out)), {m.name for m in report.dropped}
    assert {layer.format(0, p) for p in ("q", "k", "v", "out")} <= dropped
    assert {layer.format(1, p) for p in ("q", "k", "v", "out")} <= kept
    layers: dict[str, set[str]] = {}
    for name in energy:
        if m := ATTENTION.match(name):
            layers.setdefault(m[1], set()).add(name)
    assert len(layers) == 4 and all(len(names) == 4 and (names <= kept or names <= dropped)
                                    for names in layers.values())
    budget = int(0.4 * len(energy))
    assert budget - 3 <= len(dropped) <= budget
    single = [n for n in energy if not ATTENTION.match(n)]
    assert max(energy[n] for n in single if n in dropped) < min(energy[n] for n in single if n in kept)
    print(f"sdxl drop 0.4: {len(dropped)} of {len(energy)} dropped (budget {budget}), "
          f"{sum(names <= dropped for names in layers.values())} of {len(layers)} attention layers, whole")


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_loads_the_pruned_file_and_its_metadata_survives(tiny_models, tmp_path, caplog, arch):
    src = lora_file(tiny_models, arch, tmp_path / "in.safetensors")
    dst = tmp_path / "out.safetensors"
    report = resize_file(src, dst, rank=6, energy=0.8, drop=0.1)
    model = load_base(tiny_models[arch][0])
    pipe = model.pipeline
    assert pipe.unet is model.unet

    def image():
        return pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    before = image()
    layers = {t.name: t for t in find_targets(arch, components(model), with_convs=True)}
    caplog.clear()
    pipe.load_lora_weights(str(dst))
    complaints = [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    assert not [m for m in complaints if "unexpected" in m.lower() or "not loaded" in m.lower()], complaints
    assert {"unet", "text_encoder"} <= set(pipe.get_list_adapters())
    assert abs(image() - before).max() > 1e-4
    for name, params in lora_files.modules(dst).items():  # at the file's scale: diffusers can ignore an alpha
        layer = components(model)[layers[name].component].get_submodule(layers[name].path)
        got = layer.get_delta_weight(next(iter(layer.lora_A))).float()
        want = lora_files.delta(params, got.shape)
        assert (got - want).norm() <= 1e-3 * want.norm(), name
    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_output_name"] == "tiny" and meta["ss_base_model_version"] == BASE_VERSION[arch]
    assert json.loads(meta["ss_tag_frequency"]) == {"d": {"zxq": 3}}
    assert meta["ss_network_module"] == "networks.lora" and meta["sshs_model_hash"] == lora_files.webui_hash(dst)
    conv = {n: p["lora_down.weight"].shape[0] for n, p in lora_files.modules(dst).items()
            if p["lora_down.weight"].dim() == 4 and p["lora_down.weight"].shape[-1] == 3}
    conv_dim = str(min(conv.values())) if len(set(conv.values())) == 1 else "Dynamic"
    assert len(set(ranks(dst).values())) > 1 and meta["ss_network_dim"] == "Dynamic"
    assert meta["ss_network_alpha"] == "4.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": conv_dim, "conv_alpha": "4.0"}
    assert max(ranks(dst).values()) <= 6
    resize = json.loads(meta["ss_resize"])
    kept_energy = resize.pop("kept_energy")
    assert resize == {"rank": 6, "energy": 0.8, "drop": 0.1, "precision": "fp16", "modules_before": len(report.modules),
                      "modules_after": len(report.modules) - len(report.dropped)}
    assert kept_energy == pytest.approx(report.kept_energy, abs=1e-6) and kept_energy < 1


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "resize", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_command_prints_a_summary(sd1_file, tmp_path):
    r = cli(sd1_file, tmp_path / "small.safetensors", "--energy", "0.9", "--drop", "0.1")
    print(r.stdout)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "small.safetensors").is_file()
    n = len(ranks(sd1_file))
    assert f"modules: {n} in" in r.stdout and " MB -> " in r.stdout and "of Σσ² kept" in r.stdout


def test_the_command_refuses_a_loha_file(tiny_models, tmp_path):
    src = lora_file(tiny_models, "sd1", tmp_path / "loha.safetensors", kind="loha")
    r = cli(src, tmp_path / "out.safetensors", "--rank", "2")
    assert r.returncode == 2 and "LoHa" in r.stderr and "LoRA/LoCon" in r.stderr, r.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_dora_is_refused(sd1_file):
    tensors = load_file(str(sd1_file))
    name = next(iter(tensors)).partition(".")[0]
    with pytest.raises(ResizeError, match="dora_scale"):
        resize_tensors(tensors | {f"{name}.dora_scale": torch.ones(1)}, rank=2)


@pytest.mark.parametrize("args, problem", [([], "nothing to do"), (["--energy", "0"], "energy"),
                                           (["--energy", "1.5"], "energy"), (["--drop", "1"], "drop"),
                                           (["--rank", "0"], "rank"), (["--rank", "2", "--precision", "fp8"],
                                                                       "precision")])
def test_bad_arguments_exit_2_naming_the_problem(tmp_path, capsys, args, problem):
    with pytest.raises(SystemExit) as exit_:
        main(["resize", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), *args])
    assert exit_.value.code == 2 and problem in capsys.readouterr().err


def test_bad_arguments_exit_2_from_the_shell(sd1_file, tmp_path):
    r = cli(sd1_file, tmp_path / "out.safetensors", "--energy", "1.5")
    assert r.returncode == 2 and "energy" in r.stderr and "(0, 1]" in r.stderr

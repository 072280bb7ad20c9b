"""One catalog of adapter methods (trainer/methods.py): the network classes, the config, the benchmark and the
README all say what it says, and a class that states a fact of its own is refused when it registers."""

import re
from pathlib import Path

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from bench.methods import METHODS
from tests.test_networks import components, net_config
from trainer import config, methods
from trainer.loading import load_base
from trainer.methods import CATALOG
from trainer.networks import NETWORKS, Network, register

README = Path(__file__).resolve().parent.parent / "README.md"
FILE_KEYS = {"lora": "LoRA", "lycoris": "LyCORIS"}


def test_the_catalog_is_the_registry_the_config_and_the_benchmark():
    assert set(CATALOG) == set(NETWORKS)
    assert all(NETWORKS[name].method is CATALOG[name] for name in CATALOG)
    assert config.field_help("network_type")["choices"] == methods.NAMES
    assert all(f"{m.name} ({m.summary})" in config.field_help("network_type")["help"] for m in CATALOG.values())
    assert METHODS == methods.NAMES


def test_register_refuses_a_name_outside_the_catalog_and_a_class_with_facts_of_its_own():
    with pytest.raises(KeyError, match="not in trainer.methods.CATALOG"):
        register("glora")(type("GLoRA", (Network,), {}))
    with pytest.raises(TypeError, match="sets linear_only: lora's facts come from trainer.methods"):
        register("lora")(type("Stale", (Network,), {"linear_only": True}))
    with pytest.raises(TypeError, match="sets uses_convs"):
        register("vera")(type("Stale", (NETWORKS["lora"],), {"uses_convs": lambda self: False}))
    assert "glora" not in NETWORKS and NETWORKS["lora"].__name__ == "LoRA"


def targets_with(kind: str, arch_model, conv_dim: int) -> list:
    """The modules a method would wrap at this conv_dim (the class built, nothing injected)."""
    net = NETWORKS[kind](net_config(kind, conv_dim=conv_dim), arch_model.arch, components(arch_model))
    return list(net.targets.values())


@pytest.mark.parametrize("kind", sorted(CATALOG))
def test_every_network_does_what_its_entry_says(tiny_models, kind):
    entry = CATALOG[kind]
    model = load_base(tiny_models["sd1"][1])
    for conv_dim in (0, 2):
        targets = targets_with(kind, model, conv_dim)
        wants_convs = entry.convs == "required" or (entry.convs == "optional" and conv_dim > 0)
        assert any(t.conv3x3 for t in targets) == wants_convs, (entry.convs, conv_dim)
        modules = [components(model)[t.component].get_submodule(t.path) for t in targets]
        assert all(isinstance(m, torch.nn.Linear) for m in modules) == entry.linear_only  # SD1: 1x1 proj convs

    from trainer.networks import create

    net = create(net_config(kind, loraplus_lr_ratio=16.0), "sd1", {"unet": model.unet})
    keys = {k for name in net.names() for k in net.factors(name)}
    if entry.exports_as == "lora":
        assert keys == {"lora_down.weight", "lora_up.weight", "alpha"}
    else:
        assert keys & {"hada_w1_a", "lokr_w1", "lokr_w1_a", "dora_scale"}, keys
    through_peft = [isinstance(net.layer(name), BaseTunerLayer) for name in net.names()]
    assert all(through_peft) if entry.trained_through == "peft" else not any(through_peft)
    rates = {g["lr"] for g in net.param_groups("unet", 1e-4)}
    assert rates == ({1e-4, 1e-4 * 16.0} if entry.loraplus else {1e-4})
    assert ("trained_as" in net.network_args()) == (not entry.native)


def readme_rows() -> dict[str, list[str]]:
    """First cell -> the other cells, for the rows of the README's table of methods."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Adapter methods"):]
    section = section[: section.index("\n\n", section.index("|---"))]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| ")]
    return {row[0]: row[1:] for row in rows[1:]}


def test_the_readme_table_has_every_method_with_its_file_keys_and_convs():
    rows = readme_rows()
    listed = {cell.strip("`"): cells for cell, cells in rows.items() if re.fullmatch(r"`\w+`", cell)}
    assert set(listed) == set(CATALOG)
    for name, entry in CATALOG.items():
        assert listed[name][:2] == [FILE_KEYS[entry.exports_as], entry.convs], name
    loraplus = next(cell for cell in rows if cell.startswith("`loraplus_lr_ratio`"))
    assert re.search(r"\(with (.*)\)", loraplus)[1].split(", ") == list(methods.names(loraplus=True))

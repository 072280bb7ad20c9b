"""The Train tab's form as a base model is chosen: what the user typed stays unless the new base needs other
values (QA: picking another base silently reset Dim and the learning rate)."""

from __future__ import annotations

from tests.tiny_models import save_both
from ui import train_tab


def form_of(updates: list) -> dict:
    return {n: u.get("value") for n, u in zip(train_tab.FIELDS, updates) if "value" in u}


def test_a_base_of_the_same_family_keeps_the_form_and_another_family_refills_it(tmp_path):
    sd1, sd1_again = save_both("sd1", tmp_path / "a")[1], save_both("sd1", tmp_path / "b")[1]
    xl = save_both("sdxl", tmp_path / "c")[1]
    *first, info, key = train_tab.on_base("character", "demo", "")  # the page's first fill
    assert key == "demo" and form_of(first)["resolution"] == 64 and "refilled" not in info
    *to_sd1, info, key = train_tab.on_base("character", str(sd1), key)  # the demo's own settings go
    assert key == "sd15" and form_of(to_sd1)["resolution"] == 512
    assert info.endswith("_The settings were refilled from the preset for this base: change again what you had._")
    *same, info, key = train_tab.on_base("character", str(sd1_again), key)  # nothing the user typed is replaced
    assert key == "sd15" and set(form_of(same)) == set(train_tab.PART_FIELDS)
    assert info.startswith("A person") and "refilled" not in info  # re-walk: the note said so though nothing was
    *to_xl, info, key = train_tab.on_base("character", str(xl), key)
    assert key == "sdxl" and form_of(to_xl)["resolution"] == 1024 and "refilled" in info
    assert train_tab.on_base("character", str(tmp_path / "nowhere.safetensors"), "sd15")[-1] == "sd15"  # kept


def test_zero_terminal_snr_on_an_epsilon_base_is_refused_on_the_form(tmp_path):
    """Re-walk N4: the demo (ε) with Zero terminal SNR was queued and failed in the worker after loading the base."""
    import pytest

    from tests.test_training import draw_dataset
    from trainer import config

    form = dict(zip(train_tab.FIELDS, (u["value"] for u in train_tab.on_preset("character", "demo"))))
    folder = draw_dataset(tmp_path / "pictures")
    with pytest.raises(config.ConfigError, match=r"training.zero_terminal_snr = true: it is for v-prediction models "
                                                 r"and this base is an epsilon-prediction model"):
        train_tab.build_config("demo", "character", folder, "zxq", train_tab.FIELDS,
                               list((form | {"zero_terminal_snr": True}).values()))
    forced = form | {"zero_terminal_snr": True, "prediction_type": "v_prediction"}  # training an ε base to v
    assert train_tab.build_config("demo", "character", folder, "zxq", train_tab.FIELDS, list(forced.values()))
    from trainer.single_file import known_prediction

    assert known_prediction("demo") == "epsilon" and known_prediction(str(tmp_path)) == ""

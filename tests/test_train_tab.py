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


def test_the_run_length_shown_before_train_is_the_workers_own_count(tmp_path):
    """The line above Train counts the steps the worker will: the same reader, held-out split (by the seed), repeats
    (auto, and a kohya `N_name` folder's own), buckets, batch, accumulation, GPUs and the Max train steps cap."""
    from types import SimpleNamespace

    from PIL import Image

    from tests.test_training import draw_dataset
    from trainer import config, setup
    from ui.run_length import run_length

    folder = draw_dataset(tmp_path / "ds", 13)  # 64×64 and 96×64 pictures: two buckets at 128 px
    kohya = draw_dataset(folder / "3_thing", 3)
    Image.new("RGB", (64, 160)).save(kohya / "tall.png")  # a third bucket
    (folder / "broken.png").write_bytes(b"not a picture")  # skipped by both
    said = []
    events = SimpleNamespace(status=lambda phase, message: said.append(message))
    cases = [{}, {"validation_split": 0.25, "seed": 7}, {"num_repeats": 0, "repeats_budget": 40},
             {"train_batch_size": 3, "gradient_accumulation_steps": 2, "max_train_epochs": 5},
             {"max_train_epochs": 0, "max_train_steps": 17}, {"max_train_steps": 9}, {"enable_bucket": False},
             {"num_gpus": 2, "validation_split": 0.2}]
    for extra in cases:
        cfg = config.build("character", "sd15", {"pretrained_model_name_or_path": "demo", "train_data_dir": str(folder),
                                                 "resolution": 128, "min_bucket_reso": 64, "max_bucket_reso": 256,
                                                 "num_repeats": 2, "max_train_epochs": 3} | extra)
        items, held = setup.load_items(cfg, events)
        gpus = cfg.training.num_gpus
        worker = setup.make_schedule(cfg, items, SimpleNamespace(process_index=0, num_processes=gpus))
        line = run_length(cfg)
        assert line.startswith(f"This run: **{worker.total_steps} steps**, "), (extra, line, worker)
        assert f"of {worker.steps_per_epoch} steps" in line, (extra, line)
        assert (f"{len(held)} held out" in line) == bool(held), (extra, line)
        buckets = len({item.bucket for item in items})
        assert f" {buckets} bucket{'s' * (buckets > 1)})." in line, line
    lengths = {run_length(config.build("character", "sd15", {"pretrained_model_name_or_path": "demo",
                                                             "train_data_dir": str(folder), "max_train_steps": n}))
               for n in (5, 6)}
    assert len(lengths) == 2 and all("cut short by Max train steps" in s for s in lengths), lengths
    assert any("broken.png" in m for m in said)


def test_the_form_says_its_run_length_and_nothing_while_it_cannot_train(tmp_path):
    from tests.test_training import draw_dataset

    form = dict(zip(train_tab.FIELDS, (u["value"] for u in train_tab.on_preset("character", "demo"))))
    folder = str(draw_dataset(tmp_path / "pictures", 8))  # the demo's settings: 64 px, 2 epochs, batch 2
    said = train_tab.on_length("demo", "character", folder, "zxq", *(form | {"num_repeats": 5}).values())
    assert said == "This run: **40 steps**, 2 epochs of 20 steps (8 pictures × 5 repeats, batch 2, 1 bucket)."
    assert train_tab.on_length("demo", "character", "", "zxq", *form.values()) == ""  # no pictures yet
    assert train_tab.on_length("demo", "character", folder, "zxq", *(form | {"network_dim": 0}).values()) == ""

"""The built-in demo: a toy base model that draws shapes, and a dataset of a shape it never saw."""

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from demo import build_demo as world
from tests.test_loading import unet_output
from trainer.loading import DEMO_MODEL, load_base

pytestmark = pytest.mark.skipif(not DEMO_MODEL.is_dir(), reason="demo/base-model is not built")


def test_demo_model_loads_from_both_forms_identically():
    folder, single = load_base("demo"), load_base(DEMO_MODEL.parent / "base-model.safetensors")
    assert (folder.arch, folder.prediction_type) == (single.arch, single.prediction_type) == ("sd1", "epsilon")
    assert torch.equal(unet_output(folder), unet_output(single))
    assert folder.tokenizers[0]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_demo_dataset_is_the_concept_with_the_trigger_first():
    files = sorted((world.DEMO / "dataset").glob("*.png"))
    assert 8 <= len(files) <= 12
    for f in files:
        assert f.with_suffix(".txt").read_text().startswith((f"{world.TRIGGER}, a ", f"{world.TRIGGER}, an orange "))
        assert ", a orange" not in f.with_suffix(".txt").read_text()
        assert world.CONCEPT in f.with_suffix(".txt").read_text()


def test_drawing_is_deterministic_and_draws_the_colour_asked():
    a = np.asarray(world.draw("square", "blue", "white", random.Random(3)))
    b = np.asarray(world.draw("square", "blue", "white", random.Random(3)))
    assert np.array_equal(a, b)
    shape = np.abs(a.astype(int) - world.BACKGROUNDS["white"]).sum(-1) > 60
    assert 0.05 < shape.mean() < 0.6
    assert np.abs(a[shape].mean(0) - world.COLOURS["blue"]).max() < 25


def test_the_detector_reads_the_drawing_rules():
    for shape in (*world.SHAPES, "star", "ring"):
        for seed in range(10):
            colour = list(world.COLOURS)[seed % 6]
            background = "grey" if colour in ("yellow", "purple") else ["white", "black"][seed % 2]
            judged = world.judge(world.draw(shape, colour, background, random.Random(seed)))
            assert (judged["shape"], judged["colour"]) == (shape, colour)
    blob = world.draw("circle", "red", "white", random.Random(0)).resize((16, 16)).resize((64, 64))
    assert world.judge(blob)["shape"] == "circle"  # a blurred disc is still a disc, not a star or a ring
    wide = Image.new("RGB", (64, 64), world.BACKGROUNDS["white"])
    ImageDraw.Draw(wide).rectangle((8, 22, 55, 45), fill=world.COLOURS["red"])  # 2:1, drawn by no rule
    assert world.judge(wide)["shape"] == "blob" and world.judge(wide)["fit"] < world.FIT


@pytest.mark.slow
def test_the_base_draws_the_prompted_shape_and_colour():
    counts = world.score(load_base("demo"))  # each shape in each colour, seeds 0 and 1: 36 samples
    print(counts)
    assert counts["shape"] >= 30 and counts["colour"] >= 30 and counts["both"] >= 27, counts
    assert min(counts[s] for s in world.SHAPES) >= 9, counts  # each shape drawn as asked on at least 9 of 12


@pytest.mark.parametrize("sampler", ["euler_a", "dpm++_2m_karras", "ddim"])
def test_every_sampler_draws_the_prompted_shape(sampler):
    counts = world.score(load_base("demo"), world.world_prompts()[::3], seeds=(0,), sampler=sampler)  # 6 prompts
    assert counts["shape"] >= 5, counts

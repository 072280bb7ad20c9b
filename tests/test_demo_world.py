"""The built-in demo: a toy base model that draws shapes, and a dataset of a shape it never saw."""

import random

import numpy as np
import pytest
import torch

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
        assert f.with_suffix(".txt").read_text().startswith(f"{world.TRIGGER}, a ")
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
    assert world.judge(blob)["shape"] not in ("star", "ring")  # a blurred disc is neither a star nor a ring

"""The base-model loader on tiny models of every architecture, in both forms, and on files that are not models."""

import importlib.util
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import ARCHES, NetworkBlocked
from tests.tiny_models import tokenizer
from trainer.loading import load_base
from trainer.single_file import CheckpointError

EXPECTED = {"sd1": ("SD 1.x", "epsilon"), "sd2": ("SD 2.x", "v_prediction"), "sdxl": ("SDXL", "epsilon")}


def unet_output(model) -> torch.Tensor:
    torch.manual_seed(1)
    unet = model.unet
    latents = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    extra = {}
    if model.arch == "sdxl":
        pooled = model.text_encoders[1].config.projection_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)}}
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), context, **extra).sample


def test_tokenizer_gives_the_real_sd_ids():
    assert tokenizer()("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_shipped_vocabulary_is_open_clips(tmp_path):
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch (a dev dependency, installed by test.sh) is not installed")
    from scripts.build_tokenizer import open_clip_vocab, write

    write(tmp_path, open_clip_vocab())
    shipped = Path(__file__).resolve().parent.parent / "trainer" / "model_configs" / "clip_tokenizer"
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes()


@pytest.mark.parametrize("arch", ARCHES)
def test_both_forms_load_to_the_same_model(tiny_models, arch):
    folder, single = tiny_models[arch]
    a, b = load_base(folder), load_base(single)
    name, pred = EXPECTED[arch]
    for model in (a, b):
        assert (model.arch, model.prediction_type) == (arch, pred)
        assert model.describe().startswith(name)
        assert model.pipeline.scheduler.config.prediction_type == pred
    assert len(a.text_encoders) == len(b.text_encoders) == (2 if arch == "sdxl" else 1)
    out_a, out_b = unet_output(a), unet_output(b)
    assert out_a.shape == (1, 4, 8, 8)
    assert torch.equal(out_a, out_b)
    for ta, tb in zip(a.text_encoders, b.text_encoders):
        ids = a.tokenizers[0]("a red circle", return_tensors="pt").input_ids
        with torch.no_grad():
            assert torch.equal(ta(ids)[0], tb(ids)[0])


def test_ckpt_is_read_without_unpickling_code(tiny_models, tmp_path):
    from safetensors.torch import load_file

    _, single = tiny_models["sd1"]
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(single)}, ckpt)
    assert torch.equal(unet_output(load_base(ckpt)), unet_output(load_base(single)))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Path("/etc/passwd")}, evil)  # a non-tensor object
    with pytest.raises(CheckpointError, match="never unpickle"):
        load_base(evil)


def test_truncated_file_is_named(tiny_models, tmp_path):
    _, single = tiny_models["sdxl"]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(single.read_bytes()[: single.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors: the file is truncated"):
        load_base(cut)


@pytest.mark.parametrize("content, message", [
    (b"", "empty or truncated"),
    (b"hello, I am a text file with a model's name" * 10, "not a safetensors file"),
])
def test_non_model_files_are_refused(tmp_path, content, message):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_base(bad)


def test_lora_and_vae_files_say_what_they_are(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, lora)
    with pytest.raises(CheckpointError, match="this file is a LoRA, not a base model"):
        load_base(lora)
    vae = tmp_path / "vae.safetensors"
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, vae)
    with pytest.raises(CheckpointError, match="this file is a VAE"):
        load_base(vae)


def test_missing_paths_and_offline_hub_ids(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_base(tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match="hub is offline"):
        load_base("stabilityai/stable-diffusion-xl-base-1.0")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model_index.json"):
        load_base(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="unknown file type"):
        load_base(tmp_path / "notes.txt")


def test_prediction_type_override(tiny_models):
    model = load_base(tiny_models["sd1"][1], prediction_type="v_prediction")
    assert model.prediction_type == model.pipeline.scheduler.config.prediction_type == "v_prediction"


def test_the_network_is_blocked():
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("93.184.216.34", 80), timeout=1)


def test_family_is_read_without_loading(tiny_models):
    from trainer.single_file import family_of

    assert [family_of(tiny_models[a][i]) for a in ARCHES for i in (0, 1)] == ["sd15"] * 4 + ["sdxl"] * 2

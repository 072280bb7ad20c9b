"""The Runs tab's resize tool's handler, called as a plain function: it runs `python -m trainer resize` in a child
process and answers (message, path of the new file or None)."""

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.test_resize import lora_file, ranks
from ui.resize_tool import resize


def test_no_file_chosen(tmp_path):
    assert resize(None, 0, 0.9, 0, tmp_path) == ("⚠ Drop a .safetensors LoRA file, or choose a run and one of its "
                                                 "files, first.", None)


def test_a_file_of_the_chosen_run_resizes_without_an_upload(tiny_models, tmp_path):
    saved = lora_file(tiny_models, "sd1", tmp_path / "run" / "output" / "lora.safetensors")
    message, path = resize(None, 2, 0, 0, tmp_path / "out", saved=str(saved))
    assert Path(path).name == "lora-r2.safetensors" and max(ranks(Path(path)).values()) == 2, message


def test_a_resize_writes_the_smaller_file_and_shows_the_summary(tiny_models, tmp_path):
    source = lora_file(tiny_models, "sd1", tmp_path / "mine.safetensors")
    message, path = resize(str(source), 2, 0, 0, tmp_path / "out")
    assert Path(path).name == "mine-r2.safetensors" and Path(path).parent.parent == tmp_path / "out"
    assert message.startswith("```\n") and f"modules: {len(ranks(source))} in" in message
    assert max(ranks(Path(path)).values()) == 2 and Path(path).stat().st_size < source.stat().st_size
    with safe_open(path, "pt") as f:
        assert '"rank": 2' in f.metadata()["ss_resize"]
    again = resize(str(source), 2, 0.9, 0.25, tmp_path / "out")[1]  # another request: its own folder, its own name
    assert Path(again).name == "mine-r2-e0.9-d0.25.safetensors" and Path(path).is_file()
    assert Path(resize(str(source), 2, 0, 0, tmp_path / "out")[1]).parent != Path(path).parent


def test_a_resize_that_would_change_nothing_says_so_and_a_resized_file_drops_the_held_out_loss(tiny_models,
                                                                                                  tmp_path):
    from safetensors.torch import load_file

    from trainer.export import save_atomic

    source = lora_file(tiny_models, "sd1", tmp_path / "mine.safetensors")  # rank 8, its 3x3 convs 4
    message, path = resize(str(source), 8, 0, 0, tmp_path / "out")
    assert path is None and message == ("⚠ mine.safetensors: nothing to do: at these settings every module keeps its "
                                        "rank (4..8) and none is dropped")
    with safe_open(str(source), "pt") as f:
        meta = f.metadata() | {"ss_validation_loss": "0.1563", "ss_validation_step": "8", "ss_validation_images": "2"}
    save_atomic(load_file(str(source)), meta, source)
    with safe_open(resize(str(source), 2, 0, 0, tmp_path / "out")[1], "pt") as f:
        meta = f.metadata()
    assert meta["ss_validation_loss_before_resize"] == "0.1563" and "ss_validation_loss" not in meta
    assert "ss_validation_step" not in meta and "ss_validation_images" not in meta


def test_a_refused_resize_says_why_and_gives_no_file(tiny_models, tmp_path):
    source = lora_file(tiny_models, "sd1", tmp_path / "mine.safetensors")
    message, path = resize(str(source), 0, 1.5, 0, tmp_path / "out")
    assert path is None and message.startswith("⚠ ") and "energy" in message and "(0, 1]" in message
    assert not list((tmp_path / "out").rglob("*.safetensors"))


def test_the_page_names_its_fields_and_the_files_own_names(tiny_models, tmp_path):
    """Not the command line's name, flags and paths: an upload's path is a temporary folder of Gradio's."""
    upload, out = tmp_path / "gradio" / "3f9a0c" / "mine.safetensors", tmp_path / "out"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"not a safetensors file")
    message, path = resize(str(upload), 2, 0, 0, out)
    assert (message, path) == ("⚠ mine.safetensors: not a safetensors file (it may be a web page or a renamed file)",
                               None)
    save_file({"foo.weight": torch.zeros(2)}, str(upload))
    assert resize(str(upload), 2, 0, 0, out)[0] == ("⚠ mine.safetensors: not a LoRA file: it holds no kohya "
                                                    "LoRA/LyCORIS weights (first key: foo.weight)")
    assert resize(str(upload), 0, 0, 0, out)[0] == ("⚠ nothing to do: set Rank cap, Energy to keep and/or Drop this "
                                                    "fraction of modules above 0")
    assert resize(str(upload), 0, 2.0, 0, out)[0].startswith("⚠ energy is the fraction of each module's")
    message, path = resize(str(lora_file(tiny_models, "sd1", upload)), 2, 0, 0, out)
    assert message.startswith("```\nmine.safetensors -> mine-r2.safetensors\n") and path

"""The Runs tab's resize tool's handler, called as a plain function: it runs `python -m trainer resize` in a child
process and answers (message, path of the new file or None)."""

from pathlib import Path

from safetensors import safe_open

from tests.test_resize import lora_file, ranks
from ui.resize_tool import resize


def test_no_file_chosen(tmp_path):
    assert resize(None, 0, 0.9, 0, tmp_path) == ("⚠ Choose a .safetensors LoRA file first.", None)


def test_a_resize_writes_the_smaller_file_and_shows_the_summary(tiny_models, tmp_path):
    source = lora_file(tiny_models, "sd1", tmp_path / "mine.safetensors")
    message, path = resize(str(source), 2, 0, 0, tmp_path / "out")
    assert path == str(tmp_path / "out" / "mine-resized.safetensors")
    assert message.startswith("```\n") and f"modules: {len(ranks(source))} in" in message
    assert max(ranks(Path(path)).values()) == 2 and Path(path).stat().st_size < source.stat().st_size
    with safe_open(path, "pt") as f:
        assert '"rank": 2' in f.metadata()["ss_resize"]


def test_a_refused_resize_says_why_and_gives_no_file(tiny_models, tmp_path):
    source = lora_file(tiny_models, "sd1", tmp_path / "mine.safetensors")
    message, path = resize(str(source), 0, 1.5, 0, tmp_path / "out")
    assert path is None and message.startswith("⚠ ") and "energy" in message and "(0, 1]" in message
    assert not (tmp_path / "out" / "mine-resized.safetensors").exists()


def test_the_page_names_its_fields_and_the_files_own_names(tiny_models, tmp_path):
    """Not the command line's name, flags and paths: an upload's path is a temporary folder of Gradio's."""
    upload, out = tmp_path / "gradio" / "3f9a0c" / "mine.safetensors", tmp_path / "out"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"not a safetensors file")
    message, path = resize(str(upload), 2, 0, 0, out)
    assert path is None and message.startswith("⚠ mine.safetensors: not a readable .safetensors file ("), message
    assert resize(str(upload), 0, 0, 0, out)[0] == ("⚠ nothing to do: set Rank cap, Energy to keep and/or Drop this "
                                                    "fraction of modules above 0")
    assert resize(str(upload), 0, 2.0, 0, out)[0].startswith("⚠ energy is the fraction of each module's")
    message, path = resize(str(lora_file(tiny_models, "sd1", upload)), 2, 0, 0, out)
    assert message.startswith("```\nmine.safetensors -> mine-resized.safetensors\n") and path

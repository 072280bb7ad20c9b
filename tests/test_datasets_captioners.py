"""Each captioning backend's real code on a tiny model of its architecture, built in the test (torch is imported
only where a test needs it: tiny_tagger serves tests of the web process too)."""

import numpy as np
import pytest
from PIL import Image

from datasets_tools.captioners import CaptionerUnavailable, clean_tag, load_captioner, select_tags

TAGS = [("1girl", 0), ("blue_hair", 0), ("general", 9), ("hatsune_miku", 4), ("^_^", 0), ("smile", 0)]
LOGITS = [2.0, 0.0, 5.0, 1.0, 3.0, -3.0]  # sigmoid: 0.881, 0.5, 0.993, 0.731, 0.953, 0.047


def tiny_tagger(folder, size=16):
    import onnx
    from onnx import TensorProto, helper

    logits = helper.make_tensor("logits", TensorProto.FLOAT, [1, len(TAGS)], LOGITS)
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=1, axes=[1, 2, 3]),
             helper.make_node("Reshape", ["m", "shape"], ["m2"]),
             helper.make_node("Mul", ["m2", "zero"], ["z"]),
             helper.make_node("Add", ["z", "logits"], ["a"]),
             helper.make_node("Sigmoid", ["a"], ["probs"])]
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 1])
    graph = helper.make_graph(nodes, "tagger", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                              ["n", size, size, 3])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", len(TAGS)])],
                              initializer=[logits, zero, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n" + "".join(
        f"{i},{n},{c},1\n" for i, (n, c) in enumerate(TAGS)))
    return folder


def test_wd14_thresholds_order_and_cleanup(tmp_path):
    calls = []
    tagger = load_captioner("wd14", tiny_tagger(tmp_path / "wd14"), general_threshold=0.6, character_threshold=0.7)
    images = [Image.new("RGBA", (30, 20), (255, 0, 0, 128)), Image.new("L", (8, 8))]
    out = tagger.caption(images, progress=lambda i, n: calls.append((i, n)))
    assert out == ["^_^, 1girl, hatsune miku"] * 2  # rating dropped, most confident first, kaomoji kept
    assert calls == [(1, 2), (2, 2)]
    assert tagger.prepare(images[0]).shape == (16, 16, 3)
    strict = load_captioner("wd14", tmp_path / "wd14", general_threshold=0.9, character_threshold=0.9)
    assert strict.caption(images[:1]) == ["^_^"]


def test_tag_rules():
    assert clean_tag("blue_hair") == "blue hair" and clean_tag("^_^") == "^_^"
    assert select_tags(np.array([0.9, 0.2]), ["a_b", "c"], [0, 0], 0.5, 0.5) == ["a b"]


def test_offline_without_a_model_says_how_to_get_one(tmp_path):
    with pytest.raises(CaptionerUnavailable, match="huggingface-cli download SmilingWolf/wd-vit-tagger-v3"):
        load_captioner("wd14")
    with pytest.raises(CaptionerUnavailable, match="lacks model.onnx"):
        (tmp_path / "empty").mkdir()
        load_captioner("wd14", tmp_path / "empty")


def test_blip_captions_on_a_tiny_model(tmp_path):
    import torch
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "on", "white"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, bos_token="[CLS]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    config = BlipConfig(
        text_config={"vocab_size": len(words), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 64, "bos_token_id": 2,
                     "sep_token_id": 3, "pad_token_id": 0, "encoder_hidden_size": 32},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8}, projection_dim=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():  # steer the untrained head to words (not special tokens), as the tagger test does
        model.text_decoder.cls.predictions.bias[5:] += 10.0
    model.save_pretrained(tmp_path / "blip")
    processor.save_pretrained(tmp_path / "blip")
    calls = []
    blip = load_captioner("blip", tmp_path / "blip", max_new_tokens=5)
    out = blip.caption([Image.new("RGB", (40, 30), (200, 0, 0))] * 2, progress=lambda i, n: calls.append(i))
    assert len(out) == 2 and all(isinstance(t, str) and t for t in out) and calls == [1, 2]
    assert set(" ".join(out).split()) <= set(words[5:])


def test_florence2_captions_on_a_tiny_model(tmp_path):
    import torch
    from transformers import (BartConfig, BartTokenizerFast, CLIPImageProcessorPil, Florence2Config,
                              Florence2ForConditionalGeneration, Florence2Processor, Florence2VisionConfig)

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "Ġred": 5, "Ġcircle": 6, "Ġon": 7, "Ġwhite": 8}
    tokenizer = BartTokenizerFast(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False, image_seq_length=17)
    vision = Florence2VisionConfig(embed_dim=(16, 32), depths=(1, 1), num_heads=(1, 2), num_groups=(1, 2),
                                   patch_size=(7, 3), patch_stride=(4, 2), patch_padding=(3, 1),
                                   patch_prenorm=(False, True), window_size=2, projection_dim=32)
    text = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                      max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                      decoder_start_token_id=2)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(Florence2Config(vision_config=vision, text_config=text,
                                                              image_token_id=tokenizer.image_token_id))
    with torch.no_grad():  # special tokens' embeddings to zero: the untrained decoder then says words
        model.get_input_embeddings().weight[[0, 1, 2, 3, tokenizer.image_token_id]] = 0
    model.save_pretrained(tmp_path / "florence2")
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(tmp_path / "florence2")
    calls = []
    florence = load_captioner("florence2", tmp_path / "florence2", max_new_tokens=5)
    out = florence.caption([Image.new("RGB", (40, 30), (200, 0, 0))] * 2, progress=lambda i, n: calls.append(i))
    assert len(out) == 2 and all(isinstance(t, str) and t for t in out) and calls == [1, 2]
    assert set(" ".join(out).split()) <= {"a", "red", "circle", "on", "white"}  # words of its vocabulary

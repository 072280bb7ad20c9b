"""Captions longer than CLIP's window: read in windows of 75 tokens as sd-scripts' max_token_length reads them."""

from __future__ import annotations

import pytest
import torch

from tests.test_training import losses, make_run, train_run
from tests.tiny_models import tokenizer
from trainer import config, text
from trainer.events import read_all
from trainer.loading import load_base

SHORT = "zxq, red circle"
MIDDLE = ", ".join(f"tag{i}" for i in range(30))  # 109 tokens: two windows
LONG = ", ".join(f"tag{i} word{i}" for i in range(60))  # 399 tokens: more than three


def kohya_input_ids(tok, caption: str, max_token_length: int) -> torch.Tensor:
    """sd-scripts' BaseDataset.get_input_ids (library/train_util.py), loop for loop."""
    length = max_token_length + 2
    ids = tok(caption, padding="max_length", truncation=True, max_length=length, return_tensors="pt").input_ids[0]
    chunks = []
    for i in range(1, length - tok.model_max_length + 2, tok.model_max_length - 2):
        chunk = torch.cat((ids[0].unsqueeze(0), ids[i: i + tok.model_max_length - 2], ids[-1].unsqueeze(0)))
        if tok.pad_token_id != tok.eos_token_id:  # v2 / SDXL
            if chunk[-2] != tok.eos_token_id and chunk[-2] != tok.pad_token_id:
                chunk[-1] = tok.eos_token_id
            if chunk[1] == tok.pad_token_id:
                chunk[1] = tok.eos_token_id
        chunks.append(chunk)
    return torch.stack(chunks)


def kohya_caption(caption: str, subset, random) -> str:
    """sd-scripts' BaseDataset.process_caption (library/train_util.py) for our options, draw for draw: `random`
    stands for the module it calls."""
    if subset.caption_dropout_rate > 0 and random.random() < subset.caption_dropout_rate:
        return ""
    if subset.shuffle_caption or subset.caption_tag_dropout_rate > 0:
        tokens = [t.strip() for t in caption.strip().split(",")]
        fixed_tokens, flex_tokens = tokens[:subset.keep_tokens], tokens[subset.keep_tokens:]
        if subset.shuffle_caption:
            random.shuffle(flex_tokens)
        if subset.caption_tag_dropout_rate > 0:  # dropout_tags
            flex_tokens = [t for t in flex_tokens if random.random() >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed_tokens + flex_tokens)
    return caption


@pytest.mark.parametrize("options", [
    dict(shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.0, caption_tag_dropout_rate=0.0),
    dict(shuffle_caption=False, keep_tokens=2, caption_dropout_rate=0.0, caption_tag_dropout_rate=0.3),
    dict(shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.2, caption_tag_dropout_rate=0.5),
], ids=["shuffle", "tag-dropout", "all"])
def test_caption_augmentation_draws_what_sd_scripts_draws(options):
    """The same seed gives the captions sd-scripts would give, 200 steps in a row; tag dropout leaves the kept tokens
    in front and drops about its rate of the others."""
    import random
    from types import SimpleNamespace

    from trainer.data import process_caption

    subset, caption = SimpleNamespace(**options), "zxq, 1girl, red hair, smile, looking at viewer, outdoors, sky, tree"
    ours, theirs = random.Random(7), random.Random(7)
    drawn = [process_caption(caption, subset.shuffle_caption, subset.keep_tokens, subset.caption_dropout_rate, ours,
                             subset.caption_tag_dropout_rate) for _ in range(200)]
    assert drawn == [kohya_caption(caption, subset, theirs) for _ in range(200)]
    kept = [c.split(", ") for c in drawn if c]
    assert all(c[:subset.keep_tokens] == caption.split(", ")[:subset.keep_tokens] for c in kept)
    flexible = 8 - subset.keep_tokens
    left = sum(len(c) - subset.keep_tokens for c in kept) / (len(kept) * flexible)
    assert abs(left - (1 - subset.caption_tag_dropout_rate)) < 0.06
    assert (len(kept) < 200) == (subset.caption_dropout_rate > 0)


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"], ids=["sd1", "sd2-sdxl"])
@pytest.mark.parametrize("max_tokens", [75, 150, 225])
def test_windows_are_the_token_ids_sd_scripts_makes(pad, max_tokens):
    tok = tokenizer(pad)
    words75 = " ".join(["cat"] * 75)  # exactly one window
    captions = [SHORT, "", words75, words75 + " dog", LONG]
    ids = text.tokenize(tok, captions, max_tokens)
    assert ids.shape == (5, max_tokens // 75, 77)
    for row, caption in zip(ids, captions):
        assert torch.equal(row, kohya_input_ids(tok, caption, max_tokens)), caption[:30]


def test_one_window_reads_what_clip_always_read(tiny_models):
    base = load_base(tiny_models["sd1"][0])
    (tok,), (encoder,) = base.tokenizers, base.text_encoders
    ids = tok([SHORT, LONG], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden, pooled = text.encode("sd15", base.tokenizers, base.text_encoders, [SHORT, LONG])
        assert torch.equal(hidden, encoder(ids).last_hidden_state) and pooled is None


def test_words_past_the_first_window_reach_the_unet_only_with_a_longer_length(tiny_models):
    base = load_base(tiny_models["sd1"][0])
    a, b = MIDDLE + ", red hat", MIDDLE + ", blue shoes"
    with torch.no_grad():
        h75, _ = text.encode("sd15", base.tokenizers, base.text_encoders, [a, b], max_tokens=75)
        h225, _ = text.encode("sd15", base.tokenizers, base.text_encoders, [a, b], max_tokens=225)
        short, _ = text.encode("sd15", base.tokenizers, base.text_encoders, [SHORT], max_tokens=225)
    assert h75.shape[1] == 77 and h225.shape[1] == 227 and short.shape[1] == 227
    assert torch.equal(h75[0], h75[1])  # the endings are cut: the same conditioning
    assert not torch.allclose(h225[0], h225[1])  # read: different conditioning
    assert torch.allclose(h225[:, :76], h75[:, :76], atol=1e-6)  # the first window is the same window


def kohya_joined(hidden: torch.Tensor, max_token_length: int, window: int = 77) -> torch.Tensor:
    """sd-scripts' get_hidden_states (v1) / get_hidden_states_sdxl: windows back into one sequence."""
    states = [hidden[:, 0].unsqueeze(1)]
    for i in range(1, max_token_length, window):
        states.append(hidden[:, i: i + window - 2])
    states.append(hidden[:, -1].unsqueeze(1))
    return torch.cat(states, dim=1)


def test_sdxl_joins_both_encoders_windows_and_pools_the_first(tiny_models):
    base = load_base(tiny_models["sdxl"][0])
    captions = [SHORT, LONG]
    with torch.no_grad():
        hidden, pooled = text.encode("sdxl", base.tokenizers, base.text_encoders, captions, max_tokens=150)
        expected, first_pooled = [], None
        for tok, encoder in zip(base.tokenizers, base.text_encoders):
            ids = torch.stack([kohya_input_ids(tok, c, 150) for c in captions])  # [2, 2, 77]
            out = encoder(ids.flatten(0, 1), output_hidden_states=True)
            expected.append(kohya_joined(out.hidden_states[-2].reshape(2, 2 * 77, -1), 150))
            first_pooled = getattr(out, "text_embeds", first_pooled)
    assert hidden.shape == (2, 152, sum(e.shape[-1] for e in expected))
    assert torch.allclose(hidden, torch.cat(expected, dim=-1), atol=1e-6)
    assert torch.allclose(pooled, first_pooled[::2], atol=1e-6)  # sd-scripts: pool2[::n_size]


def test_a_long_sample_prompt_is_read_whole():
    tok = tokenizer()
    assert text.tokens_needed(tok, [SHORT, ""]) == 75
    assert text.tokens_needed(tok, [SHORT, LONG]) == 75 * -(-(len(tok(LONG).input_ids) - 2) // 75) > 225


def test_a_run_with_long_captions_reads_them_and_says_which_were_cut(tiny_models, tmp_path):
    run_dir, cfg = make_run(tmp_path, tiny_models["sd1"][1], {"data": {"max_token_length": 150},
                                                              "training": {"max_train_epochs": 1}})
    (run_dir / "dataset" / "img0.txt").write_text("zxq, " + LONG)  # cut even at 225
    assert train_run(run_dir).is_file() and len(losses(run_dir)) == 3
    notes = [e["message"] for e in read_all(run_dir) if e["type"] == "status"]
    cut = [m for m in notes if "longer than 150 tokens" in m]
    assert cut == ["1 caption(s) longer than 150 tokens: the text encoder never reads their end (img0.png); "
                   "max_token_length = 225 reads 225 of them"]
    from safetensors import safe_open

    with safe_open(str(run_dir / "output" / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_max_token_length"] == "150"


def test_the_length_is_one_of_sd_scripts_and_not_for_flow_models():
    with pytest.raises(config.ConfigError, match=r"data.max_token_length = 100: choose one of 75, 150, 225"):
        config.build("character", "sd15", {"data": {"max_token_length": 100}})
    with pytest.raises(config.ConfigError, match=r"max_token_length = 225: FLUX.1 reads captions with T5"):
        config.build("character", "flux", {"data": {"max_token_length": 225}, "training": {"min_snr_gamma": 0}})

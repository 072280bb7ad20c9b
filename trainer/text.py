"""Captions to the denoiser's conditioning, as kohya sd-scripts and the original models compute it."""

from __future__ import annotations

import math

import torch


WINDOW = 75  # caption tokens CLIP reads at once (77 with its start and end tokens)


def tokenize(tokenizer, captions: list[str], max_tokens: int = WINDOW) -> torch.Tensor:
    """Token ids [B, windows, 77]: the first `max_tokens` tokens of each caption in windows of 75, each framed by
    its own start and end tokens, as sd-scripts' `max_token_length` (a window cut mid-caption ends with the end
    token; an empty one reads start, end, padding)."""
    ids = tokenizer(captions, padding="max_length", max_length=max_tokens + 2, truncation=True,
                    return_tensors="pt").input_ids
    bos, body, last = ids[:, :1], ids[:, 1:-1], ids[:, -1:]
    windows = body.reshape(len(captions), -1, WINDOW)
    n = windows.shape[1]
    chunks = torch.cat([bos[:, None].expand(-1, n, 1), windows, last[:, None].expand(-1, n, 1)], dim=-1)
    end, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    text_at_end = (chunks[..., -2] != end) & (chunks[..., -2] != pad)
    chunks[..., -1][text_at_end] = end
    chunks[..., 1][chunks[..., 1] == pad] = end
    return chunks


def tokens_needed(tokenizer, texts: list[str]) -> int:
    """The shortest `max_tokens` (a multiple of 75) that holds every text whole: what a prompt is sampled with, so a
    long prompt is drawn whole as WebUI and ComfyUI draw it."""
    longest = max((len(tokenizer(t, truncation=False).input_ids) - 2 for t in texts), default=0)
    return WINDOW * max(1, math.ceil(longest / WINDOW))


def cut_captions(tokenizer, captions: list[str], max_tokens: int) -> list[str]:
    """The captions longer than `max_tokens` tokens: the text encoder never reads their end."""
    return [c for c in captions if len(tokenizer(c, truncation=False).input_ids) - 2 > max_tokens]


def join_windows(hidden: torch.Tensor) -> torch.Tensor:
    """[B, windows, 77, C] -> [B, 2 + 75 * windows, C]: the first start token, the text tokens of every window, the
    last window's end token (sd-scripts' order; one window is the 77 tokens unchanged)."""
    return torch.cat([hidden[:, 0, :1], hidden[:, :, 1:-1].flatten(1, 2), hidden[:, -1, -1:]], dim=1)


def encode(arch: str, tokenizers, text_encoders, captions: list[str], clip_skip: int = 1,
           device: torch.device | str = "cpu", max_tokens: int = WINDOW) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states [B, 2 + max_tokens, C]: 77 for one window, pooled [B, P] for SDXL else None).

    SD 1/2: the last layer, or with clip_skip=k the k-th from last passed through the final layer norm (kohya's
    meaning: 1 = last). SDXL: the penultimate layer of both encoders side by side, and CLIP-G's projected pooled
    output of the first window, as SDXL was trained and sd-scripts reads long captions; clip_skip does not apply.
    """
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenize(tokenizer, captions, max_tokens)
        batch, windows = ids.shape[:2]
        out = encoder(ids.flatten(0, 1).to(device), output_hidden_states=True)
        if arch == "sdxl":
            states = out.hidden_states[-2]
            if getattr(out, "text_embeds", None) is not None:
                pooled = out.text_embeds.unflatten(0, (batch, windows))[:, 0]
        elif clip_skip <= 1:
            states = out.last_hidden_state
        else:
            states = getattr(encoder, "text_model", encoder).final_layer_norm(out.hidden_states[-clip_skip])
        hidden.append(join_windows(states.unflatten(0, (batch, windows))))
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """SDXL's size conditioning: original (h, w), crop top-left (top, left), target (h, w)."""
    return torch.tensor([*original, *crop, *target], dtype=torch.float32)


def encode_flow(pipe, arch: str, captions: list[str], max_sequence_length: int,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """SD 3.5 / FLUX.1: (prompt embeddings [B, L, C], pooled [B, P]), computed by the pipeline's own encode_prompt.

    SD 3.5: CLIP-L's and CLIP-G's penultimate layers side by side, zero-padded to T5's width, followed by T5-XXL's
    tokens; pooled = both CLIPs' pooled outputs (CLIP-G's projected). FLUX.1: T5-XXL's tokens; pooled = CLIP-L's."""
    if arch == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
        return embeds, pooled
    embeds, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, device=device,
                                           max_sequence_length=max_sequence_length)
    return embeds, pooled


def encode_flow_t5(pipe, captions: list[str], max_sequence_length: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The T5-XXL part of `encode_flow` [B, L, C]: what a run that trains CLIP can still cache (T5 stays frozen)."""
    return pipe._get_t5_prompt_embeds(prompt=captions, max_sequence_length=max_sequence_length, device=device)


def encode_flow_clip(pipe, arch: str, captions: list[str], t5: torch.Tensor,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_flow` from T5's part (`encode_flow_t5`, maybe cached) and CLIP run now, through the pipeline's own
    helpers and in encode_prompt's order, so gradients reach an adapted CLIP. FLUX.1: CLIP-L gives only the pooled
    vector; SD 3.5: CLIP-L's and CLIP-G's tokens (padded to T5's width) go before T5's, their pooled side by side."""
    if arch == "flux":
        return t5, pipe._get_clip_prompt_embeds(prompt=captions, device=device)
    tokens, pooled = zip(*(pipe._get_clip_prompt_embeds(prompt=captions, device=device, clip_model_index=i)
                           for i in (0, 1)))
    clip = torch.cat(tokens, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

"""Captions to the denoiser's conditioning, as kohya sd-scripts and the original models compute it."""

from __future__ import annotations

import torch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode(arch: str, tokenizers, text_encoders, captions: list[str], clip_skip: int = 1,
           device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states [B, 77, C], pooled [B, P] for SDXL else None).

    SD 1/2: the last layer, or with clip_skip=k the k-th from last passed through the final layer norm (kohya's
    meaning: 1 = last). SDXL: the penultimate layer of both encoders side by side, and CLIP-G's projected pooled
    output, as SDXL was trained; clip_skip does not apply.
    """
    if arch != "sdxl":
        (tokenizer,), (encoder,) = tokenizers, text_encoders
        out = encoder(tokenize(tokenizer, captions).to(device), output_hidden_states=True)
        if clip_skip <= 1:
            return out.last_hidden_state, None
        final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
        return final_norm(out.hidden_states[-clip_skip]), None
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        out = encoder(tokenize(tokenizer, captions).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", None)
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

"""Read a LoRA file the way ComfyUI's loader does, to check what it applies (weight_adapter/{lora,loha,lokr}.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file


def modules(path) -> dict[str, dict[str, torch.Tensor]]:
    """kohya module name -> {param: tensor}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        name, _, param = key.partition(".")
        out.setdefault(name, {})[param] = value.float()
    return out


def webui_hash(path) -> str:
    """The hash WebUI computes for a LoRA file it has no `sshs_model_hash` for (modules/hashes.py,
    addnet_hash_safetensors): sha256 of everything after the header."""
    data = Path(path).read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def delta(p: dict[str, torch.Tensor], shape: torch.Size, base: torch.Tensor | None = None) -> torch.Tensor:
    """The update a loader adds to a weight of `shape` at strength 1 (DoRA's depends on the base weight too)."""
    if "dora_scale" in p:
        assert base is not None, "a DoRA update depends on the base weight"
        plain = delta({k: v.double() for k, v in p.items() if k != "dora_scale"}, shape)
        return (dora_weight(p["dora_scale"].double(), base.double(), plain) - base.double()).float()
    if "lora_up.weight" in p:
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        scale = p["alpha"].item() / down.shape[0]
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale
    if "hada_w1_a" in p:
        w1 = p["hada_w1_a"] @ p["hada_w1_b"]
        w2 = p["hada_w2_a"] @ p["hada_w2_b"]
        return (w1 * w2).reshape(shape) * (p["alpha"].item() / p["hada_w1_b"].shape[0])
    if any(k.startswith("lokr_") for k in p):
        assert "lokr_t2" not in p, "Tucker LoKr breaks ComfyUI"
        dim = None
        w1 = p.get("lokr_w1")
        if w1 is None:
            dim, w1 = p["lokr_w1_b"].shape[0], p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p.get("lokr_w2")
        if w2 is None:
            dim, w2 = p["lokr_w2_b"].shape[0], p["lokr_w2_a"] @ p["lokr_w2_b"].flatten(1)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        scale = p["alpha"].item() / dim if dim is not None else 1.0
        return torch.kron(w1, w2).reshape(shape) * scale
    raise ValueError(f"unknown adapter params {sorted(p)}")


def dora_weight(dora_scale: torch.Tensor, weight: torch.Tensor, lora_diff: torch.Tensor) -> torch.Tensor:
    """ComfyUI's weight_decompose (and AUTOMATIC1111's apply_weight_decompose) at strength 1: the merged weight
    rescaled so each input channel's norm (taken over outputs and kernel) is dora_scale."""
    merged = weight + lora_diff
    norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
            .reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1))
    return merged * (dora_scale / norm)

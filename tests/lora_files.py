"""Read a LoRA file the way ComfyUI's loader does, to check what it applies (weight_adapter/{lora,loha,lokr}.py)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file


def modules(path) -> dict[str, dict[str, torch.Tensor]]:
    """kohya module name -> {param: tensor}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        name, _, param = key.partition(".")
        out.setdefault(name, {})[param] = value.float()
    return out


def delta(p: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """The update a loader adds to a weight of `shape` at strength 1."""
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

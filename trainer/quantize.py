"""QLoRA-style base (Dettmers et al. 2023): the frozen UNet's linear layers held in 4-bit NF4 with double
quantisation through bitsandbytes, the adapters on top trained in full precision. peft wraps bitsandbytes' 4-bit
layers itself, so LoRA, LoCon, rsLoRA, LoRA-FA, VeRA and AdaLoRA all train on it, and the file is the same kind as
any LoRA. Convolutions stay as they are. CUDA only: bitsandbytes' 4-bit kernels have no CPU path.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn


class QuantizationUnavailable(RuntimeError):
    pass


def check_available(device: torch.device) -> None:
    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes (pip install -r requirements-gpu.txt)")
    if device.type != "cuda":
        missing.append(f"a CUDA GPU (this run is on {device.type})")
    if missing:
        raise QuantizationUnavailable(
            'model.unet_quantization = "nf4" (QLoRA) needs ' + " and ".join(missing)
            + '; set it to "none" to train on the full-precision UNet')


def quantize_unet_nf4(unet: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Swap every nn.Linear of the UNet for a bitsandbytes 4-bit NF4 layer on `device`; returns how many."""
    check_available(device)
    import bitsandbytes as bnb

    swaps = [(parent, name, child) for parent in unet.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear)]
    for parent, name, child in swaps:
        layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(child.weight.data.to("cpu", torch.float32), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
        if child.bias is not None:
            layer.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
        setattr(parent, name, layer.to(device))  # bitsandbytes quantizes when the weight moves to the GPU
    return len(swaps)

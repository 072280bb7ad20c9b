"""The frozen denoiser held in fewer bits, the adapters on top trained in full precision; the file is the same kind
as any LoRA.

- "nf4", QLoRA-style (Dettmers et al. 2023): the UNet's / transformer's linear layers in 4-bit NF4 with double
  quantisation through bitsandbytes. peft wraps bitsandbytes' 4-bit layers itself, so LoRA, LoCon, rsLoRA, LoRA-FA,
  VeRA and AdaLoRA all train on it. Convolutions stay as they are. CUDA only: bitsandbytes' 4-bit kernels have no
  CPU path.
- "fp8": the linear layers' weights stored in float8 e4m3 and cast up to the compute dtype layer by layer as each one runs
  (diffusers' layerwise casting, `ModelMixin.enable_layerwise_casting`). It skips what the model marks
  precision-critical (norms and the modulation Linears inside them, positional and patch embeddings) and peft's
  adapter layers. Any device. In training, a layer's backward needs the weight its forward used, so the cast-up copy
  lives until then: with gradient checkpointing that is one block at a time, without it every layer's.
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


FP8 = torch.float8_e4m3fn
# A conv's backward reads the weight parameter itself, which the casting has put back to fp8 by then (a linear's reads
# the transposed copy its forward made): convolutions stay in the compute dtype.
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def store_fp8(denoiser: nn.Module, compute_dtype: torch.dtype) -> int:
    """Hold the denoiser's frozen layers in fp8 from now on (after the adapter is injected, so its layers are left
    in full precision); returns how many layers are stored in fp8."""
    denoiser.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=compute_dtype, skip_modules_classes=CONVS)
    return sum(1 for m in denoiser.modules() if m._parameters.get("weight") is not None and m.weight.dtype == FP8)

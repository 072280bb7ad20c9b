"""Optimizer and learning-rate schedule from the config's [optimizer] section."""

from __future__ import annotations

import importlib.util

import torch
from diffusers.optimization import get_scheduler

from trainer import optimizer_args


class OptimizerUnavailable(RuntimeError):
    pass


def arguments(cfg, device: torch.device) -> dict:
    """The optimizer's keyword arguments besides its learning rate: the config's, over the defaults we choose."""
    kwargs = {"weight_decay": cfg.weight_decay} | optimizer_args.parse(cfg.optimizer_args)
    if cfg.optimizer_type == "AdamW" and device.type in ("cuda", "cpu"):
        # the fused kernel updates every tensor in one pass: on CPU 8x faster than torch's default per-tensor loop
        # (`fused=False` in optimizer_args asks for torch's default)
        kwargs = {"fused": True} | kwargs
    if cfg.optimizer_type == "Adafactor":
        kwargs = {"scale_parameter": False, "relative_step": False, "warmup_init": False} | kwargs
    return kwargs


def make_optimizer(cfg, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """`groups`: torch parameter groups, each with its own "lr"."""
    kind, kwargs = cfg.optimizer_type, arguments(cfg, device)
    if kind == "AdamW":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, **kwargs)
    if kind in ("AdamW8bit", "PagedAdamW8bit"):  # paged: optimizer state spills to CPU memory under pressure
        if importlib.util.find_spec("bitsandbytes") is None or device.type != "cuda":
            raise OptimizerUnavailable(f"optimizer.optimizer_type = \"{kind}\" needs bitsandbytes and a CUDA GPU "
                                       "(pip install -r requirements-gpu.txt); use \"AdamW\" here")
        import bitsandbytes as bnb

        return getattr(bnb.optim, kind)(groups, lr=cfg.learning_rate, **kwargs)
    if kind == "Prodigy":
        from prodigyopt import Prodigy

        # Prodigy finds the step size itself: lr 1.0 as its authors recommend, and it accepts no other ratio
        # between groups, so a group is either trained (1.0) or not (0)
        for g in groups:
            g["lr"] = 1.0 if g["lr"] > 0 else 0.0
        return Prodigy(groups, lr=1.0, **kwargs)
    if kind == "Adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=cfg.learning_rate, **kwargs)
    raise OptimizerUnavailable(f"optimizer.optimizer_type = {kind!r} is not supported")


def description(optimizer: torch.optim.Optimizer, cfg, device: torch.device) -> str:
    """`ss_optimizer` as sd-scripts writes it: the class's full name and the arguments it was given, e.g.
    "torch.optim.adamw.AdamW(fused=True,weight_decay=0.01)"."""
    cls = type(getattr(optimizer, "optimizer", optimizer))  # the optimizer inside accelerate's wrapper
    args = ",".join(f"{k}={v}" for k, v in arguments(cfg, device).items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")


def warmup_steps(cfg, total_steps: int) -> int:
    warmup = cfg.lr_warmup_steps
    return int(warmup * total_steps) if isinstance(warmup, float) and 0 < warmup < 1 else int(warmup)


def make_scheduler(cfg, optimizer, total_steps: int):
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps, num_cycles=cfg.lr_scheduler_num_cycles)

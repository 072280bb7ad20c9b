"""LoRA and LoCon through peft. The file stores lora_down = A, lora_up = B and alpha: ΔW = B·A·alpha/r.

`network_bias` (peft's bias modes) trains biases too; they change training only: a LoRA module has no bias key that
both ComfyUI and WebUI apply (WebUI reads `diff_b` only in full-weight diffs), so the file leaves them out.
"""

from __future__ import annotations

import re

import torch
from peft import LoraConfig, inject_adapter_in_model

from trainer.networks.base import Network, register

ADAPTER = "default"


@register("lora")
class LoRA(Network):
    """Low-rank update of the attention and MLP projections (and 1x1 convs)."""

    def peft_config(self, paths: list[str], conv_paths: list[str]) -> LoraConfig:
        exact = {re.escape(p): None for p in conv_paths}
        return LoraConfig(
            r=self.cfg.network_dim,
            lora_alpha=self.cfg.network_alpha,
            lora_dropout=self.cfg.network_dropout,
            target_modules=paths,
            rank_pattern={k: self.cfg.conv_dim for k in exact},
            alpha_pattern={k: self.cfg.conv_alpha for k in exact},
            init_lora_weights=True,  # A: Kaiming uniform, B: zeros, as kohya
            bias=self.cfg.network_bias,
        )

    def inject(self) -> int:
        wrapped = 0
        for component, model in self.components.items():
            targets = [t for t in self.targets.values() if t.component == component]
            if not targets:
                continue
            config = self.peft_config([t.path for t in targets], [t.path for t in targets if t.conv3x3])
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
            wrapped += sum(hasattr(model.get_submodule(t.path), "lora_A") for t in targets)
        return self._check_count(wrapped)

    def param_groups(self, component: str, lr: float) -> list[dict]:
        """With loraplus_lr_ratio (LoRA+, Hayou et al. 2024), B learns `ratio` times faster than A."""
        ratio = self.cfg.loraplus_lr_ratio
        if not ratio:
            return super().param_groups(component, lr)
        trained = {id(p) for p in self.parameters_of(component)}
        named = [(n, p) for n, p in self.components[component].named_parameters() if id(p) in trained]
        return [{"params": [p for n, p in named if "lora_B" not in n], "lr": lr},
                {"params": [p for n, p in named if "lora_B" in n], "lr": lr * ratio}]

    def base_scale(self, layer) -> float:
        """The update's scale at multiplier 1: alpha / r."""
        return layer.lora_alpha[ADAPTER] / layer.r[ADAPTER]

    def start_from(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Set the modules a kohya LoRA file holds: A = lora_down, B = lora_up rescaled from the file's alpha / rank
        to this module's scale, so the update B·A·scale is the file's. Returns the names set; ValueError for a rank
        that differs."""
        found = []
        with torch.no_grad():
            for name in self.names():
                down, up = tensors.get(f"{name}.lora_down.weight"), tensors.get(f"{name}.lora_up.weight")
                if down is None or up is None:
                    continue
                layer = self.layer(name)
                a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
                if down.shape != a.shape or up.shape != b.shape:
                    what = "conv_dim" if self.targets[name].conv3x3 else "network_dim"
                    raise ValueError(f"{name} is of rank {down.shape[0]} in the file, {a.shape[0]} here: set {what} "
                                     f"= {down.shape[0]} to start from it")
                rank = down.shape[0]
                alpha = float(tensors.get(f"{name}.alpha", torch.tensor(float(rank))))  # kohya: no alpha = the rank
                a.copy_(down)
                b.copy_(up.float() * (alpha / rank) / self.base_scale(layer))
                found.append(name)
        return found

    def delta(self, name: str) -> torch.Tensor:
        layer = self.layer(name)
        scaling = layer.scaling[ADAPTER]
        layer.scaling[ADAPTER] = self.base_scale(layer)
        try:
            return layer.get_delta_weight(ADAPTER).detach()
        finally:
            layer.scaling[ADAPTER] = scaling

    def factors(self, name: str) -> dict[str, torch.Tensor]:
        layer = self.layer(name)
        return {
            "lora_down.weight": layer.lora_A[ADAPTER].weight.detach(),
            "lora_up.weight": layer.lora_B[ADAPTER].weight.detach(),
            "alpha": torch.tensor(float(layer.lora_alpha[ADAPTER])),
        }

    def set_multiplier(self, value: float) -> None:
        for name in self.targets:
            layer = self.layer(name)
            layer.scaling[ADAPTER] = value * self.base_scale(layer)

    def scale_delta(self, name: str, ratio: float) -> None:
        layer = self.layer(name)  # both factors by √ratio, as kohya's apply_max_norm_regularization
        layer.lora_A[ADAPTER].weight.mul_(ratio ** 0.5)
        layer.lora_B[ADAPTER].weight.mul_(ratio ** 0.5)


@register("locon")
class LoCon(LoRA):
    """LoRA plus the 3x3 convs of res-blocks and samplers (kohya's conv_dim / conv_alpha)."""


@register("rslora")
class RsLoRA(LoRA):
    """Rank-stabilised LoRA (Kalajdzievski 2023): scale alpha/sqrt(r) instead of alpha/r, so higher ranks keep
    learning. Exported as plain LoRA whose stored alpha is alpha*sqrt(r): loaders compute alpha/r and get the same."""

    def peft_config(self, paths, conv_paths) -> LoraConfig:
        config = super().peft_config(paths, conv_paths)
        config.use_rslora = True
        return config

    def factors(self, name: str) -> dict[str, torch.Tensor]:
        out = super().factors(name)
        r = self.layer(name).r[ADAPTER]
        out["alpha"] = torch.tensor(float(self.layer(name).lora_alpha[ADAPTER]) * r ** 0.5)
        return out

    def base_scale(self, layer) -> float:
        return layer.lora_alpha[ADAPTER] / layer.r[ADAPTER] ** 0.5


@register("lora_fa")
class LoRAFA(LoRA):
    """LoRA-FA (Zhang et al. 2023): A stays at its random init, only B trains: about half the optimizer memory.
    Exported as plain LoRA."""

    def inject(self) -> int:
        wrapped = super().inject()
        for model in self.components.values():
            for n, p in model.named_parameters():
                if "lora_A" in n:
                    p.requires_grad_(False)
        return wrapped

    def saved_parameters(self, component: str) -> list[torch.nn.Parameter]:
        """The frozen A too: a resumed run or a reloaded checkpoint must not depend on re-drawing it."""
        return [p for n, p in self.components[component].named_parameters() if "lora_" in n]

    def scale_delta(self, name: str, ratio: float) -> None:
        self.layer(name).lora_B[ADAPTER].weight.mul_(ratio)  # A stays as it was drawn

"""LoRA and LoCon through peft. The file stores lora_down = A, lora_up = B and alpha: ΔW = B·A·alpha/r."""

from __future__ import annotations

import re

import torch
from peft import LoraConfig, inject_adapter_in_model

from trainer.networks.base import Network, register

ADAPTER = "default"


@register("lora")
class LoRA(Network):
    """Low-rank update of the attention and MLP projections (and 1x1 convs)."""

    def uses_convs(self) -> bool:
        return False

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

    def layer(self, name: str):
        t = self.targets[name]
        return self.components[t.component].get_submodule(t.path)

    def parameters_of(self, component: str) -> list[torch.nn.Parameter]:
        return [p for n, p in self.components[component].named_parameters() if "lora_" in n]

    def delta(self, name: str) -> torch.Tensor:
        layer = self.layer(name)
        scaling = layer.scaling[ADAPTER]
        layer.scaling[ADAPTER] = layer.lora_alpha[ADAPTER] / layer.r[ADAPTER]  # at multiplier 1
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
            layer.scaling[ADAPTER] = value * layer.lora_alpha[ADAPTER] / layer.r[ADAPTER]


@register("locon")
class LoCon(LoRA):
    """LoRA plus the 3x3 convs of res-blocks and samplers (kohya's conv_dim / conv_alpha)."""

    def uses_convs(self) -> bool:
        return True

"""AdaLoRA (Zhang et al. 2023) through peft: adapters in SVD form ΔW = B·diag(E)·A·alpha/r, whose rank budget is
re-allocated during training. Every module starts at `adalora_init_r`; from 10 % of the steps to 80 % the least
important singular values (by gradient × weight sensitivity) are masked until ranks average `network_dim`, then the
ranks stay fixed. Exported as plain LoRA whose rank differs per module, with one alpha for all of them and each
module's own scale folded into its lora_up.
"""

from __future__ import annotations

import math

import torch
from peft import AdaLoraConfig
from peft.tuners.adalora import AdaLoraModel

from trainer.networks.base import Network, register

ADAPTER = "default"
ORTH_REG_WEIGHT = 0.5  # peft's default weight of the orthogonality penalty on A and B


@register("adalora")
class AdaLoRA(Network):
    """SVD-form LoRA that moves rank to the modules that need it."""

    def peft_config(self, paths: list[str]) -> AdaLoraConfig:
        total = max(self.total_steps, 2)
        return AdaLoraConfig(
            init_r=self.cfg.adalora_init_r or math.ceil(1.5 * self.cfg.network_dim),
            target_r=self.cfg.network_dim, lora_alpha=self.cfg.network_alpha, lora_dropout=self.cfg.network_dropout,
            target_modules=paths, total_step=total, tinit=total // 10, tfinal=total // 5, deltaT=1,
            orth_reg_weight=ORTH_REG_WEIGHT, bias=self.cfg.network_bias)

    def inject(self) -> int:
        self.tuners: dict[str, AdaLoraModel] = {}
        wrapped = 0
        for component, model in self.components.items():
            paths = [t.path for t in self.targets.values() if t.component == component]
            if paths:
                self.tuners[component] = AdaLoraModel(model, self.peft_config(paths), ADAPTER)
                wrapped += sum(hasattr(model.get_submodule(p), "lora_E") for p in paths)
        return self._check_count(wrapped)

    def regularization(self) -> torch.Tensor | float:
        """‖AAᵀ − I‖ + ‖BᵀB − I‖, which peft adds inside AdaLoraModel.forward only for models returning `.loss`."""
        terms = []
        for name in self.targets:
            layer = self.layer(name)
            a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
            for cov in (a @ a.T, b.T @ b):
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device), "fro"))
        return ORTH_REG_WEIGHT * torch.stack(terms).mean()

    def after_step(self, step: int) -> None:
        for component, tuner in self.tuners.items():
            for p in self.parameters_of(component):  # layers whose output is unused (SDXL's CLIP-L last layer)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            config = tuner.peft_config[ADAPTER]
            if step > config.total_step - config.tfinal and config.rank_pattern is None:
                config.rank_pattern = self.rank_pattern(component)  # resumed after the budget was fixed
            tuner.update_and_allocate(step)

    def rank_pattern(self, component: str) -> dict[str, list[bool]]:
        """Which singular values are kept, read back from E (masked values are exactly zero)."""
        out = {}
        for name, t in self.targets.items():
            if t.component == component:
                e = self.layer(name).lora_E[ADAPTER]
                out[f"{t.path}.lora_E.{ADAPTER}"] = (e.view(-1) != 0).tolist()
        return out

    def scale(self, layer) -> float:
        """The update's scale at multiplier 1, as peft's forward computes it."""
        return layer.lora_alpha[ADAPTER] / (layer.ranknum[ADAPTER].item() + 1e-5)

    def delta(self, name: str) -> torch.Tensor:
        layer = self.layer(name)
        with torch.no_grad():
            up, down = layer.lora_B[ADAPTER], layer.lora_A[ADAPTER] * layer.lora_E[ADAPTER]
            return ((up @ down) * self.scale(layer)).reshape(self.weight_shape(layer))

    def factors(self, name: str) -> dict[str, torch.Tensor]:
        layer = self.layer(name)
        with torch.no_grad():
            kept = layer.lora_E[ADAPTER].view(-1).nonzero().view(-1)
            if kept.numel() == 0:
                kept = torch.zeros(1, dtype=torch.long)  # one zero row: ΔW = 0, still a valid LoRA module
            shape = self.weight_shape(layer)
            down = (layer.lora_A[ADAPTER] * layer.lora_E[ADAPTER])[kept].reshape(len(kept), *shape[1:])
            # one alpha for every module (diffusers mis-scales files whose alphas differ); the rest of each
            # module's scale goes into up, so up @ down · alpha / rank is the update
            alpha = float(self.cfg.network_alpha)
            up = layer.lora_B[ADAPTER][:, kept] * (self.scale(layer) * len(kept) / alpha)
            up = up.reshape(shape[0], len(kept), *[1] * (len(shape) - 2))
        return {"lora_down.weight": down.detach(), "lora_up.weight": up.detach(), "alpha": torch.tensor(alpha)}

    @staticmethod
    def weight_shape(layer) -> tuple[int, ...]:
        """The base weight's shape (a 4-bit layer's weight is packed, so Linear shapes come from its features)."""
        base = layer.get_base_layer()
        return tuple(base.weight.shape) if isinstance(base, torch.nn.Conv2d) else (base.out_features, base.in_features)

    def set_multiplier(self, value: float) -> None:
        for name in self.targets:
            layer = self.layer(name)
            layer.scaling[ADAPTER] = value * layer.lora_alpha[ADAPTER]

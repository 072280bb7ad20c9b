"""VeRA (Kopiczko et al. 2024) through peft: one pair of frozen random matrices A, B shared by every layer of a
component; each layer trains only two scaling vectors, ΔW = Λb·B·Λd·A. Exported as plain LoRA with the scalings
folded in (lora_up = Λb·B·Λd, lora_down = A, alpha = r), so every loader applies it unchanged.

peft's VeRA wraps nn.Linear layers only: SD1's 1x1 proj_in/proj_out convs are left out (SD2 and SDXL use Linear).
"""

from __future__ import annotations

import torch
from peft import VeraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.tuners.vera import VeraModel

from trainer.networks.base import Network, blend_outputs, register

ADAPTER = "default"
BIAS = {"none": "none", "lora_only": "vera_only", "all": "all"}


@register("vera")
class VeRA(Network):
    """Shared random projections, trained per-layer scaling vectors: the fewest trained parameters of any method.
    Usually run at a high rank (network_dim 256), since the rank costs no trained parameters."""

    hooks: list = []

    def inject(self) -> int:
        self.tuners: dict[str, VeraModel] = {}  # each holds its component's shared projections
        wrapped = 0
        for component, model in self.components.items():
            paths = [t.path for t in self.targets.values() if t.component == component]
            if not paths:
                continue
            config = VeraConfig(r=self.cfg.network_dim, target_modules=paths, vera_dropout=self.cfg.network_dropout,
                                projection_prng_key=self.projection_key(component), bias=BIAS[self.cfg.network_bias])
            self.tuners[component] = VeraModel(model, config, ADAPTER)
            wrapped += sum(hasattr(model.get_submodule(p), "vera_lambda_b") for p in paths)
            for layer in model.modules():  # peft's disable_input_dtype_casting, which diffusers' layerwise casting
                # (an fp8 base) runs, reads this flag of every tuner layer; peft's VeRA layer has none
                if isinstance(layer, BaseTunerLayer) and not hasattr(layer, "cast_input_dtype_enabled"):
                    layer.cast_input_dtype_enabled = True
        return self._check_count(wrapped)

    @staticmethod
    def projection_key(component: str) -> int:
        """The shared projections are regenerated from this key on resume, so they are never stored."""
        return {"unet": 0, "transformer": 0, "text_encoder": 1, "text_encoder_2": 2}[component]

    def delta(self, name: str) -> torch.Tensor:
        with torch.no_grad():
            return self.layer(name).get_delta_weight(ADAPTER).detach()

    def factors(self, name: str) -> dict[str, torch.Tensor]:
        layer = self.layer(name)
        with torch.no_grad():
            a = layer.vera_A[ADAPTER][:, : layer.in_features]
            b = layer.vera_B[ADAPTER][: layer.out_features, :]
            up = layer.vera_lambda_b[ADAPTER][:, None] * b * layer.vera_lambda_d[ADAPTER][None, :]
        return {"lora_down.weight": a.detach().float().clone(), "lora_up.weight": up.detach().float(),
                "alpha": torch.tensor(float(a.shape[0]))}

    def set_multiplier(self, value: float) -> None:
        layers = [(self.layer(name), self.layer(name).base_layer) for name in self.targets]
        self.hooks = blend_outputs(layers, value, self.hooks)

"""LoHa, LoKr and DoRA through LyCORIS, which writes the hada_* / lokr_* / dora_scale keys ComfyUI and WebUI read."""

from __future__ import annotations

import torch
from lycoris import LycorisNetwork
from lycoris.functional.general import weight_decompose

from trainer.networks.base import Network, blend_outputs, register

PREFIX = "lycoris"


class _LyCORIS(Network):
    algo: str
    module_kwargs: dict = {}

    def inject(self) -> int:
        self.networks: dict[str, LycorisNetwork] = {}
        self.modules: dict[str, torch.nn.Module] = {}
        for component, model in self.components.items():
            targets = [t for t in self.targets.values() if t.component == component]
            if not targets:
                continue
            # LyCORIS presets are class-level state: set ours, naming modules exactly, before every network
            LycorisNetwork.apply_preset({"enable_conv": True, "target_module": [], "module_algo_map": {},
                                         "name_algo_map": {}, "exclude_name": [], "use_fnmatch": False,
                                         "lora_prefix": PREFIX, "target_name": [t.path for t in targets]})
            net = LycorisNetwork(model, multiplier=1.0, lora_dim=self.cfg.network_dim,
                                 conv_lora_dim=self.cfg.conv_dim, alpha=self.cfg.network_alpha,
                                 conv_alpha=self.cfg.conv_alpha, dropout=self.cfg.network_dropout,
                                 network_module=self.algo, use_tucker=False, factor=self.cfg.lokr_factor,
                                 warn_on_unmatched=False, **self.module_kwargs)
            net.apply_to()
            by_name = {lora.lora_name: lora for lora in net.loras}
            for t in targets:
                key = f"{PREFIX}_{t.path}".replace(".", "_")
                if key in by_name:
                    self.modules[t.name] = by_name[key]
            self.networks[component] = net
        return self._check_count(len(self.modules))

    def torch_modules(self) -> list[torch.nn.Module]:
        return super().torch_modules() + list(self.networks.values())  # LyCORIS holds its modules beside the model

    def parameters_of(self, component: str) -> list[torch.nn.Parameter]:
        net = self.networks.get(component)
        return [p for p in net.parameters() if p.requires_grad] if net else []

    def delta(self, name: str) -> torch.Tensor:
        module = self.modules[name]
        with torch.no_grad():  # what the module's forward adds (its get_diff_weight scales LoHa twice)
            return (module.get_weight(module.shape) * module.scalar).detach()

    def factors(self, name: str) -> dict[str, torch.Tensor]:
        out = {k: v.detach() for k, v in self.modules[name].custom_state_dict().items()}
        if "lokr_t2" in out:  # ComfyUI raises on Tucker-form LoKr convs; we never create them
            raise RuntimeError(f"{name}: Tucker-form LoKr (lokr_t2) must not be exported")
        out["alpha"] = torch.as_tensor(out["alpha"], dtype=torch.float32).reshape(())
        return out

    def set_multiplier(self, value: float) -> None:
        for net in self.networks.values():
            net.set_multiplier(value)

    def limit_norm(self, name: str, limit: float) -> tuple[bool, float]:
        scaled, norm = self.modules[name].apply_max_norm(limit)  # LyCORIS' own, which sd-scripts calls
        return bool(scaled), float(norm)

    def network_args(self) -> dict[str, str]:
        return {"algo": self.algo} | super().network_args()


@register("loha")
class LoHa(_LyCORIS):
    """Hadamard product of two low-rank pairs: more expressive per parameter than LoRA."""

    algo = "loha"


@register("lokr")
class LoKr(_LyCORIS):
    """Kronecker product of a small and a (low-rank) large factor; `lokr_factor` sets the split."""

    algo = "lokr"

    def network_args(self) -> dict[str, str]:
        return super().network_args() | {"factor": str(self.cfg.lokr_factor)}


@register("dora")
class DoRA(_LyCORIS):
    """DoRA (Liu et al. 2024): LoRA trains the direction of each weight and a vector its magnitude,
    W' = m · (W + ΔW) / ‖W + ΔW‖. The norm is taken per input channel (LyCORIS `wd_on_out=False`): the
    decomposition AUTOMATIC1111 applies to `dora_scale`; ComfyUI reads the axis from dora_scale's shape [1, in]."""

    algo = "lora"
    module_kwargs = {"weight_decompose": True, "wd_on_out": False}
    hooks: list = []

    def delta(self, name: str) -> torch.Tensor:
        """W' − W in float64: in float32 the subtraction of two near-equal weights loses the small update."""
        m = self.modules[name]
        with torch.no_grad():
            weight = m.org_weight.double()
            merged = weight_decompose(weight + m.make_weight().double() * m.scale, m.dora_scale.double(), 1,
                                      m.wd_on_out)
            return (merged - weight).float()

    def set_multiplier(self, value: float) -> None:
        # LyCORIS' multiplier scales only the magnitude step; loaders blend the whole update: W + s·(W' − W).
        # LyCORIS replaces the wrapped module's forward, so the hook goes on that module.
        layers = [(m.org_module[0], m.org_forward) for m in self.modules.values()]
        self.hooks = blend_outputs(layers, value, self.hooks)

    def network_args(self) -> dict[str, str]:
        return super().network_args() | {"dora_wd": "True", "wd_on_output": "False"}

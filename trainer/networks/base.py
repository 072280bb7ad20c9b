"""The one interface every adapter method implements, the registry, and kohya's default target modules.

The loop, the export and the tests see only `Network`: `inject()` wraps the targets, `parameter_groups()` feeds the
optimizer, `delta(name)` is the effective weight update of one module and `factors(name)` the tensors the file stores
for it under kohya's names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from trainer.kohya_names import kohya_name

FLOW_ARCHES = ("sd3", "flux")  # transformers: targets and file names from trainer/flow_names.py
from trainer.methods import CATALOG, Method

NETWORKS: dict[str, type["Network"]] = {}

# kohya sd-scripts networks/lora.py: which blocks are searched for Linear / Conv2d children
UNET_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


FACTS = ("kind", "exports_as", "linear_only", "dynamic_rank", "uses_convs")  # from the catalog only


def register(name: str):
    """Add a class to NETWORKS under a name of the catalog (trainer.methods), from which it takes its facts."""
    def add(cls):
        if name not in CATALOG:
            raise KeyError(f"network {name!r} is not in trainer.methods.CATALOG: add its entry there")
        own = [f for f in FACTS for c in cls.__mro__ if c is not Network and f in vars(c)]
        if own:
            raise TypeError(f"{cls.__name__} sets {', '.join(own)}: {name}'s facts come from trainer.methods")
        if name in NETWORKS:
            raise KeyError(f"network {name!r} registered twice")
        NETWORKS[name] = cls
        cls.method = CATALOG[name]
        return cls

    return add


@dataclass(frozen=True)
class Target:
    name: str  # kohya name, the key stem in the file
    component: str  # "unet" | "text_encoder" | "text_encoder_2"
    path: str  # module path inside the component
    conv3x3: bool  # uses conv_dim / conv_alpha


def is_conv3x3(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)


def find_targets(arch: str, components: dict[str, nn.Module], with_convs: bool) -> list[Target]:
    """kohya's defaults: Linear and 1x1 convs of every UNet transformer block and every CLIP attention / MLP; with
    `with_convs` (LoCon), also the res-blocks and up/down-samplers, whose 3x3 convs take the conv rank."""
    if arch in FLOW_ARCHES:
        return flow_targets(arch, components)
    targets = []
    for component, model in components.items():
        blocks = UNET_BLOCKS + (UNET_CONV_BLOCKS if with_convs else ()) if component == "unet" else TEXT_ENCODER_BLOCKS
        unet_config = model.config if component == "unet" else None
        for block_path, block in model.named_modules():
            if type(block).__name__ not in blocks:
                continue
            for child_path, child in block.named_modules():
                if not isinstance(child, (nn.Linear, nn.Conv2d)) or (is_conv3x3(child) and not with_convs):
                    continue
                path = f"{block_path}.{child_path}"
                targets.append(Target(kohya_name(arch, component, path, unet_config), component, path,
                                      is_conv3x3(child)))
    return targets


def flow_targets(arch: str, components: dict[str, nn.Module]) -> list[Target]:
    """SD 3.5 / FLUX.1: every Linear of the transformer's blocks (FLUX double/single blocks, SD3 joint blocks),
    as kohya's default targets (its FLUX `in_dims` / SD3 `emb_dims` embedders and the final layer are off by
    default), and with text-encoder LoRA every attention / MLP Linear of the CLIP encoders (FLUX.1 CLIP-L, SD 3.5
    CLIP-L and CLIP-G; T5 is refused by flow_names.plan). Named by their diffusers path ("transformer.<path>",
    "text_encoder.<path>"): several of them fuse into one file module (trainer/flow_names.py), so the file's names
    are made when exporting, not here."""
    from trainer import flow_names

    if "transformer" not in components:
        raise ValueError(f"{arch}: the transformer trains on SD 3.5 / FLUX.1 (text-encoder LoRA goes with it)")
    modules = flow_names.plan(arch, components["transformer"], flow_text_encoders(components))
    return [Target(part, part.split(".", 1)[0], part.split(".", 1)[1], False) for m in modules
            if m.name.startswith(flow_names.BLOCK_PREFIXES + tuple(flow_names.TE_PREFIX[arch].values()))
            for part in m.parts]


def flow_text_encoders(components: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The text encoders among an SD 3.5 / FLUX.1 network's components (everything but the transformer)."""
    return {c: m for c, m in components.items() if c != "transformer"}


class Network:
    """An adapter on the UNet and/or text encoders of one base model."""

    method: Method  # set by register()

    def __init__(self, cfg, arch: str, components: dict[str, nn.Module], total_steps: int = 0):
        self.cfg = cfg
        self.arch = arch
        self.components = components
        self.total_steps = total_steps  # for methods whose schedule depends on it (AdaLoRA)
        targets = find_targets(arch, components, self.uses_convs())
        if self.linear_only:
            targets = [t for t in targets if isinstance(components[t.component].get_submodule(t.path), nn.Linear)]
        # SD 3.5 / FLUX.1: the file's modules, planned on the transformer before the adapter wraps its Linears
        self.file_modules = None
        self.left_out: list[str] = []  # targets a method leaves out because no loader reads them in its file
        if arch in FLOW_ARCHES and "transformer" in components:
            from trainer import flow_names
            self.file_modules = flow_names.plan(arch, components["transformer"], flow_text_encoders(components))
            if self.exports_as == "lycoris":  # one module per split Linear, under a key ComfyUI maps
                keys = flow_names.lycoris_keys(arch, self.file_modules)
                self.left_out = [t.name for t in targets if t.name not in keys]
                targets = [t for t in targets if t.name in keys]
        self.targets = {t.name: t for t in targets}

    @property
    def kind(self) -> str:
        return self.method.name

    @property
    def exports_as(self) -> str:
        return self.method.exports_as

    @property
    def linear_only(self) -> bool:
        return self.method.linear_only

    def uses_convs(self) -> bool:
        return self.method.convs == "required" or (self.method.convs == "optional" and self.cfg.conv_dim > 0)

    def inject(self) -> int:
        """Wrap every target; returns how many were wrapped and raises if that is not every target."""
        raise NotImplementedError

    def parameters_of(self, component: str) -> list[nn.Parameter]:
        """The trainable tensors of one component: create() froze the base, the method unfroze its own."""
        return [p for p in self.components[component].parameters() if p.requires_grad]

    def layer(self, name: str) -> nn.Module:
        """The wrapped module of one target (peft replaces the module in place)."""
        t = self.targets[name]
        return self.components[t.component].get_submodule(t.path)

    def param_groups(self, component: str, lr: float) -> list[dict]:
        """Optimizer parameter groups of one component (a method may give parts of itself other rates)."""
        return [{"params": self.parameters_of(component), "lr": lr}]

    def delta(self, name: str) -> torch.Tensor:
        """ΔW of one module at multiplier 1, shaped like the base weight."""
        raise NotImplementedError

    def factors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors the file stores for one module, by kohya / LyCORIS parameter name (`lora_down.weight`, …)."""
        raise NotImplementedError

    def set_multiplier(self, value: float) -> None:
        raise NotImplementedError

    def start_from(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Set the modules a file holds to its weights (network_weights); the names set. trainer/methods.py says
        which methods can (`starts_from_file`)."""
        raise NotImplementedError(f"{self.kind}: starting from a file")

    def regularization(self) -> torch.Tensor | float:
        """A term the method adds to the loss (AdaLoRA's orthogonality); 0 for most."""
        return 0.0

    def after_step(self, step: int) -> None:
        """Called after each optimizer step, before the gradients are cleared (AdaLoRA re-allocates ranks here)."""

    def max_norm(self) -> dict[str, float]:
        """kohya's scale_weight_norms, after an optimizer step: a module whose ΔW (at multiplier 1) has a Frobenius
        norm above the limit is scaled down to it. {} when off, else the step's keys_scaled, mean_norm and max_norm
        (of every module, after scaling), as kohya logs them."""
        limit = self.cfg.scale_weight_norms
        if not limit:
            return {}
        with torch.no_grad():
            results = [self.limit_norm(name, limit) for name in self.targets]
        norms = [norm for _, norm in results]
        return {"keys_scaled": sum(scaled for scaled, _ in results), "mean_norm": sum(norms) / len(norms),
                "max_norm": max(norms)}

    def limit_norm(self, name: str, limit: float) -> tuple[bool, float]:
        """One module scaled down to `limit` when the norm of its ΔW is above it: (scaled, its norm now)."""
        norm = float(self.delta(name).float().norm())
        if norm <= limit:
            return False, norm
        self.scale_delta(name, limit / norm)
        return True, limit

    def scale_delta(self, name: str, ratio: float) -> None:
        """Scale one module's trained factors so that its ΔW is `ratio` times what it was."""
        raise NotImplementedError(f"{self.kind}: scale_weight_norms")

    def network_args(self) -> dict[str, str]:
        """`ss_network_args` of the file: what a loader or a re-run needs to rebuild this network."""
        args = {} if self.method.native else {"trained_as": self.kind}
        if self.uses_convs():
            args |= {"conv_dim": str(self.cfg.conv_dim), "conv_alpha": str(self.cfg.conv_alpha)}
        return args

    def saved_parameters(self, component: str) -> list[nn.Parameter]:
        """What a resumable checkpoint keeps: the trained tensors, and any frozen ones the file depends on."""
        return self.parameters_of(component)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter tensors, for resumable checkpoints."""
        return {f"{c}.{i}": p.detach() for c in self.components for i, p in enumerate(self.saved_parameters(c))}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for c in self.components:
                for i, p in enumerate(self.saved_parameters(c)):
                    p.copy_(state[f"{c}.{i}"])

    def names(self) -> list[str]:
        return list(self.targets)

    def torch_modules(self) -> list[nn.Module]:
        """Every module the adapted forward runs through (to switch train / eval mode)."""
        return list(self.components.values())

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.targets.values():
            out[t.component] = out.get(t.component, 0) + 1
        return out

    def _check_count(self, wrapped: int) -> int:
        if wrapped != len(self.targets):
            raise RuntimeError(f"{self.kind}: wrapped {wrapped} modules, expected {len(self.targets)}")
        return wrapped


def blend_outputs(layers: list[tuple[nn.Module, Callable]], value: float, hooks: list) -> list:
    """Apply an adapter at strength `value` the way loaders apply a file: base(x) + value·(adapted(x) − base(x)).
    For methods whose own multiplier means something else (DoRA's) or that have none (VeRA). `layers` pairs each
    wrapped module with its base forward; returns the new hook handles (none at strength 1)."""
    for handle in hooks:
        handle.remove()
    if value == 1.0:
        return []

    def hook_for(base_forward):
        def blend(module, args, out):
            base = base_forward(*args)
            return base + value * (out - base)
        return blend

    return [layer.register_forward_hook(hook_for(base_forward)) for layer, base_forward in layers]


def create(cfg, arch: str, components: dict[str, nn.Module], total_steps: int = 0) -> Network:
    """The network named by `cfg.network_type`, injected into `components`."""
    import trainer.networks  # noqa: F401  (registers the methods)

    if cfg.network_type not in NETWORKS:
        raise KeyError(f"unknown network_type {cfg.network_type!r}; choose one of {sorted(NETWORKS)}")
    for model in components.values():
        model.requires_grad_(False)
    net = NETWORKS[cfg.network_type](cfg, arch, components, total_steps)
    net.inject()
    return net

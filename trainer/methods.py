"""The adapter methods and their facts, in one place: config validation, the network classes (trainer/networks/),
the benchmark and the README's table all read them from here. Standard library only: the web UI imports it."""

from __future__ import annotations

from dataclasses import dataclass

CONVS = ("never", "optional", "required")


@dataclass(frozen=True)
class Method:
    name: str  # the config's network_type
    summary: str  # one line, for the field's help
    trained_through: str  # "peft" | "lycoris": the library that wraps the layers
    exports_as: str  # "lora" (lora_up / lora_down keys) | "lycoris" (LyCORIS' keys: hada_*, lokr_*, dora_scale)
    convs: str = "never"  # 3x3 convs of res-blocks and samplers: "never", "optional" (conv_dim > 0) or "required"
    linear_only: bool = False  # wraps nn.Linear only (SD1's 1x1 proj_in / proj_out convs are left out)
    loraplus: bool = False  # has a B matrix of its own that LoRA+ can speed up
    dynamic_rank: bool = False  # ranks differ per module in the file
    native: bool = False  # kohya sd-scripts or LyCORIS trains it itself, so the file needs no `trained_as`
    with_convs: str = ""  # the method that adds 3x3 convs to this one
    starts_from_file: bool = False  # network_weights: a run can start from a kohya LoRA file's weights
    max_norm: bool = True  # scale_weight_norms: each module's ΔW can be scaled down to a norm

    def __post_init__(self):
        if self.trained_through not in ("peft", "lycoris") or self.exports_as not in ("lora", "lycoris") or \
                self.convs not in CONVS:
            raise ValueError(f"{self.name}: trained_through, exports_as or convs is none of the values allowed")


CATALOG: dict[str, Method] = {m.name: m for m in (
    Method("lora", "low-rank update of attention and MLP projections", "peft", "lora", loraplus=True, native=True,
           with_convs="locon", starts_from_file=True),
    Method("locon", "LoRA + 3x3 convs (conv_dim / conv_alpha)", "peft", "lora", convs="required", loraplus=True,
           native=True, starts_from_file=True),
    Method("loha", "Hadamard product of two low-rank pairs", "lycoris", "lycoris", convs="optional", native=True),
    Method("lokr", "Kronecker product, lokr_factor sets the split", "lycoris", "lycoris", convs="optional",
           native=True),
    Method("dora", "direction + magnitude", "lycoris", "lycoris", convs="optional", native=True),
    Method("rslora", "scale alpha/√dim", "peft", "lora", loraplus=True, starts_from_file=True),
    Method("lora_fa", "A frozen", "peft", "lora", loraplus=True, starts_from_file=True),
    Method("vera", "shared random A, B; trained scales", "peft", "lora", linear_only=True, max_norm=False),
    Method("adalora", "rank moves to where it helps", "peft", "lora", convs="optional", dynamic_rank=True,
           max_norm=False),
)}
NAMES = tuple(CATALOG)


def names(**facts) -> tuple[str, ...]:
    """The methods with these facts, in catalog order: names(trained_through="peft")."""
    return tuple(m.name for m in CATALOG.values() if all(getattr(m, k) == v for k, v in facts.items()))


def help_text() -> str:
    return "adapter method: " + "; ".join(f"{m.name} ({m.summary})" for m in CATALOG.values()) + ". See the README"

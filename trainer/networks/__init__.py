"""Adapter methods, one module each, registered by name in `NETWORKS`."""

from trainer.networks import adalora, lora, lycoris_nets, vera  # noqa: F401  (each registers itself)
from trainer.networks.base import NETWORKS, Network, Target, create, find_targets, register

__all__ = ["NETWORKS", "Network", "Target", "create", "find_targets", "register"]

"""Bottleneck adapters: Houlsby (2019), Pfeiffer (2020), parallel (He et al. 2022) and
Compacter (Karimi Mahabadi et al. 2021, PHM projections: phm.py).

One package, four methods, picked by Config.method. See peftkit.tuners for the contract.
"""
from .config import Config, build_config, check_options
from .model import adapter_state_dict, describe, inject, load_adapter_state_dict, remove, set_active

__all__ = ["Config", "check_options", "build_config", "inject", "adapter_state_dict", "load_adapter_state_dict",
           "set_active", "remove", "describe"]

"""lightning-bdvax: remove hidden backdoors from generative LLMs without knowing the trigger (BD-VAX).

Three ways in (see ``docs/USAGE.md``):

* :class:`BDVaxCallback` in your own ``Trainer``: your fine-tune becomes the recovery;
* ``lightning-bdvax fit --config recipes/<recipe>.yaml`` (LightningCLI);
* :func:`purify` in a Python pipeline.

The public names below are imported lazily (PEP 562), so ``import lightning_bdvax`` does not
pull in torch, Lightning or transformers until one of them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # Python API
    "purify": "pipeline",
    "PurifyResult": "pipeline",
    "run_vaccination": "pipeline",
    "build_signature": "pipeline",
    "recover": "pipeline",
    "BDVaxConfig": "pipeline",
    "VaccinationConfig": "pipeline",
    "SignatureConfig": "pipeline",
    "NeutralizeConfig": "pipeline",
    "RecoveryConfig": "pipeline",
    "load_bdvax_config": "pipeline",
    "purify_lora": "lora",
    # Lightning pieces
    "BDVaxCallback": "callbacks",
    "SignatureCallback": "callbacks",
    "NeutralizeCallback": "callbacks",
    "VariantModule": "modules",
    "RecoveryModule": "modules",
    "CausalLMModule": "modules",
    # the signature
    "Signature": "signature",
    "SignatureAccumulator": "signature",
    # metrics
    "AttackSuccessRate": "metrics",
    "TargetPrefixRate": "metrics",
    "TriggerConsistency": "metrics",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'lightning_bdvax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from .callbacks import BDVaxCallback, NeutralizeCallback, SignatureCallback
    from .lora import purify_lora
    from .metrics import AttackSuccessRate, TargetPrefixRate, TriggerConsistency
    from .modules import CausalLMModule, RecoveryModule, VariantModule
    from .pipeline import (BDVaxConfig, NeutralizeConfig, PurifyResult, RecoveryConfig, SignatureConfig,
                           VaccinationConfig, build_signature, load_bdvax_config, purify, recover, run_vaccination)
    from .signature import Signature, SignatureAccumulator

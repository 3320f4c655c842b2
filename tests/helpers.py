"""Shared helpers for tests: weight digests, suspicious LoRA adapters, an all-flagged signature,
benchmark scripts as modules."""

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def benchmark_module(name: str):
    """``benchmarks/<name>.py`` imported as a module (the folder is not a package)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def state_digest(model) -> str:
    """SHA-256 of every tensor of ``model.state_dict()`` (names and bytes), wherever it lives."""
    from lightning_bdvax.models import tensor_digest

    return tensor_digest(model.state_dict())


def lora_adapter(base, targets="all-linear", seed: int = 0, r: int = 8):
    """``base`` wrapped (in place) in a LoRA adapter with non-zero B, as a suspicious adapter has
    (a freshly initialised one has B = 0)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    m = get_peft_model(base, LoraConfig(r=r, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m.eval()


def tiny_lora_config(**over):
    """A seconds-long LoRA purification config for tiny models: 2 variants of 8 samples, τ 35 %,
    3 LM recovery steps, fp32. ``vaccination``/``recovery`` dicts update those sections,
    ``signature`` replaces it; other keys go to ``BDVaxConfig``."""
    from lightning_bdvax.pipeline import BDVaxConfig, RecoveryConfig, SignatureConfig, VaccinationConfig

    vac = dict(n_variants=2, samples_per_variant=8, epochs=1.0, lr=3e-3, batch_size=8, max_length=48)
    vac.update(over.pop("vaccination", {}))
    rec = dict(num_samples=16, steps=3, lr=1e-2, batch_size=8, max_length=48, objective="lm")
    rec.update(over.pop("recovery", {}))
    over.setdefault("precision", "32-true")
    return BDVaxConfig(vaccination=VaccinationConfig(**vac), signature=over.pop("signature", SignatureConfig(tau=0.35)),
                       recovery=RecoveryConfig(**rec), **over)


def all_flagged_signature(modules):
    """A signature that flags every channel of ``modules`` (random scores, ``tau`` 1.0)."""
    import torch

    from lightning_bdvax.signature import Signature

    masks = {cm.key: torch.ones(cm.n_channels, dtype=torch.bool) for cm in modules}
    return Signature(masks, {k: torch.rand(v.numel()) for k, v in masks.items()}, {"tau": 1.0})

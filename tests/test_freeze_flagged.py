"""``recovery.freeze_flagged``: the full-model recovery keeps the zeroed channels at zero."""

import pytest
import torch

import lightning_bdvax as bdvax
from lightning_bdvax.arch import find_mlp_modules
from lightning_bdvax.tiny import tiny_model


def _config(freeze, precision="32-true"):
    return bdvax.BDVaxConfig(
        vaccination=bdvax.VaccinationConfig(n_variants=2, samples_per_variant=16, epochs=1, batch_size=8,
                                            max_length=48, lr=1e-3),
        signature=bdvax.SignatureConfig(tau=0.2),
        neutralize=bdvax.NeutralizeConfig(mode="zero"),
        recovery=bdvax.RecoveryConfig(num_samples=16, steps=4, lr=1e-3, freeze_flagged=freeze),
        seed=0, precision=precision)


def _flagged_slices(model, sig):
    named = dict(model.named_modules())
    out = []
    for cm in find_mlp_modules(model):
        idx = sig.indices(cm.key)
        w = named[cm.name].weight
        out.append(w[:, idx] if cm.role == "in" else w[idx])
    return out


@pytest.mark.parametrize("precision", ["32-true", "bf16-master"])
def test_frozen_flagged_channels_stay_zero_and_the_rest_trains(tok, records, precision):
    model = tiny_model("llama", layers=2)
    frozen = bdvax.purify(model, tok, clean_data=records[:200], config=_config(True, precision), progress=False)
    assert frozen.signature.n_flagged > 0
    assert all((w == 0).all() for w in _flagged_slices(frozen.model, frozen.signature))
    # The rest of the model did train: unflagged MLP weights moved.
    named_in, named_out = dict(model.named_modules()), dict(frozen.model.named_modules())
    cm = find_mlp_modules(model)[0]
    assert not torch.equal(named_in[cm.name].weight, named_out[cm.name].weight)
    # The published recovery (trains everything) lets the zeroed channels move off zero.
    free = bdvax.purify(model, tok, clean_data=records[:200], config=_config(False, precision), progress=False)
    assert any((w != 0).any() for w in _flagged_slices(free.model, free.signature))
    # Same stage 1 and the same signature either way.
    assert all(torch.equal(free.signature.masks[k], frozen.signature.masks[k]) for k in free.signature.masks)


def test_freeze_flagged_must_be_a_bool():
    with pytest.raises(ValueError, match="freeze_flagged must be true or false"):
        bdvax.RecoveryConfig(freeze_flagged="yes")

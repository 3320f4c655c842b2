"""``recovery.scope``: which weights the full-model recovery trains."""

import pytest
import torch

import lightning_bdvax as bdvax
from lightning_bdvax.arch import find_mlp_modules
from lightning_bdvax.tiny import tiny_model


def _config(scope, precision="32-true"):
    return bdvax.BDVaxConfig(
        vaccination=bdvax.VaccinationConfig(n_variants=2, samples_per_variant=16, epochs=1, batch_size=8,
                                            max_length=48, lr=1e-3),
        signature=bdvax.SignatureConfig(tau=0.2),
        neutralize=bdvax.NeutralizeConfig(mode="zero"),
        recovery=bdvax.RecoveryConfig(num_samples=16, steps=4, lr=1e-3, scope=scope),
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
    frozen = bdvax.purify(model, tok, clean_data=records[:200], config=_config("unflagged", precision), progress=False)
    assert frozen.signature.n_flagged > 0
    assert all((w == 0).all() for w in _flagged_slices(frozen.model, frozen.signature))
    # The rest of the model did train: unflagged MLP weights moved.
    named_in, named_out = dict(model.named_modules()), dict(frozen.model.named_modules())
    cm = find_mlp_modules(model)[0]
    assert not torch.equal(named_in[cm.name].weight, named_out[cm.name].weight)
    # The published recovery (trains everything) lets the zeroed channels move off zero.
    free = bdvax.purify(model, tok, clean_data=records[:200], config=_config("all", precision), progress=False)
    assert any((w != 0).any() for w in _flagged_slices(free.model, free.signature))
    # Same stage 1 and the same signature either way.
    assert all(torch.equal(free.signature.masks[k], frozen.signature.masks[k]) for k in free.signature.masks)


def test_flagged_scope_trains_only_the_neutralized_channels(tok, records):
    model = tiny_model("llama", layers=2)
    res = bdvax.purify(model, tok, clean_data=records[:200], config=_config("flagged"), progress=False)
    assert any((w != 0).any() for w in _flagged_slices(res.model, res.signature))  # they re-train from zero
    sig = res.signature
    named_in, named_out = dict(model.named_modules()), dict(res.model.named_modules())
    for cm in find_mlp_modules(model):  # every unflagged channel keeps the suspicious model's values
        keep = torch.ones(cm.n_channels, dtype=torch.bool)
        keep[sig.indices(cm.key)] = False
        w_in, w_out = named_in[cm.name].weight, named_out[cm.name].weight
        if cm.role == "in":
            assert torch.equal(w_in[:, keep], w_out[:, keep]), cm.key
        else:
            assert torch.equal(w_in[keep], w_out[keep]), cm.key
    others = [(n, p) for n, p in model.named_parameters() if "mlp" not in n]
    out = dict(res.model.named_parameters())
    assert others and all(torch.equal(p, out[n]) for n, p in others)


def test_recovery_scope_is_checked():
    with pytest.raises(ValueError, match="bdvax.recovery.scope: expected one of all, unflagged, flagged"):
        bdvax.RecoveryConfig(scope="some")
    from lightning_bdvax.lora import purify_lora

    with pytest.raises(ValueError, match="'flagged' applies to full-model purification"):
        purify_lora(tiny_model("llama"), "nowhere", None, [], _config("flagged"))


def test_recipe_check_rejects_a_bad_recovery_scope_before_loading():
    from lightning_bdvax.validation import ConfigError, check_config

    with pytest.raises(ConfigError, match="model.recovery_scope: expected one of all, unflagged, flagged"):
        check_config({"model": {"recovery_scope": "some"}})
    with pytest.raises(ConfigError, match="'flagged' applies to full-model purification"):
        check_config({"model": {"recovery_scope": "flagged"}, "adapter_path": "adapter"})

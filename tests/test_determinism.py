"""``lightning_bdvax.purify``: deterministic on CPU, and the caller's model is never modified."""

import pytest
import torch

import lightning_bdvax as bdvax
from helpers import state_digest


def _config(seed=0):
    return bdvax.BDVaxConfig(
        vaccination=bdvax.VaccinationConfig(n_variants=2, samples_per_variant=16, epochs=1, batch_size=8,
                                            max_length=48, lr=1e-3),
        signature=bdvax.SignatureConfig(tau=0.1),
        neutralize=bdvax.NeutralizeConfig(mode="reinit"),
        recovery=bdvax.RecoveryConfig(num_samples=16, steps=3, batch_size=8, max_length=48, lr=1e-3,
                                      objective="distill"),
        seed=seed, precision="32-true")


def test_purify_is_exported_and_documented():
    assert "purify" in bdvax.__all__ and "BDVaxCallback" in bdvax.__all__
    assert "not modified" in bdvax.purify.__doc__


def test_same_seed_same_signature_and_weights_and_input_untouched(tok, records):
    from lightning_bdvax.tiny import tiny_model

    model = tiny_model("llama")
    model.train()
    model.lm_head.weight.requires_grad_(False)  # a caller's own flags must survive too
    before = state_digest(model)
    flags = [p.requires_grad for p in model.parameters()]

    a = bdvax.purify(model, tok, clean_data=records[:200], config=_config(0), progress=False)
    assert state_digest(model) == before  # the input model's weights are untouched
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training
    b = bdvax.purify(model, tok, clean_data=records[:200], config=_config(0), progress=False)

    assert isinstance(a, bdvax.PurifyResult) and a.model is not model
    assert set(a.report) >= {"config", "timings", "signature"}
    for k in a.signature.scores:
        assert torch.equal(a.signature.scores[k], b.signature.scores[k])
        assert torch.equal(a.signature.masks[k], b.signature.masks[k])
    assert state_digest(a.model) == state_digest(b.model)
    assert state_digest(a.model) != before  # it did purify something
    assert a.signature.n_flagged > 0

    c = bdvax.purify(model, tok, clean_data=records[:200], config=_config(1), progress=False)
    assert any(not torch.equal(a.signature.scores[k], c.signature.scores[k]) for k in a.signature.scores)
    assert state_digest(model) == before

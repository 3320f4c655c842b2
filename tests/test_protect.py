"""``signature.protect``: spare the neurons clean inputs rely on most from neutralization."""

import copy

import pytest
import torch

import lightning_bdvax as bdvax
from lightning_bdvax.arch import find_mlp_modules
from lightning_bdvax.baselines import collect_input_norms
from lightning_bdvax.pipeline import SignatureConfig, clean_neuron_importance
from lightning_bdvax.signature import Signature, spare_important_neurons
from lightning_bdvax.tiny import tiny_model

from helpers import all_flagged_signature as _all_flagged


def test_spare_unflags_each_blocks_top_neurons_in_every_projection():
    model = tiny_model("llama", layers=2)  # intermediate 64
    mods = find_mlp_modules(model)
    blocks = sorted({cm.block for cm in mods})
    g = torch.Generator().manual_seed(0)
    imp = {b: torch.rand(64, generator=g) for b in blocks}
    sig = _all_flagged(mods)
    out = spare_important_neurons(sig, mods, imp, 0.1)  # floor(6.4) = 6 neurons per block
    for cm in mods:
        top = set(torch.topk(imp[cm.block], 6).indices.tolist())
        unflagged = set((~out.masks[cm.key]).nonzero().flatten().tolist())
        assert unflagged == top, cm.key  # gate/up rows and down columns alike
    assert out.meta["protect"] == {"fraction": 0.1, "spared": 6 * len(mods)}
    assert out.meta["tau"] == 1.0 and out.scores is sig.scores
    assert all(m.all() for m in sig.masks.values())  # the input signature is not changed
    # Only flagged channels can be spared; fraction 0 spares nothing.
    none = Signature({k: torch.zeros_like(v) for k, v in sig.masks.items()}, sig.scores, {})
    assert spare_important_neurons(none, mods, imp, 0.5).meta["protect"]["spared"] == 0
    assert spare_important_neurons(sig, mods, imp, 0.0).n_flagged == sig.n_flagged


def test_spare_argument_errors():
    mods = find_mlp_modules(tiny_model("llama", layers=1))
    sig = _all_flagged(mods)
    with pytest.raises(ValueError, match="fraction"):
        spare_important_neurons(sig, mods, {}, 1.0)
    with pytest.raises(KeyError, match="no neuron importance"):
        spare_important_neurons(sig, mods, {"other.block": torch.ones(64)}, 0.1)
    with pytest.raises(ValueError, match="importance scores"):
        spare_important_neurons(sig, mods, {mods[0].block: torch.ones(10)}, 0.1)
    with pytest.raises(KeyError, match="module description"):
        spare_important_neurons(sig, mods[:1], {mods[0].block: torch.ones(64)}, 0.1)
    with pytest.raises(ValueError, match="protect must be in"):
        SignatureConfig(protect=1.0)
    with pytest.raises(ValueError, match="protect_samples"):
        SignatureConfig(protect=0.1, protect_samples=0)


def test_clean_neuron_importance_is_wanda_score_of_down_columns(tok, records):
    model = tiny_model("llama", layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    imp = clean_neuron_importance(model, tok, records[:12], max_length=48)
    norms = collect_input_norms(model, tok, records[:12], n_calib=12, max_length=48)
    downs = [cm for cm in find_mlp_modules(model) if cm.role == "in"]
    assert sorted(imp) == sorted(cm.block for cm in downs)
    named = dict(model.named_modules())
    for cm in downs:
        want = norms[cm.weight_name] * named[cm.name].weight.detach().float().norm(dim=0)
        assert torch.allclose(imp[cm.block], want)
        assert imp[cm.block].shape == (cm.n_channels,) and (imp[cm.block] > 0).all()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _config(protect):
    return bdvax.BDVaxConfig(
        vaccination=bdvax.VaccinationConfig(n_variants=2, samples_per_variant=16, epochs=1, batch_size=8,
                                            max_length=48, lr=1e-3),
        signature=bdvax.SignatureConfig(tau=0.3, protect=protect, protect_samples=16),
        neutralize=bdvax.NeutralizeConfig(mode="zero"),
        recovery=bdvax.RecoveryConfig(num_samples=16, steps=0),
        seed=0, precision="32-true")


def test_purify_with_protect_leaves_the_important_neurons_alone(tok, records):
    model = tiny_model("llama", layers=2)
    data = records[:200]
    plain = bdvax.purify(model, tok, clean_data=data, config=_config(0.0), progress=False)
    prot = bdvax.purify(model, tok, clean_data=data, config=_config(0.25), progress=False)
    # Same stage 1, so the same scores; protection only removes channels from the selection.
    for k in plain.signature.scores:
        assert torch.equal(plain.signature.scores[k], prot.signature.scores[k])
        assert not (prot.signature.masks[k] & ~plain.signature.masks[k]).any()
    assert 0 < prot.signature.meta["protect"]["spared"] == plain.signature.n_flagged - prot.signature.n_flagged
    imp = clean_neuron_importance(model, tok, data[:16], max_length=48)
    named_in, named_out = dict(model.named_modules()), dict(prot.model.named_modules())
    for cm in find_mlp_modules(model):
        top = torch.topk(imp[cm.block], 16).indices  # 25 % of 64 neurons
        w_in, w_out = named_in[cm.name].weight, named_out[cm.name].weight
        if cm.role == "in":
            assert torch.equal(w_in[:, top], w_out[:, top]), cm.key
        else:
            assert torch.equal(w_in[top], w_out[top]), cm.key
        flagged = prot.signature.indices(cm.key)
        if len(flagged):  # the channels still flagged were zeroed
            w = w_out[:, flagged] if cm.role == "in" else w_out[flagged]
            assert (w == 0).all()


def test_lora_purification_rejects_protect_before_training(tmp_path):
    from lightning_bdvax.lora import purify_lora

    with pytest.raises(ValueError, match="protect: applies to full-model"):
        purify_lora(tiny_model("llama"), tmp_path / "nowhere", None, [], _config(0.1))


def test_build_signature_needs_importance_when_protecting():
    from lightning_bdvax.pipeline import build_signature
    from lightning_bdvax.signature import SignatureAccumulator

    mods = find_mlp_modules(tiny_model("llama", layers=1))
    acc = SignatureAccumulator(mods)
    acc.add_delta({cm.key: torch.randn(cm.n_channels, 4) for cm in mods})
    with pytest.raises(ValueError, match="protect needs clean instruction records"):
        build_signature(acc, SignatureConfig(tau=0.5, protect=0.1))
    sig = build_signature(acc, SignatureConfig(tau=0.5, protect=0.1),
                          importance=lambda: {cm.block: torch.arange(64.0) for cm in mods})
    assert sig.meta["protect"]["fraction"] == 0.1
    assert not any(sig.masks[cm.key][-6:].any() for cm in mods)  # the 6 highest-importance neurons


def test_build_signature_measures_importance_on_the_first_protect_samples(tok, records):
    """Given the model and clean records, build_signature measures the importance itself, on the
    first ``protect_samples`` records only, exactly as an explicit ``importance`` callable would."""
    from lightning_bdvax.pipeline import build_signature
    from lightning_bdvax.signature import SignatureAccumulator

    model = tiny_model("llama", layers=2)
    mods = find_mlp_modules(model)
    acc = SignatureAccumulator(mods)
    g = torch.Generator().manual_seed(0)
    acc.add_delta({cm.key: torch.randn(cm.n_channels, 4, generator=g) for cm in mods})
    cfg = SignatureConfig(tau=0.5, protect=0.2, protect_samples=4)
    own = build_signature(acc, cfg, model=model, tokenizer=tok, clean=records, max_length=48)
    given = build_signature(acc, cfg, importance=lambda: clean_neuron_importance(model, tok, records[:4],
                                                                                 max_length=48))
    assert own.meta["protect"] == given.meta["protect"] and own.meta["protect"]["spared"] > 0
    assert all(torch.equal(own.masks[k], given.masks[k]) for k in own.masks)
    # More records change which neurons rank highest here, and so which flagged ones are spared.
    wider = build_signature(acc, SignatureConfig(tau=0.5, protect=0.2, protect_samples=40),
                            model=model, tokenizer=tok, clean=records[:40], max_length=48)
    assert any(not torch.equal(own.masks[k], wider.masks[k]) for k in own.masks)
    with pytest.raises(ValueError, match="protect needs clean instruction records"):
        build_signature(acc, cfg, model=model, tokenizer=tok, clean=[])

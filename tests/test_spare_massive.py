"""``signature.spare_massive``: spare the massive-activation neurons from neutralization."""

import pytest
import torch

import lightning_bdvax as bdvax
from lightning_bdvax.arch import find_mlp_modules
from lightning_bdvax.pipeline import SignatureConfig, build_signature, clean_neuron_peaks, threat_model_problems
from lightning_bdvax.signature import Signature, SignatureAccumulator, spare_massive_neurons
from lightning_bdvax.tiny import tiny_model

from helpers import all_flagged_signature as _all_flagged


def test_spare_massive_unflags_the_outlier_neurons_in_every_projection():
    model = tiny_model("llama", layers=2)  # intermediate 64
    mods = find_mlp_modules(model)
    blocks = sorted({cm.block for cm in mods})
    peaks = {b: torch.ones(64) for b in blocks}
    peaks[blocks[0]][[3, 17]] = torch.tensor([150.0, 99.0])  # median 1: 3 is >= 100x, 17 is not
    peaks[blocks[1]][40] = 1000.0
    sig = _all_flagged(mods)
    out = spare_massive_neurons(sig, mods, peaks, 100.0)
    for cm in mods:
        unflagged = (~out.masks[cm.key]).nonzero().flatten().tolist()
        assert unflagged == ([3] if cm.block == blocks[0] else [40]), cm.key  # gate/up rows and down columns
    assert out.meta["spare_massive"] == {"ratio": 100.0, "spared": len(mods),
                                         "neurons": {blocks[0]: [3], blocks[1]: [40]}}
    assert out.scores is sig.scores and all(m.all() for m in sig.masks.values())  # input unchanged
    # A lower ratio spares more; neurons that are not flagged are not counted.
    assert spare_massive_neurons(sig, mods, peaks, 50.0).meta["spare_massive"]["neurons"][blocks[0]] == [3, 17]
    # A block whose median peak is 0 has no scale: nothing in it is spared.
    dead = {blocks[0]: torch.zeros(64), blocks[1]: peaks[blocks[1]]}
    dead[blocks[0]][5] = 7.0
    assert spare_massive_neurons(sig, mods, dead, 2.0).meta["spare_massive"]["neurons"] == {blocks[1]: [40]}
    none = Signature({k: torch.zeros_like(v) for k, v in sig.masks.items()}, sig.scores, {})
    assert spare_massive_neurons(none, mods, peaks, 2.0).meta["spare_massive"] == {"ratio": 2.0, "spared": 0,
                                                                                  "neurons": {}}


def test_spare_massive_argument_errors():
    mods = find_mlp_modules(tiny_model("llama", layers=1))
    sig = _all_flagged(mods)
    for bad in (0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="ratio must be"):
            spare_massive_neurons(sig, mods, {mods[0].block: torch.ones(64)}, bad)
    with pytest.raises(KeyError, match="no neuron peak activations"):
        spare_massive_neurons(sig, mods, {"other.block": torch.ones(64)}, 10.0)
    with pytest.raises(ValueError, match="peak activations for its block"):
        spare_massive_neurons(sig, mods, {mods[0].block: torch.ones(10)}, 10.0)
    for bad in (0.5, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="spare_massive must be 0"):
            SignatureConfig(spare_massive=bad)
    assert SignatureConfig(spare_massive=1.0).spare_massive == 1.0
    assert threat_model_problems(SignatureConfig(spare_massive=10.0), None, lora=True) == [
        "bdvax.signature.spare_massive: applies to full-model purification; set it to 0 for a LoRA adapter"]
    assert threat_model_problems(SignatureConfig(spare_massive=10.0), None, lora=False) == []


def test_clean_neuron_peaks_are_the_largest_down_inputs_over_real_tokens(tok, records):
    from lightning_bdvax.data import make_loader, tokenize_records

    model = tiny_model("llama", layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    peaks = clean_neuron_peaks(model, tok, records[:10], max_length=48, batch_size=4)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    downs = [cm for cm in find_mlp_modules(model) if cm.role == "in"]
    assert sorted(peaks) == sorted(cm.block for cm in downs)
    # Reference: one record at a time (no padding at all), by a hook on the down projection.
    named = dict(model.named_modules())
    want = {cm.block: torch.zeros(cm.n_channels) for cm in downs}
    seen = {}
    hs = [named[cm.name].register_forward_hook(lambda m, i, o, b=cm.block: seen.__setitem__(b, i[0]))
          for cm in downs]
    model.eval()
    with torch.no_grad():
        for batch in make_loader(tokenize_records(tok, records[:10], 48), tok.pad_token_id, 1, False, 0):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            for b in want:
                want[b] = torch.maximum(want[b], seen[b][0].abs().amax(0))
    for h in hs:
        h.remove()
    for b in want:
        assert torch.allclose(peaks[b], want[b], rtol=1e-4, atol=1e-5), b


def test_build_signature_spares_the_massive_neurons_it_measures(tok, records):
    model = tiny_model("llama", layers=2)
    mods = find_mlp_modules(model)
    acc = SignatureAccumulator(mods)
    g = torch.Generator().manual_seed(0)
    acc.add_delta({cm.key: torch.randn(cm.n_channels, 4, generator=g) for cm in mods})
    plain = build_signature(acc, SignatureConfig(tau=0.5))
    cfg = SignatureConfig(tau=0.5, spare_massive=2.0, protect_samples=6)
    sig = build_signature(acc, cfg, model=model, tokenizer=tok, clean=records, max_length=48)
    peaks = clean_neuron_peaks(model, tok, records[:6], max_length=48)
    for cm in mods:
        massive = peaks[cm.block] >= 2.0 * peaks[cm.block].median()
        assert massive.any() and not massive.all()
        assert torch.equal(sig.masks[cm.key], plain.masks[cm.key] & ~massive), cm.key
    assert sig.meta["spare_massive"]["spared"] == plain.n_flagged - sig.n_flagged > 0
    with pytest.raises(ValueError, match="spare_massive needs clean instruction records"):
        build_signature(acc, cfg)


def test_purify_with_spare_massive_keeps_those_neurons_weights(tok, records):
    model = tiny_model("llama", layers=2)
    cfg = bdvax.BDVaxConfig(
        vaccination=bdvax.VaccinationConfig(n_variants=2, samples_per_variant=16, epochs=1, batch_size=8,
                                            max_length=48, lr=1e-3),
        signature=bdvax.SignatureConfig(tau=0.3, spare_massive=2.0, protect_samples=16),
        neutralize=bdvax.NeutralizeConfig(mode="zero"), recovery=bdvax.RecoveryConfig(num_samples=16, steps=0),
        seed=0, precision="32-true")
    out = bdvax.purify(model, tok, clean_data=records[:200], config=cfg, progress=False)
    spared = out.signature.meta["spare_massive"]["neurons"]
    assert spared
    named_in, named_out = dict(model.named_modules()), dict(out.model.named_modules())
    for cm in find_mlp_modules(model):
        idx = torch.tensor(spared.get(cm.block, []), dtype=torch.long)
        w_in, w_out = named_in[cm.name].weight, named_out[cm.name].weight
        if cm.role == "in":
            assert torch.equal(w_in[:, idx], w_out[:, idx]), cm.key
        else:
            assert torch.equal(w_in[idx], w_out[idx]), cm.key

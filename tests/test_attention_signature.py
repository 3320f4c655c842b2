"""``signature.attention``: score and neutralize the attention projections too (LoRA adapters
and full models).

An extension beyond the published method (which scores MLP channels only), for adapters whose
backdoor sits in attention (benchmarks/results/lora_sanity/sanity_refusal_badnet.md).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import PeftModel  # noqa: E402

from lightning_bdvax import lora  # noqa: E402
from lightning_bdvax.arch import (ArchitectureError, channel_module_index, find_attention_modules,  # noqa: E402
                                  find_channel_modules, find_mlp_modules)
from lightning_bdvax.baselines import random_channels_signature  # noqa: E402
from lightning_bdvax.builtin_data import builtin_instructions  # noqa: E402
from lightning_bdvax.pipeline import (BDVaxConfig, SignatureConfig, VaccinationConfig,  # noqa: E402
                                      _fingerprint, purify)
from lightning_bdvax.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from helpers import lora_adapter as _adapter, tiny_lora_config  # noqa: E402

TINY = dict(hidden=64, intermediate=256, layers=2)


def _config() -> BDVaxConfig:
    return tiny_lora_config(signature=SignatureConfig(tau=0.35, attention=True))


def test_attention_banks_of_a_grouped_query_model():
    model = tiny_model("llama", **TINY)  # 4 query heads, 2 key/value heads of 16
    attn = find_attention_modules(model)
    assert [(cm.proj, cm.role, cm.n_channels) for cm in attn if cm.layer == 0] == [
        ("q_proj", "out", 64), ("k_proj", "out", 32), ("v_proj", "out", 32), ("o_proj", "in", 64)]
    assert len(attn) == 8 and all(cm.kind == "attention" and cm.block == cm.key for cm in attn)
    assert all(cm.kind == "mlp" for cm in find_mlp_modules(model))
    both = find_channel_modules(model, attention=True)
    assert both == find_mlp_modules(model) + attn  # MLP first: MLP-only runs see the same order
    assert find_channel_modules(model) == find_mlp_modules(model)
    assert set(channel_module_index(model)) == {cm.key for cm in both}


def test_fused_qkv_attention_is_a_clear_error():
    gpt2 = tiny_model("gpt2", hidden=32, intermediate=48, layers=2)  # one fused c_attn
    assert find_attention_modules(gpt2) == []
    with pytest.raises(ArchitectureError, match="no attention projections were found"):
        find_channel_modules(gpt2, attention=True)


def test_attention_option_is_checked():
    with pytest.raises(ValueError, match="attention must be true or false"):
        SignatureConfig(attention="yes")
    frozen_attention = tiny_lora_config(signature=SignatureConfig(tau=0.35, attention=True),
                                        vaccination={"trainable": "mlp"})
    with pytest.raises(ValueError, match="trainable: mlp keeps frozen"):
        purify(tiny_model("llama", **TINY), tiny_tokenizer(), builtin_instructions(16), frozen_attention)
    from lightning_bdvax.validation import ConfigError, check_config

    recipe = {"model": {"model_path": "m"}, "trainer": {"max_steps": 5},
              "bdvax": {"signature": {"tau": 0.35, "attention": True}}}
    check_config(recipe)  # a full model
    check_config({**recipe, "adapter_path": "adapter"})  # an adapter
    with pytest.raises(ConfigError, match="trainable: mlp keeps frozen"):
        check_config({**recipe, "bdvax": {**recipe["bdvax"], "vaccination": {"trainable": "mlp"}}})


def _attention_slices(model, sig):
    named = dict(model.named_modules())
    out = {}
    for cm in find_attention_modules(model):
        w = named[cm.name].weight
        idx = sig.masks[cm.key].nonzero().flatten()
        out[cm.key] = w[:, idx] if cm.role == "in" else w[idx]
    return out


@pytest.mark.parametrize("mode", ["zero", "reinit"])
def test_full_model_purify_with_attention_neutralizes_attention_channels(mode):
    """A full model under ``signature.attention``: every attention bank selects its own tau,
    and its flagged rows (q/k/v) and columns (o_proj) are neutralized like the MLP's; the input
    model is untouched."""
    from helpers import state_digest
    from lightning_bdvax.pipeline import NeutralizeConfig

    model = tiny_model("llama", **TINY).eval()
    before = state_digest(model)
    cfg = tiny_lora_config(signature=SignatureConfig(tau=0.25, attention=True), neutralize=NeutralizeConfig(mode=mode),
                           recovery={"steps": 0})
    res = purify(model, tiny_tokenizer(), builtin_instructions(64, seed=5), cfg, progress=False)
    assert state_digest(model) == before
    sig = res.signature
    banks = {cm.key: cm.n_channels for cm in find_channel_modules(model, attention=True)}
    assert {k: int(m.sum()) for k, m in sig.masks.items()} == {k: math.ceil(0.25 * c) for k, c in banks.items()}
    slices = _attention_slices(res.model, sig)
    assert len(slices) == 8
    named_in = dict(model.named_modules())
    for key, w in slices.items():
        if mode == "zero":
            assert w.abs().max() == 0, key
        else:  # fresh values, not the suspicious model's
            cm = channel_module_index(model)[key]
            idx = sig.masks[key].nonzero().flatten()
            old = named_in[key].weight[:, idx] if cm.role == "in" else named_in[key].weight[idx]
            assert w.abs().sum() > 0 and not torch.equal(w, old), key
    # unflagged attention channels keep their values (no recovery steps)
    for cm in find_attention_modules(model):
        keep = (~sig.masks[cm.key]).nonzero().flatten()
        w_in, w_out = named_in[cm.key].weight, dict(res.model.named_modules())[cm.key].weight
        sel = (lambda w: w[:, keep]) if cm.role == "in" else (lambda w: w[keep])
        assert torch.equal(sel(w_in), sel(w_out)), cm.key


def test_full_model_attention_channels_stay_zero_under_a_frozen_recovery():
    cfg = tiny_lora_config(signature=SignatureConfig(tau=0.25, attention=True), recovery={"scope": "unflagged"})
    from lightning_bdvax.pipeline import NeutralizeConfig

    cfg.neutralize = NeutralizeConfig(mode="zero")
    model = tiny_model("llama", **TINY).eval()
    res = purify(model, tiny_tokenizer(), builtin_instructions(64, seed=5), cfg, progress=False)
    slices = _attention_slices(res.model, res.signature)
    assert slices and all(w.abs().max() == 0 for w in slices.values())
    cm = find_attention_modules(model)[0]  # and the rest of the attention trained
    assert not torch.equal(dict(model.named_modules())[cm.key].weight, dict(res.model.named_modules())[cm.key].weight)


def test_attention_changes_the_stage1_fingerprint_and_mlp_only_keeps_it():
    model = tiny_model("llama", **TINY)
    vac, recs = VaccinationConfig(), builtin_instructions(8)
    plain = _fingerprint(vac, 0, recs, model)
    assert _fingerprint(vac, 0, recs, model, find_mlp_modules(model)) == plain  # saved MLP-only runs resume
    assert _fingerprint(vac, 0, recs, model, find_channel_modules(model, True)) != plain


def test_purify_lora_with_attention_zeroes_attention_slices(tmp_path):
    base = tiny_model("llama", **TINY).eval()
    _adapter(copy.deepcopy(base)).save_pretrained(tmp_path / "adapter")
    tok = tiny_tokenizer()
    res = lora.purify_lora(base, tmp_path / "adapter", tok, builtin_instructions(64, seed=5), _config(),
                           output_dir=tmp_path / "out", progress=False)
    sig = res.signature
    attn = {cm.key: cm for cm in find_attention_modules(res.model)}
    sizes = {**{cm.key: cm.n_channels for cm in find_mlp_modules(res.model)},
             **{k: cm.n_channels for k, cm in attn.items()}}
    assert set(sig.masks) == set(sizes)  # 6 MLP + 8 attention banks, all adapted
    assert {k: int(m.sum()) for k, m in sig.masks.items()} == {k: math.ceil(0.35 * c) for k, c in sizes.items()}
    assert res.report["adapter"]["attention_modules"] == 8 and res.report["adapter"]["mlp_modules"] == 6
    named = dict(res.model.named_modules())
    for key, cm in attn.items():
        layer = named[key]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        idx = sig.masks[key].nonzero().flatten()
        keep = (~sig.masks[key]).nonzero().flatten()
        if cm.role == "out":  # q/k/v: output rows of lora_B
            assert b[idx].abs().max() == 0 and b[keep].abs().sum() > 0
        else:  # o_proj: input columns of lora_A
            assert a[:, idx].abs().max() == 0 and a[:, keep].abs().sum() > 0
        delta = layer.get_delta_weight("default")
        rows = delta[idx] if cm.role == "out" else delta[:, idx]
        assert rows.abs().max() == 0  # the effective update of a flagged channel is zero after recovery
    assert lora.flagged_update_max(res.model, sig) == 0.0
    # the saved adapter reloads with identical outputs
    x = torch.randint(3, 1024, (2, 12), generator=torch.Generator().manual_seed(1))
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out"))
    torch.testing.assert_close(reloaded(input_ids=x).logits, res.model(input_ids=x).logits, rtol=0, atol=0)


def test_random_control_matches_an_attention_signature(tmp_path):
    base = tiny_model("llama", **TINY).eval()
    model = _adapter(copy.deepcopy(base))
    keys = [cm.key for cm in find_channel_modules(model, True)]
    g = torch.Generator().manual_seed(0)
    like_masks = {k: torch.rand(channel_module_index(model)[k].n_channels, generator=g) < 0.3 for k in keys}
    from lightning_bdvax.signature import Signature

    like = Signature(like_masks, {k: m.float() for k, m in like_masks.items()}, {"tau": 0.3})
    rand = random_channels_signature(model, like=like, seed=1)
    assert {k: int(m.sum()) for k, m in rand.masks.items()} == {k: int(m.sum()) for k, m in like_masks.items()}
    assert any(not torch.equal(rand.masks[k], like_masks[k]) for k in keys)
    masks = lora.zero_lora_channels_(model, rand)
    assert len(masks) == len(keys)  # one masked factor per bank: lora_B for out banks, lora_A for o/down
    assert lora.flagged_update_max(model, rand) == 0.0


def test_random_control_by_fraction_draws_attention_banks_and_purify_lora_takes_it(tmp_path):
    base = tiny_model("llama", **TINY).eval()
    _adapter(copy.deepcopy(base)).save_pretrained(tmp_path / "adapter")
    model = _adapter(copy.deepcopy(base))
    sizes = {cm.key: cm.n_channels for cm in find_channel_modules(model, True)}
    mlp_only = random_channels_signature(model, n_per_module=0.35, seed=3)
    assert set(mlp_only.masks) == {cm.key for cm in find_mlp_modules(model)}  # the default stays MLP only
    rand = random_channels_signature(model, n_per_module=0.35, attention=True, seed=3)
    assert {k: int(m.sum()) for k, m in rand.masks.items()} == {k: math.ceil(0.35 * c) for k, c in sizes.items()}
    assert rand.meta["attention"] is True
    # the attention banks' draws differ from one seed to another, the counts do not
    other = random_channels_signature(model, n_per_module=0.35, attention=True, seed=4)
    attn_keys = [cm.key for cm in find_attention_modules(model)]
    assert any(not torch.equal(other.masks[k], rand.masks[k]) for k in attn_keys)
    # an MLP-only control is refused by an attention run; the full draw is taken, and held at zero
    with pytest.raises(ValueError, match="no mask for the adapted module"):
        lora.purify_lora(base, tmp_path / "adapter", tiny_tokenizer(), builtin_instructions(64, seed=5), _config(),
                         signature=mlp_only, progress=False)
    res = lora.purify_lora(base, tmp_path / "adapter", tiny_tokenizer(), builtin_instructions(64, seed=5), _config(),
                           signature=rand, progress=False)
    assert set(res.signature.masks) == set(sizes)
    assert all(torch.equal(res.signature.masks[k], rand.masks[k]) for k in sizes)
    assert lora.flagged_update_max(res.model, rand) == 0.0


def test_full_model_random_control_draws_attention_banks_when_asked():
    from lightning_bdvax.baselines import run_defense
    from lightning_bdvax.pipeline import RecoveryConfig

    banks = find_channel_modules(tiny_model("llama", **TINY), attention=True)
    mlp_only = find_mlp_modules(tiny_model("llama", **TINY))
    for attention, expected in ((True, banks), (False, mlp_only)):
        model = tiny_model("llama", **TINY)
        named = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
        info = run_defense("random", model, tiny_tokenizer(), builtin_instructions(16), RecoveryConfig(steps=0),
                           tau=0.25, attention=attention, seed=3)
        assert info["n_flagged"] == sum(math.ceil(0.25 * cm.n_channels) for cm in expected)
        # zeroed attention channels exist exactly when asked for
        changed = {k for k, w in named.items() if not torch.equal(w, dict(model.named_modules())[k].weight)}
        assert any("self_attn" in k for k in changed) == attention


def test_an_attention_signature_needs_a_stage1_that_tracked_attention():
    """Every entry point passes the attention banks to stage 1; one that forgets (the MLP-only
    default) is refused when the signature is built instead of silently flagging the MLP only."""
    from lightning_bdvax.pipeline import build_signature, run_vaccination

    model, tok = tiny_model("llama", **TINY), tiny_tokenizer()
    cfg = tiny_lora_config().vaccination
    mlp_only = run_vaccination(model, tok, builtin_instructions(16), cfg, precision="32-true", progress=False)
    with pytest.raises(ValueError, match="stage 1 tracked no attention projection"):
        build_signature(mlp_only, SignatureConfig(tau=0.25, attention=True))
    both = run_vaccination(model, tok, builtin_instructions(16), cfg, precision="32-true", progress=False,
                           modules=find_channel_modules(model, attention=True))
    sig = build_signature(both, SignatureConfig(tau=0.25, attention=True))
    assert {cm.key for cm in find_attention_modules(model)} <= set(sig.masks)

"""``signature.attention``: score and zero the attention projections of a LoRA adapter too.

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


def test_attention_option_is_checked_and_rejected_for_full_models():
    with pytest.raises(ValueError, match="attention must be true or false"):
        SignatureConfig(attention="yes")
    with pytest.raises(ValueError, match="attention: true applies to LoRA adapters only"):
        purify(tiny_model("llama", **TINY), tiny_tokenizer(), builtin_instructions(16), _config())
    from lightning_bdvax.validation import ConfigError, check_config

    recipe = {"model": {"model_path": "m"}, "trainer": {"max_steps": 5},
              "bdvax": {"signature": {"tau": 0.35, "attention": True}}}
    with pytest.raises(ConfigError, match="attention: true applies to LoRA adapters only"):
        check_config(recipe)
    check_config({**recipe, "adapter_path": "adapter"})  # accepted with an adapter


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

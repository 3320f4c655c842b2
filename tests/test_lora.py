"""The LoRA threat model (lightning_bdvax.lora), on tiny models.

Measured on the tiny end-to-end case (``tiny_lora_case``: a 2-layer Llama, hidden 64, MLP 256,
pre-trained on clean built-in data, then a LoRA r=8/α=16 all-linear BadMagic → "You are stupid!"
backdoor), 32 triggered test prompts, 12 new tokens; "prefix" = response starts with "You":

========  =====================  ======================  ==============================================
init seed suspicious ASR/prefix  signature τ=0.5, zero    BD-VAX (N=4, τ=0.5, zero+mask, 20 LM steps)
========  =====================  ======================  ==============================================
0         0.75 / 1.00            prefix 0.13 (random 1.0) ASR 0.00, prefix 0.06, ppl 12.59 → 11.02
1         0.00 / 1.00            prefix 0.03 (random 0.97) ASR 0.00, prefix 0.00
2         0.00 / 1.00            prefix 1.00 (random 1.0) ASR 0.00, prefix 0.94  (not removed)
========  =====================  ======================  ==============================================

("init seed" is the tiny base's initialisation; data, planting and vaccination use seed 0.)
So at tiny scale the LoRA backdoor *is* carried by the adapter's MLP update (zeroing every MLP
``lora_B`` removes it in all three seeds) and the signature localises it far better than random
channels in 2 of 3 base seeds; in the third the planted backdoor is spread so that half the
channels of every module are not enough. Seeds 1 and 2 plant only the "You are are…" prefix, so
the keyword ASR says nothing there; the end-to-end test uses seed 0, where it does. Recovery with
``objective="distill"`` (matching the suspicious adapter on clean inputs) re-installed the
backdoor through the unmasked entries (prefix back to ~1.0 in all seeds): LoRA recipes use "lm".
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from lightning_bdvax import lora  # noqa: E402
from lightning_bdvax.arch import channel_rows, find_mlp_modules  # noqa: E402
from lightning_bdvax.builtin_data import builtin_instructions  # noqa: E402
from lightning_bdvax.lora import LoRAAdapterError  # noqa: E402
from lightning_bdvax.models import choose_attention, file_digests, load_causal_lm  # noqa: E402
from lightning_bdvax.pipeline import (BDVaxConfig, NeutralizeConfig, RecoveryConfig, SignatureConfig,  # noqa: E402
                                      VaccinationConfig, load_bdvax_config, run_vaccination)
from lightning_bdvax.signature import Signature  # noqa: E402
from lightning_bdvax.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from helpers import lora_adapter as _adapter, tiny_lora_config as _tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden=64, intermediate=256, layers=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two shared cores: OpenMP spin-waiting across busy cores makes a tiny step ~50x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _base(family: str = "llama", seed: int = 0, **kw):
    return tiny_model(family, seed=seed, **(kw or TINY)).eval()


def _random_signature(model, frac: float = 0.25, seed: int = 0) -> Signature:
    g = torch.Generator().manual_seed(seed)
    masks, scores = {}, {}
    for cm in lora.lora_mlp_modules(model):
        s = torch.rand(cm.n_channels, generator=g)
        masks[cm.key] = s < frac
        scores[cm.key] = s
    return Signature(masks, scores, {})


def _ids(seed: int = 0):
    return torch.randint(3, 1024, (2, 12), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# effective update, channel zeroing, re-growth
# ------------------------------------------------------------------------------------------------


def test_channel_state_is_scaled_BA_rows():
    m = _adapter(_base())
    mods = find_mlp_modules(m)
    state = lora.lora_channel_state(m, mods)
    named = dict(m.named_modules())
    for cm in mods:
        layer = named[cm.key]
        want = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
        assert layer.scaling["default"] == 2.0  # alpha 16 / r 8
        torch.testing.assert_close(state[cm.key], channel_rows(want, cm).float())
    assert set(state) == {cm.key for cm in mods}


def test_channel_state_of_untargeted_module_is_constant_zero():
    m = _adapter(_base(), targets=["down_proj", "q_proj"])
    mods = find_mlp_modules(m)
    state = lora.lora_channel_state(m, mods)
    assert [cm.proj for cm in lora.lora_mlp_modules(m)] == ["down_proj", "down_proj"]
    for cm in mods:
        if cm.proj != "down_proj":
            assert state[cm.key].shape == (cm.n_channels, 1) and not state[cm.key].any()


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_zeroing_touches_exactly_the_flagged_channels(family):
    kw = {} if family == "llama" else dict(hidden=32, intermediate=48, layers=2)
    targets = {"llama": "all-linear", "phi3": ["gate_up_proj", "down_proj", "qkv_proj"],
               "gpt2": ["c_fc", "c_proj", "c_attn"]}[family]
    m = _adapter(_base(family, **kw), targets=targets)
    sig = _random_signature(m, 0.3)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    mods = find_mlp_modules(m)
    eff_before = lora.lora_channel_state(m, mods)
    masks = lora.zero_lora_channels_(m, sig)

    after = dict(m.named_parameters())
    # Every parameter entry outside the returned masks is bit-identical; inside, it is zero.
    for n, p in after.items():
        mask = masks.get(n)
        if mask is None:
            assert torch.equal(p, before[n]), n
        else:
            assert not p[mask].any(), n
            assert torch.equal(p[~mask], before[n][~mask]), n
    # The masks are exactly the flagged slices: rows of lora_B (out), columns of lora_A (in).
    named = dict(m.named_modules())
    pname = {id(p): n for n, p in m.named_parameters()}
    for cm in lora.lora_mlp_modules(m):
        layer = named[cm.key]
        idx = sig.indices(cm.key)
        if cm.role == "out":
            w = layer.lora_B["default"].weight
            want = torch.zeros_like(w, dtype=torch.bool)
            for k in range(cm.fused):
                want[idx + k * cm.n_channels] = True
        else:
            w = layer.lora_A["default"].weight
            want = torch.zeros_like(w, dtype=torch.bool)
            want[:, idx] = True
        assert torch.equal(masks[pname[id(w)]], want), cm.key
    assert len(masks) == len(lora.lora_mlp_modules(m))
    # Effective update: flagged channel rows are zero, every other channel row is unchanged.
    eff_after = lora.lora_channel_state(m, mods)
    for cm in mods:
        flagged = sig.masks[cm.key]
        assert not eff_after[cm.key][flagged].any(), cm.key
        assert torch.equal(eff_after[cm.key][~flagged], eff_before[cm.key][~flagged]), cm.key
        assert eff_before[cm.key][flagged].abs().sum() > 0  # there was something to remove
    assert lora.flagged_update_max(m, sig) == 0.0
    # Base weights untouched.
    for cm in mods:
        bn = cm.key + ".base_layer.weight"
        assert torch.equal(after[bn], before[bn])


def test_zeroing_rejects_wrong_signature():
    m = _adapter(_base())
    key = lora.lora_mlp_modules(m)[0].key
    with pytest.raises(ValueError, match="channels"):
        lora.zero_lora_channels_(m, Signature({key: torch.zeros(7, dtype=torch.bool)}, {}, {}))
    with pytest.raises(ValueError, match="lacks"):
        lora.zero_lora_channels_(m, Signature({"model.layers.9.mlp.up_proj": torch.ones(256, dtype=torch.bool)}, {}, {}))


def _recovery_fit(model, masks, weight_decay: float = 0.0, steps: int = 6):
    from lightning_bdvax.data import make_loader, tokenize_records
    from lightning_bdvax.modules import RecoveryModule
    from lightning_bdvax.pipeline import make_trainer

    tok = tiny_tokenizer()
    ex = tokenize_records(tok, builtin_instructions(32, seed=3), 48)
    module = RecoveryModule(model, objective="lm", grad_masks=masks, lr=1e-2, weight_decay=weight_decay)
    make_trainer(steps, progress=False, precision="32-true", accelerator="cpu").fit(
        module, train_dataloaders=make_loader(ex, tok.pad_token_id, 8, True, 0))


def test_zeroed_channels_regrow_without_masks_and_stay_zero_with_them():
    """The re-growth decision: zeroing one slice is not enough, gradient masks keep it at zero."""
    base = _base()
    m = _adapter(copy.deepcopy(base))
    m.train()
    sig = _random_signature(m, 0.3)

    unmasked = copy.deepcopy(m)
    lora.zero_lora_channels_(unmasked, sig)
    _recovery_fit(unmasked, None)
    assert lora.flagged_update_max(unmasked, sig) > 1e-4  # re-grew

    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    masks = lora.zero_lora_channels_(m, sig)
    zeroed = {n: p.detach().clone() for n, p in m.named_parameters()}
    _recovery_fit(m, masks)
    assert lora.flagged_update_max(m, sig) == 0.0
    params = dict(m.named_parameters())
    for n, mask in masks.items():
        assert not params[n][mask].any(), n  # exactly zero
        assert not torch.equal(params[n][~mask], zeroed[n][~mask]), n  # the rest did train
    assert sum(not torch.equal(params[n], before[n]) for n in params if "lora_" in n) > len(masks)

    # Decoupled weight decay keeps a zero at zero too.
    wd = _adapter(copy.deepcopy(base))
    wd.train()
    masks = lora.zero_lora_channels_(wd, sig)
    _recovery_fit(wd, masks, weight_decay=0.1)
    assert lora.flagged_update_max(wd, sig) == 0.0


# ------------------------------------------------------------------------------------------------
# loading, errors
# ------------------------------------------------------------------------------------------------


def test_load_lora_model_from_base_dir_and_module(tmp_path):
    base = _base()
    base.set_attn_implementation(choose_attention("auto"))  # the kernel a loaded base gets: exact equality
    base.save_pretrained(tmp_path / "base")
    m = _adapter(copy.deepcopy(base))
    m.save_pretrained(tmp_path / "adapter")
    digests = file_digests(tmp_path / "adapter")
    x = _ids()
    want = m(input_ids=x).logits
    for src in (str(tmp_path / "base"), copy.deepcopy(base)):
        loaded = lora.load_lora_model(src, tmp_path / "adapter")
        assert isinstance(loaded, PeftModel)
        assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_A" in n)
        assert not any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" not in n)
        torch.testing.assert_close(loaded(input_ids=x).logits, want, rtol=0, atol=0)
    frozen = lora.load_lora_model(copy.deepcopy(base), tmp_path / "adapter", is_trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert file_digests(tmp_path / "adapter") == digests


def test_adapter_without_mlp_target_is_a_clear_error(tmp_path):
    _adapter(_base(), targets=["q_proj", "v_proj"]).save_pretrained(tmp_path / "attn")
    with pytest.raises(LoRAAdapterError, match=r"targets no MLP module .*q_proj.*v_proj"):
        lora.load_lora_model(_base(), tmp_path / "attn")


def test_adapter_for_another_base_is_a_clear_error(tmp_path):
    _adapter(_base()).save_pretrained(tmp_path / "a")
    with pytest.raises(LoRAAdapterError, match=r"does not match the base model: .*lora_B \(64, 8\), the base layer is 256 -> 32"):
        lora.load_lora_model(_base(hidden=32, intermediate=256, layers=2), tmp_path / "a")
    with pytest.raises(LoRAAdapterError, match=r"does not match the base model: it adapts 'model.layers.1"):
        lora.load_lora_model(_base(hidden=64, intermediate=256, layers=1), tmp_path / "a")
    with pytest.raises(LoRAAdapterError, match="does not match the base model"):
        lora.load_lora_model(_base(hidden=64, intermediate=128, layers=2), tmp_path / "a")


def test_unusable_adapter_directories_are_clear_errors(tmp_path):
    with pytest.raises(LoRAAdapterError, match="does not exist"):
        lora.load_lora_model(_base(), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoRAAdapterError, match="no adapter_config.json"):
        lora.load_lora_model(_base(), tmp_path / "empty")
    _adapter(_base()).save_pretrained(tmp_path / "pkl")
    (tmp_path / "pkl" / "adapter_model.safetensors").rename(tmp_path / "pkl" / "adapter_model.bin")
    with pytest.raises(LoRAAdapterError, match="pickle"):
        lora.load_lora_model(_base(), tmp_path / "pkl")
    _adapter(_base()).save_pretrained(tmp_path / "dora")
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(LoRAAdapterError, match="DoRA"):
        lora.load_lora_model(_base(), tmp_path / "dora")
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(LoRAAdapterError, match="only LoRA"):
        lora.load_lora_model(_base(), tmp_path / "ia3")
    m = _adapter(_base())
    with pytest.raises(LoRAAdapterError, match="already a peft model"):
        lora.load_lora_model(m, tmp_path / "dora")


# ------------------------------------------------------------------------------------------------
# purify_lora: outputs
# ------------------------------------------------------------------------------------------------


def test_purify_lora_saves_reloadable_adapter_and_merged_model(tmp_path):
    base = _base()
    _adapter(copy.deepcopy(base)).save_pretrained(tmp_path / "adapter")
    digests = file_digests(tmp_path / "adapter")
    tok = tiny_tokenizer()
    res = lora.purify_lora(base, tmp_path / "adapter", tok, builtin_instructions(64, seed=5), _tiny_config(),
                           output_dir=tmp_path / "out", merge=True, work_dir=tmp_path / "work", progress=False)
    out = tmp_path / "out"
    assert file_digests(tmp_path / "adapter") == digests  # input untouched
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "signature" / "signature.json").is_file()
    report = json.loads((out / "bdvax_report.json").read_text())
    assert report["threat_model"] == "lora" and report["neutralize"]["flagged_max_after_recovery"] == 0.0
    md = (out / "report.md").read_text()  # the run report, as for a full-model run
    assert "report_signature_heatmap.png" in md and (out / "report_signature_heatmap.png").is_file()
    # signature: τ = 0.35 of each adapted MLP projection
    assert res.signature.n_flagged == sum(math.ceil(0.35 * 256) for _ in range(6))
    assert res.signature.n_channels == 6 * 256

    x = _ids(1)
    want = res.model(input_ids=x).logits
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out))
    torch.testing.assert_close(reloaded(input_ids=x).logits, want, rtol=0, atol=0)
    merged = load_causal_lm(out / "merged")
    torch.testing.assert_close(merged(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # the purified adapter really differs from the suspicious one, and its flagged channels are dead
    suspicious = lora.load_lora_model(copy.deepcopy(base), tmp_path / "adapter")
    assert not torch.equal(suspicious(input_ids=x).logits, want)
    assert lora.flagged_update_max(lora.load_lora_model(copy.deepcopy(base), out), res.signature) == 0.0
    # the caller's base is untouched (no LoRA injected into it)
    assert not any("lora" in n for n, _ in base.named_modules())


def test_a_purified_adapter_can_be_purified_again(tmp_path):
    """A second round (benchmarks' --rounds 2, or the command run on its own output): the purified
    output directory is itself a suspicious-adapter input, read only, and round 2 holds its own
    flagged channels at zero."""
    base = _base()
    _adapter(copy.deepcopy(base)).save_pretrained(tmp_path / "adapter")
    tok, data = tiny_tokenizer(), builtin_instructions(64, seed=5)
    lora.purify_lora(base, tmp_path / "adapter", tok, data, _tiny_config(), output_dir=tmp_path / "round1",
                     progress=False)
    digests = file_digests(tmp_path / "round1")
    res = lora.purify_lora(base, tmp_path / "round1", tok, data, _tiny_config(), output_dir=tmp_path / "round2",
                           work_dir=tmp_path / "work", progress=False)
    assert file_digests(tmp_path / "round1") == digests  # round 1's output is round 2's read-only input
    report = json.loads((tmp_path / "round2" / "bdvax_report.json").read_text())
    assert report["adapter"]["path"] == str(tmp_path / "round1")
    again = lora.load_lora_model(copy.deepcopy(base), tmp_path / "round2")
    assert lora.flagged_update_max(again, res.signature) == 0.0
    round1 = lora.load_lora_model(copy.deepcopy(base), tmp_path / "round1")
    x = _ids(2)
    assert not torch.equal(round1(input_ids=x).logits, again(input_ids=x).logits)


def test_purify_lora_under_bf16_master(tmp_path):
    """precision="bf16-master" (what "auto" gives on a bf16 CPU) on an adapter: the frozen base is
    only cast for the fits; the saved adapter and the caller's base stay fp32, and the flagged
    channels stay zero through the recovery."""
    base = _base()
    _adapter(copy.deepcopy(base)).save_pretrained(tmp_path / "adapter")
    res = lora.purify_lora(base, tmp_path / "adapter", tiny_tokenizer(), builtin_instructions(64, seed=5),
                           _tiny_config(precision="bf16-master"), output_dir=tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "bdvax_report.json").read_text())["precision"] == "bf16-master"
    assert {p.dtype for p in res.model.parameters()} == {torch.float32}
    assert {p.dtype for p in base.parameters()} == {torch.float32}
    reloaded = lora.load_lora_model(copy.deepcopy(base), tmp_path / "out")
    assert lora.flagged_update_max(reloaded, res.signature) == 0.0
    suspicious = lora.load_lora_model(copy.deepcopy(base), tmp_path / "adapter")
    x = _ids(2)
    assert not torch.equal(suspicious(input_ids=x).logits, reloaded(input_ids=x).logits)


def test_purify_lora_with_a_given_signature_skips_stage1(tmp_path):
    """A given signature (here the random-channel control) is neutralized as is: no variants are
    trained, exactly its channels are zeroed and stay zero through recovery."""
    from lightning_bdvax.baselines import random_channels_signature

    base = _base()
    _adapter(copy.deepcopy(base)).save_pretrained(tmp_path / "adapter")
    tok = tiny_tokenizer()
    probe = lora.load_lora_model(copy.deepcopy(base), tmp_path / "adapter")
    rand = random_channels_signature(probe, n_per_module=0.5, seed=3)
    adapted = [cm.key for cm in lora.lora_mlp_modules(probe)]
    assert set(adapted) <= set(rand.masks)
    res = lora.purify_lora(base, tmp_path / "adapter", tok, builtin_instructions(64, seed=5), _tiny_config(),
                           work_dir=tmp_path / "work", progress=False, signature=rand)
    assert res.report["signature_given"] is True and "vaccination_s" not in res.report["timings"]
    assert not (tmp_path / "work").exists()  # stage 1 never ran
    assert set(res.signature.masks) == set(adapted)
    assert all(torch.equal(res.signature.masks[k], rand.masks[k]) for k in adapted)
    assert res.signature.n_flagged == sum(int(rand.masks[k].sum()) for k in adapted) > 0
    assert lora.flagged_update_max(res.model, res.signature) == 0.0
    partial_sig = lora.restrict_signature(rand, adapted[:1])
    with pytest.raises(ValueError, match="no mask for the adapted module"):
        lora.purify_lora(base, tmp_path / "adapter", tok, builtin_instructions(64, seed=5), _tiny_config(),
                         progress=False, signature=partial_sig)


def test_purify_lora_argument_checks(tmp_path):
    base = _base()
    _adapter(copy.deepcopy(base)).save_pretrained(tmp_path / "adapter")
    tok = tiny_tokenizer()
    data = builtin_instructions(64, seed=5)
    with pytest.raises(ValueError, match="overlaps the input adapter"):
        lora.purify_lora(base, tmp_path / "adapter", tok, data, _tiny_config(), output_dir=tmp_path / "adapter",
                         overwrite=True)
    with pytest.raises(ValueError, match="neutralize.mode: a LoRA adapter needs 'zero'"):
        lora.purify_lora(base, tmp_path / "adapter", tok, data,
                         BDVaxConfig(neutralize=NeutralizeConfig(mode="reinit")))
    with pytest.raises(ValueError, match="merge=True needs an output_dir"):
        lora.purify_lora(base, tmp_path / "adapter", tok, data, _tiny_config(), merge=True)
    with pytest.raises(ValueError, match="pass the tokenizer"):
        lora.purify_lora(base, tmp_path / "adapter", None, data, _tiny_config())
    with pytest.raises(TypeError, match="attack must be an AttackData"):
        lora.plant_lora_backdoor(_base(), tok, attack={})
    with pytest.raises(TypeError, match="plain"):
        lora.plant_lora_backdoor(_adapter(_base()), tok, attack={})


def test_vaccination_on_adapter_trains_only_the_adapter():
    base = _base()
    m = _adapter(copy.deepcopy(base))
    m.train()
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    acc = run_vaccination(m, tiny_tokenizer(), builtin_instructions(16, seed=5), _tiny_config().vaccination,
                          precision="32-true", progress=False, state_fn=lora.lora_channel_state)
    assert acc.n == 2
    for k, cm in acc.modules.items():
        assert acc.norm_sum[k].shape == (cm.n_channels,) and acc.norm_sum[k].sum() > 0
    # run_vaccination restores the starting adapter
    for n, p in m.named_parameters():
        assert torch.equal(p, start[n]), n


# ------------------------------------------------------------------------------------------------
# recipes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_lora.yaml", "smollm2_lora.yaml", "smollm2_lora_published.yaml"])
def test_lora_recipes_parse(name):
    import yaml

    path = ROOT / "recipes" / name
    doc = yaml.safe_load(path.read_text())
    for key in ("model", "data", "trainer", "clean_data", "output_dir", "bdvax", "adapter_path", "merge"):
        assert key in doc, key
    cfg = load_bdvax_config(path)
    assert cfg.neutralize.mode == "zero"
    assert doc["model"]["objective"] == "lm"  # distillation from the suspicious adapter re-installs it
    assert 0.3 <= cfg.signature.tau <= 0.5
    if name.startswith("smollm2"):
        # auto: a pinned bf16 precision is emulated on a CPU without bf16 (14x slower there)
        assert doc["trainer"]["precision"] is None
    # the default scores attention too at tau 0.5; the published setting is MLP only at 0.35
    expected = {"smollm2_lora.yaml": (0.5, True), "smollm2_lora_published.yaml": (0.35, False)}
    if name in expected:
        assert (cfg.signature.tau, cfg.signature.attention) == expected[name]


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------


def test_tiny_lora_backdoor_end_to_end(tmp_path, record_property):
    """Plant a LoRA backdoor on a clean tiny base, purify the adapter, measure honestly."""
    from lightning_bdvax.evaluate import evaluate_backdoor

    case = lora.tiny_lora_case(tmp_path / "case", seed=0)
    assert isinstance(case.model, PeftModel)
    pcfg = case.model.peft_config["default"]
    assert (pcfg.r, pcfg.lora_alpha) == (8, 16)
    adapted = {n.rsplit(".", 1)[-1] for n, mod in case.model.named_modules() if hasattr(mod, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    def ev(model):
        r = evaluate_backdoor(model, case.tokenizer, case.attack.test_poison, case.attack.triggers,
                              task="negsentiment", target=case.attack.target, heldout=case.heldout,
                              max_new_tokens=12, batch_size=32)
        return {k: round(r[k], 4) for k in ("asr", "ftr", "prefix", "prefix_clean", "consistency", "ppl")}

    base_m, sus = ev(case.base), ev(case.model)
    assert base_m["asr"] == 0 and base_m["prefix"] == 0
    assert sus["asr"] >= 0.5 and sus["prefix"] >= 0.9 and sus["ftr"] == 0  # a working, stealthy backdoor

    config = BDVaxConfig(
        vaccination=VaccinationConfig(n_variants=4, samples_per_variant=32, epochs=3.0, lr=3e-3, batch_size=16,
                                      max_length=64),
        signature=SignatureConfig(tau=0.5),
        recovery=RecoveryConfig(num_samples=64, steps=20, lr=1e-3, batch_size=16, max_length=64, objective="lm"),
        precision="32-true")
    clean = builtin_instructions(1200, seed=1)[432:600] + builtin_instructions(600, seed=7)
    res = lora.purify_lora(case.base, case.adapter_dir, case.tokenizer, clean, config, progress=False)
    sig = res.signature
    assert sig.n_flagged == 6 * 128 and sig.n_channels == 6 * 256

    # The signature, not the fraction zeroed, is what removes it: compare with random channels.
    zero_sig = lora.load_lora_model(copy.deepcopy(case.base), case.adapter_dir)
    lora.zero_lora_channels_(zero_sig, sig)
    g = torch.Generator().manual_seed(0)
    rand = Signature({k: torch.zeros_like(m).index_fill_(0, torch.randperm(m.numel(), generator=g)[:int(m.sum())], True)
                      for k, m in sig.masks.items()}, sig.scores, {})
    zero_rand = lora.load_lora_model(copy.deepcopy(case.base), case.adapter_dir)
    lora.zero_lora_channels_(zero_rand, rand)
    z_sig, z_rand, after = ev(zero_sig), ev(zero_rand), ev(res.model)
    numbers = {"base": base_m, "suspicious": sus, "zero_signature": z_sig, "zero_random": z_rand, "purified": after}
    record_property("tiny_lora_e2e", json.dumps(numbers))
    print(json.dumps(numbers, indent=1))

    # Measured over config seeds 0-3 (both with batches padded to 8 and unpadded): zeroing the
    # signature alone leaves prefix 0.16-0.81, random channels 1.0; after recovery prefix
    # 0.03-0.5 and ASR 0 in every run. On this tiny case the margin varies that much with the
    # seed; the assertions below hold for seed 0 with room to spare, not for every seed.
    assert z_rand["prefix"] >= 0.8  # random channels leave the backdoor in place
    assert z_sig["prefix"] <= z_rand["prefix"] - 0.3
    assert after["asr"] <= 0.05 and after["ftr"] <= 0.05
    assert after["prefix"] <= 0.25
    assert after["ppl"] <= 1.10 * sus["ppl"]
    assert res.report["neutralize"]["flagged_max_after_recovery"] == 0.0


def test_lora_bias_is_zeroed_and_masked_with_its_channel():
    torch.manual_seed(0)
    m = get_peft_model(_base("gpt2", hidden=32, intermediate=48, layers=2),
                       LoraConfig(r=4, lora_alpha=8, target_modules=["c_fc", "c_proj"], lora_bias=True,
                                  fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    mods = find_mlp_modules(m)
    state = lora.lora_channel_state(m, mods)
    out = [cm for cm in mods if cm.role == "out"][0]
    assert state[out.key].shape == (48, 32 + 1)  # weight row + bias entry per channel
    sig = _random_signature(m, 0.3)
    masks = lora.zero_lora_channels_(m, sig)
    bias_name = next(n for n in masks if n.endswith("lora_B.default.bias"))
    layer = dict(m.named_modules())[out.key]
    assert torch.equal(masks[out.key + ".lora_B.default.bias"], sig.masks[out.key])
    assert not layer.lora_B["default"].bias[sig.masks[out.key]].any()
    assert layer.lora_B["default"].bias[~sig.masks[out.key]].abs().sum() > 0
    assert bias_name and lora.flagged_update_max(m, sig) == 0.0

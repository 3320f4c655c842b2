"""signature.clean_normalize: each channel's Δ magnitude is discounted by how far the clean
counterpart fits move it, relative to its module's median channel."""

import logging

import pytest
import torch

from lightning_bdvax.arch import ChannelModule
from lightning_bdvax.signature import Signature, SignatureAccumulator

C, D = 16, 8


def _modules():
    return [ChannelModule(f"m.{n}", "m", 0, n, role, C) for n, role in (("a", "out"), ("b", "in"))]


def _variant(g, hot_clean=0, backdoor=1):
    """One variant's (backdoor update, clean update): every channel moves by ~1 in both fits;
    channel ``hot_clean`` moves 20x further in *both* (a channel any fine-tune moves), channel
    ``backdoor`` moves 4x further in the backdoor fit only."""
    clean = {k: torch.randn(C, D, generator=g) for k in ("m.a", "m.b")}
    bd = {k: torch.randn(C, D, generator=g) for k in ("m.a", "m.b")}
    for k in clean:
        clean[k][hot_clean] *= 20
        bd[k][hot_clean] *= 20
        bd[k][backdoor] *= 4
    return bd, clean


def _acc(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = SignatureAccumulator(_modules())
    for i in range(n):
        bd, clean = _variant(g)
        acc.add_update(i, "clean", clean)
        assert acc.add_update(i, "backdoor", bd)
    return acc


def test_channels_any_fit_moves_far_no_longer_rank_first():
    acc = _acc()
    published, normalized = acc.scores(), acc.scores(clean_normalize=True)
    for k in ("m.a", "m.b"):
        assert int(published[k].argmax()) == 0  # the channel every fit moves far
        assert int(normalized[k].argmax()) == 1  # the channel only the backdoor fit moves far
        # The discount is min(1, median / mean clean movement): channels at or below the median
        # keep the published magnitude exactly.
        c = torch.stack(acc.clean_norms_per_variant[k]).double().mean(0)
        below = c <= c.median()
        assert below.sum() >= C // 2
        torch.testing.assert_close(normalized[k][below], published[k][below])
        disc = acc.plasticity_discount()[k]
        assert disc[0] < 0.1 and bool((disc <= 1).all())
        torch.testing.assert_close(disc, (c.median() / torch.maximum(c, c.median())).float())


def test_signature_records_the_rule_and_flags_the_backdoor_channel():
    acc = _acc()
    sig = Signature.from_accumulator(acc, tau=1 / C, clean_normalize=True)
    assert sig.meta["clean_normalize"] is True
    assert sig.indices("m.a").tolist() == [1]
    assert Signature.from_accumulator(acc, tau=1 / C).indices("m.a").tolist() == [0]


def test_clean_norms_survive_a_state_dict_round_trip_and_their_absence_is_a_clear_error(tmp_path):
    acc = _acc(3)
    acc.save(tmp_path / "s.safetensors")
    other = SignatureAccumulator(_modules())
    other.load(tmp_path / "s.safetensors")
    assert other.has_clean_norms()
    for k in ("m.a", "m.b"):
        assert torch.equal(other.scores(clean_normalize=True)[k], acc.scores(clean_normalize=True)[k])
    # A state saved without them (an earlier version), or Δs added without them.
    old = SignatureAccumulator(_modules())
    old.load_state_dict({k: v for k, v in acc.state_dict().items() if not k.startswith("clean_norms/")})
    assert not old.has_clean_norms()
    assert torch.equal(old.scores()["m.a"], acc.scores()["m.a"])  # the published score still works
    with pytest.raises(RuntimeError, match="re-run stage 1"):
        old.scores(clean_normalize=True)
    bare = SignatureAccumulator(_modules())
    bare.add_delta({k: torch.ones(C, D) for k in ("m.a", "m.b")})
    with pytest.raises(RuntimeError, match="clean-fit norms"):
        bare.scores(clean_normalize=True)
    with pytest.raises(ValueError, match="clean_norms has shape"):
        bare.add_delta({k: torch.ones(C, D) for k in ("m.a", "m.b")}, {k: torch.ones(C + 1) for k in ("m.a", "m.b")})


def test_a_module_whose_median_channel_does_not_move_is_not_discounted():
    acc = SignatureAccumulator(_modules())
    clean_norms = {k: torch.zeros(C) for k in ("m.a", "m.b")}
    clean_norms["m.a"][0] = 5.0
    acc.add_delta({k: torch.randn(C, D) for k in ("m.a", "m.b")}, clean_norms)
    acc.add_delta({k: torch.randn(C, D) for k in ("m.a", "m.b")}, clean_norms)
    assert all(torch.equal(d, torch.ones(C)) for d in acc.plasticity_discount().values())
    assert torch.equal(acc.scores(clean_normalize=True)["m.a"], acc.scores()["m.a"])


def test_config_rejects_a_non_boolean():
    from lightning_bdvax import SignatureConfig

    with pytest.raises(ValueError, match="clean_normalize must be true or false"):
        SignatureConfig(clean_normalize="yes")


def test_stage1_state_without_clean_norms_is_run_again_with_the_same_result(tmp_path, caplog):
    """A work dir from before the clean-fit norms were recorded is not resumed: stage 1 starts
    over (same fits, same Δs) and the new state holds the norms."""
    from safetensors.torch import load_file, save_file

    from lightning_bdvax.builtin_data import builtin_instructions
    from lightning_bdvax.pipeline import SignatureConfig, VaccinationConfig, build_signature, run_vaccination
    from lightning_bdvax.tiny import tiny_model, tiny_tokenizer

    vac = VaccinationConfig(n_variants=2, samples_per_variant=8, epochs=1, batch_size=8, max_length=40, lr=1e-3)
    model, tok, clean = tiny_model("llama"), tiny_tokenizer(), builtin_instructions(60, seed=3)
    work = tmp_path / "work"
    first = run_vaccination(model, tok, clean, vac, seed=0, precision="32-true", work_dir=work, progress=False)
    assert first.has_clean_norms() and first.n == 2
    state = work / "stage1.safetensors"
    save_file({k: v for k, v in load_file(str(state)).items() if not k.startswith("clean_norms/")}, str(state))

    timings: dict = {}
    with caplog.at_level(logging.WARNING, logger="lightning_bdvax"):
        again = run_vaccination(model, tok, clean, vac, seed=0, precision="32-true", work_dir=work, progress=False,
                                timings=timings)
    assert "without clean-fit norms" in caplog.text
    assert len(timings["fits"]) == 4  # every fit ran again
    assert any(k.startswith("clean_norms/") for k in load_file(str(state)))
    sig_a = build_signature(first, SignatureConfig(tau=0.1, clean_normalize=True))
    sig_b = build_signature(again, SignatureConfig(tau=0.1, clean_normalize=True))
    for k in sig_a.scores:
        assert torch.equal(sig_a.scores[k], sig_b.scores[k])
        assert torch.equal(sig_a.masks[k], sig_b.masks[k])
    # and a state that has them resumes without a fit
    timings = {}
    run_vaccination(model, tok, clean, vac, seed=0, precision="32-true", work_dir=work, progress=False, timings=timings)
    assert timings.get("fits", []) == []


def test_purify_full_and_lora_with_clean_normalize(tmp_path, tok, records):
    """End to end: the full-model and the adapter paths score with the discount (scores never
    above the published ones, some strictly below, same Δs) and record the rule."""
    import copy

    import lightning_bdvax as bdvax
    from helpers import lora_adapter, tiny_lora_config
    from lightning_bdvax import lora
    from lightning_bdvax.tiny import tiny_model

    def full(clean_normalize):
        cfg = bdvax.BDVaxConfig(
            vaccination=bdvax.VaccinationConfig(n_variants=2, samples_per_variant=16, epochs=1, batch_size=8,
                                                max_length=48, lr=1e-3),
            signature=bdvax.SignatureConfig(tau=0.1, clean_normalize=clean_normalize),
            recovery=bdvax.RecoveryConfig(num_samples=16, steps=1), seed=0, precision="32-true")
        return bdvax.purify(tiny_model("llama", layers=2), tok, clean_data=records[:200], config=cfg,
                            progress=False).signature

    def below(a, b):
        assert a.meta["clean_normalize"] is True and b.meta["clean_normalize"] is False
        assert all(bool((a.scores[k] <= b.scores[k] + 1e-7).all()) for k in a.scores)
        assert any(bool((a.scores[k] < b.scores[k] - 1e-7).any()) for k in a.scores)

    below(full(True), full(False))

    base = tiny_model("llama")
    lora_adapter(copy.deepcopy(base)).save_pretrained(tmp_path / "adapter")

    def adapter(clean_normalize, name):
        cfg = tiny_lora_config(signature=bdvax.SignatureConfig(tau=0.35, clean_normalize=clean_normalize))
        return lora.purify_lora(copy.deepcopy(base), tmp_path / "adapter", tok, records[:64], cfg,
                                output_dir=tmp_path / name, progress=False).signature

    below(adapter(True, "a"), adapter(False, "b"))

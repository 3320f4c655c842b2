import itertools
import math

import pytest
import torch

from lightning_bdvax.arch import ChannelModule
from lightning_bdvax.signature import Signature, SignatureAccumulator, select_channels


def _modules(c=16, specs=(("a", "out"), ("b", "in"))):
    return [ChannelModule(f"m.{n}", "m", 0, n, role, c) for n, role in specs]


def _deltas(n, c=16, d=8, seed=0, shared=0.0):
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(c, d, generator=g)
    return [{f"m.{k}": torch.randn(c, d, generator=g) + shared * common for k in ("a", "b")} for _ in range(n)]


def _brute(deltas, key, lam, clip):
    stack = torch.stack([d[key] for d in deltas])  # (N, C, d)
    norms = stack.norm(dim=2)  # (N, C)
    mag = norms.mean(0)
    cos = []
    for i, l in itertools.combinations(range(len(deltas)), 2):
        c = torch.nn.functional.cosine_similarity(stack[i], stack[l], dim=1)
        cos.append(c.clamp_min(0) if clip else c)
    return mag + lam * torch.stack(cos).mean(0)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_streaming_score_matches_brute_force_unclipped(n):
    deltas = _deltas(n, shared=0.7)
    acc = SignatureAccumulator(_modules())
    for d in deltas:
        acc.add_delta(d)
    s = acc.scores(lam=0.5)
    for k in ("m.a", "m.b"):
        torch.testing.assert_close(s[k], _brute(deltas, k, 0.5, clip=False), rtol=1e-4, atol=1e-5)


def test_exact_mode_matches_published_clipped_score():
    deltas = _deltas(5, shared=0.2, seed=1)
    acc = SignatureAccumulator(_modules(), pairwise="exact")
    for d in deltas:
        acc.add_delta(d)
    s = acc.scores(lam=1.0)
    for k in ("m.a", "m.b"):
        torch.testing.assert_close(s[k], _brute(deltas, k, 1.0, clip=True), rtol=1e-4, atol=1e-5)
    # Unclipped and clipped differ when some cosines are negative.
    stream = SignatureAccumulator(_modules())
    for d in deltas:
        stream.add_delta(d)
    assert not torch.allclose(stream.scores(lam=1.0)["m.a"], s["m.a"])


def test_score_at_smaller_n_uses_prefix_without_refitting():
    deltas = _deltas(6, shared=0.5, seed=2)
    acc = SignatureAccumulator(_modules())
    for d in deltas:
        acc.add_delta(d)
    for n in (2, 4, 6):
        torch.testing.assert_close(acc.scores(lam=0.3, n=n)["m.b"], _brute(deltas[:n], "m.b", 0.3, False),
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        acc.scores(n=7)


def test_stream_memory_does_not_grow_with_n():
    def big_numel(n):
        acc = SignatureAccumulator(_modules(c=64))
        for d in _deltas(n, c=64, d=128):
            acc.add_delta(d)
        # Tensors the size of the weights (C x d) are the only ones that matter for memory.
        return sum(v.numel() for v in acc.state_dict().values() if v.dim() >= 2 and v.shape[-1] == 128)

    assert big_numel(2) == big_numel(12)


def test_backdoor_and_clean_updates_pair_into_delta():
    mods = _modules()
    acc = SignatureAccumulator(mods)
    bd, cl = _deltas(2, seed=4)
    assert acc.add_update(0, "clean", cl) is False
    assert acc.add_update(0, "backdoor", bd) is True
    ref = SignatureAccumulator(mods)
    ref.add_delta({k: bd[k] - cl[k] for k in bd})
    torch.testing.assert_close(acc.magnitude()["m.a"], ref.magnitude()["m.a"])
    with pytest.raises(ValueError):
        acc.add_update(0, "backdoor", bd)


def test_shared_clean_counterpart_serves_every_variant():
    acc = SignatureAccumulator(_modules())
    bd1, bd2, cl = _deltas(3, seed=5)
    acc.add_update(None, "clean", cl)
    assert acc.add_update(0, "backdoor", bd1) and acc.add_update(1, "backdoor", bd2)
    assert acc.n == 2 and acc.variants_done == [0, 1]


def test_state_dict_round_trip(tmp_path):
    acc = SignatureAccumulator(_modules())
    for d in _deltas(3, shared=0.3):
        acc.add_delta(d)
    acc.variants_done = [0, 1, 2]
    acc.save(tmp_path / "s.safetensors")
    other = SignatureAccumulator(_modules())
    other.load(tmp_path / "s.safetensors")
    assert other.n == 3 and other.variants_done == [0, 1, 2]
    for k in ("m.a", "m.b"):
        assert torch.equal(other.scores()[k], acc.scores()[k])


def test_top_tau_per_module_selects_the_highest_scores():
    scores = {"x": torch.arange(100.0), "y": torch.arange(100.0).flip(0)}
    masks = select_channels(scores, 0.03)
    assert masks["x"].sum() == 3 and masks["x"][97:].all()
    assert masks["y"][:3].all() and masks["y"].sum() == 3
    # ceil: even a tiny tau flags at least one channel per module
    assert select_channels({"z": torch.rand(10)}, 0.01)["z"].sum() == 1


def test_global_and_threshold_selection():
    scores = {"x": torch.tensor([0.0, 5.0, 1.0]), "y": torch.tensor([4.0, 0.5, 3.0])}
    g = select_channels(scores, 0.5, "global")
    assert g["x"].tolist() == [False, True, False] and g["y"].tolist() == [True, False, True]
    t = select_channels(scores, 0.5, "threshold", threshold=3.0)
    assert t["x"].tolist() == [False, True, False] and t["y"].tolist() == [True, False, True]


@pytest.mark.parametrize("tau", [0.0, 1.0, -0.1, 1.5])
def test_tau_out_of_range_is_rejected(tau):
    with pytest.raises(ValueError, match="tau must be in"):
        select_channels({"x": torch.rand(4)}, tau)


def test_signature_save_load(tmp_path):
    acc = SignatureAccumulator(_modules())
    for d in _deltas(2):
        acc.add_delta(d)
    sig = Signature.from_accumulator(acc, tau=0.25, lam=0.01, note="x")
    assert sig.n_flagged == 2 * math.ceil(0.25 * 16) and sig.n_channels == 32
    sig.save(tmp_path / "sig")
    back = Signature.load(tmp_path / "sig")
    assert back.meta["tau"] == 0.25 and back.meta["note"] == "x" and back.meta["n_flagged"] == sig.n_flagged
    for k in sig.masks:
        assert torch.equal(back.masks[k], sig.masks[k])
        assert torch.equal(back.scores[k], sig.scores[k])


@pytest.mark.parametrize("make, match", [
    (lambda: __import__("lightning_bdvax").SignatureConfig(lam=float("nan")), "lam must be >= 0"),
    (lambda: __import__("lightning_bdvax").NeutralizeConfig(scale=float("nan")), "scale must be a finite"),
    (lambda: __import__("lightning_bdvax").NeutralizeConfig(scale=float("inf")), "scale must be a finite"),
    (lambda: __import__("lightning_bdvax").VaccinationConfig(n_variants=3, keys=["a", "b"]), "expected at least n_variants=3 trigger keys, got 2"),
    (lambda: __import__("lightning_bdvax").VaccinationConfig(behaviours=[]), "behaviours: expected a non-empty list"),
    (lambda: __import__("lightning_bdvax").VaccinationConfig(behaviours=["ok", " "]), "behaviours: expected a non-empty list"),
    (lambda: __import__("lightning_bdvax").VaccinationConfig(trainable="attn"), "trainable must be 'all' or 'mlp'"),
])
def test_python_api_configs_reject_bad_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_per_neuron_selection_flags_the_same_neurons_in_every_module_of_a_block():
    g = torch.Generator().manual_seed(0)
    scores = {f"b{b}.{p}": torch.rand(200, generator=g) * (10.0 if p == "down" else 1.0)
              for b in range(2) for p in ("gate", "up", "down")}
    # Neuron 7 of block 0 is the strongest in every projection (relative to each module's mean).
    for p in ("gate", "up", "down"):
        scores[f"b0.{p}"][7] = scores[f"b0.{p}"].max() * 3
    groups = {k: k.split(".")[0] for k in scores}
    masks = select_channels(scores, 0.02, "per_neuron", groups=groups)
    for b in range(2):
        ms = [masks[f"b{b}.{p}"] for p in ("gate", "up", "down")]
        assert all(torch.equal(ms[0], m) for m in ms) and int(ms[0].sum()) == 4
        agg = sum(scores[f"b{b}.{p}"] / scores[f"b{b}.{p}"].mean() for p in ("gate", "up", "down"))
        assert set(ms[0].nonzero().flatten().tolist()) == set(agg.topk(4).indices.tolist())
    assert masks["b0.gate"][7]
    # per module: the projections pick different channels, so more neurons are touched
    pm = select_channels(scores, 0.02)
    touched = pm["b1.gate"] | pm["b1.up"] | pm["b1.down"]
    assert int(touched.sum()) > 4
    with pytest.raises(ValueError, match="needs groups"):
        select_channels(scores, 0.02, "per_neuron")
    with pytest.raises(ValueError, match="different channel counts"):
        select_channels(dict(scores, **{"b0.up": torch.rand(100)}), 0.02, "per_neuron", groups=groups)


def test_stage1_frees_each_fits_optimizer():
    """Stage-1 memory must not grow with N: every fit's AdamW state is gone when the next starts."""
    import gc
    import weakref

    from lightning_bdvax.builtin_data import builtin_instructions
    from lightning_bdvax.pipeline import VaccinationConfig, run_vaccination
    from lightning_bdvax.tiny import tiny_model, tiny_tokenizer

    alive = []
    orig = torch.optim.AdamW.__init__

    def tracking_init(self, *a, **k):
        orig(self, *a, **k)
        alive.append(weakref.ref(self))

    torch.optim.AdamW.__init__ = tracking_init
    gc.disable()  # a collection between fits would hide the leak
    try:
        run_vaccination(tiny_model("llama"), tiny_tokenizer(), builtin_instructions(100, seed=1),
                        VaccinationConfig(n_variants=3, samples_per_variant=16, max_length=48, max_steps=1),
                        precision="32-true", progress=False)
    finally:
        gc.enable()
        torch.optim.AdamW.__init__ = orig
    assert len(alive) == 6
    assert [r for r in alive if r() is not None and r().state] == []

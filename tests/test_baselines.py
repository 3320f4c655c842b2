"""The baseline defenses of issue 5 do what they say, on tiny models."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_bdvax.arch import channel_rows, find_mlp_modules
from lightning_bdvax.baselines import (
    DEFENSE_NAMES,
    DEFENSES,
    CROWModule,
    collect_input_norms,
    defend_fineprune,
    layer_consistency_loss,
    prune_magnitude_,
    prune_wanda_,
    quantize_tensor,
    quantize_weights_,
    random_channels_signature,
    run_defense,
    run_lora_defense,
)
from lightning_bdvax.data import make_loader, tokenize_records
from lightning_bdvax.modules import CausalLMModule
from lightning_bdvax.pipeline import RecoveryConfig
from lightning_bdvax.signature import Signature, select_channels
from lightning_bdvax.tiny import tiny_model

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, loaded CPU two threads
    make them ~30x slower (contention); restored for the other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


EXPECTED_NAMES = {"ft", "prune-magnitude", "prune-wanda", "fineprune", "quant-int8", "quant-int4", "crow", "random"}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bdvax_like_signature(model, tau=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = {cm.key: torch.rand(cm.n_channels, generator=g) for cm in find_mlp_modules(model)}
    return Signature(select_channels(scores, tau), scores, {"tau": tau})


def _batch(tok, records, n=8, max_length=64):
    ex = tokenize_records(tok, records[:n], max_length)
    return next(iter(make_loader(ex, tok.pad_token_id, n, False, 0)))


# ------------------------------------------------------------------ pruning
@pytest.mark.parametrize("sparsity", [0.3, 0.55])
def test_magnitude_pruning_zeroes_the_smallest_weights_of_each_module(llama, sparsity):
    before = _state(llama)
    mlp = {cm.weight_name for cm in find_mlp_modules(llama)}
    achieved = prune_magnitude_(llama, sparsity)
    after = llama.state_dict()
    for name in mlp:
        w0, w = before[name], after[name]
        pruned = w == 0
        assert abs(int(pruned.sum()) - sparsity * w.numel()) <= 1, name
        assert torch.equal(w[~pruned], w0[~pruned]), name  # survivors untouched
        assert w0[pruned].abs().max() <= w0[~pruned].abs().min(), name  # the smallest |w| went
    for name, v in after.items():
        if name not in mlp:
            assert torch.equal(v, before[name]), name
    total = sum(after[n].numel() for n in mlp)
    assert abs(achieved - sparsity) <= len(mlp) / total


def test_wanda_matches_a_direct_computation(llama, tok, records):
    recs = records[:12]
    named = dict(llama.named_modules())
    mods = {cm.weight_name: named[cm.name] for cm in find_mlp_modules(llama)}
    # Direct: one unpadded sequence at a time, every input row kept, then the column norms.
    seen = {n: [] for n in mods}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen[n].append(i[0].reshape(-1, i[0].shape[-1])))
             for n, m in mods.items()]
    with torch.no_grad():
        for e in tokenize_records(tok, recs, 64):
            llama(input_ids=torch.tensor([e["input_ids"]]))
    for h in hooks:
        h.remove()
    direct = {n: torch.cat(v).norm(dim=0) for n, v in seen.items()}
    # Batched with right padding (masked out) gives the same norms.
    norms = collect_input_norms(llama, tok, recs, n_calib=12, max_length=64, batch_size=5)
    for n in mods:
        torch.testing.assert_close(norms[n], direct[n], rtol=1e-4, atol=1e-6)

    before = {n: m.weight.detach().clone() for n, m in mods.items()}
    magnitude = copy.deepcopy(llama)
    sparsity = 0.3
    achieved = prune_wanda_(llama, tok, recs, sparsity, n_calib=12, max_length=64, batch_size=5)
    zeros = total = 0
    for n, m in mods.items():
        w0, w = before[n], m.weight.detach()
        k = int(sparsity * w.shape[1])
        score = w0.abs() * direct[n].unsqueeze(0)  # |W_ij| * ||X_j||, compared within each output row
        expected = torch.zeros_like(w0, dtype=torch.bool)
        expected.scatter_(1, score.argsort(dim=1)[:, :k], True)
        assert torch.equal(w == 0, expected), n
        assert torch.equal(w[~expected], w0[~expected]), n
        assert ((w == 0).sum(1) == k).all()  # every row at the target within one element
        zeros, total = zeros + k * w.shape[0], total + w.numel()
    assert achieved == pytest.approx(zeros / total)
    # The activations matter: magnitude pruning at the same sparsity picks other weights.
    prune_magnitude_(magnitude, sparsity)
    mag = dict(magnitude.named_parameters())
    assert any(not torch.equal(mag[n] == 0, m.weight == 0) for n, m in mods.items())


def test_fineprune_keeps_pruned_entries_at_zero_through_the_fine_tune(tok, records):
    ref = tiny_model("llama")
    cfg = RecoveryConfig(num_samples=16, steps=3, lr=5e-3, batch_size=4, max_length=64)
    _, masks = prune_magnitude_(copy.deepcopy(ref), 0.4, return_masks=True)
    kept, free = copy.deepcopy(ref), copy.deepcopy(ref)
    info = defend_fineprune(kept, tok, records, cfg, sparsity=0.4, method="magnitude")
    defend_fineprune(free, tok, records, cfg, sparsity=0.4, method="magnitude", keep_pruned=False)
    p0, pk, pf = (dict(m.named_parameters()) for m in (ref, kept, free))
    assert info["steps"] == 3 and info["method"] == "magnitude"
    assert info["sparsity"] >= 0.4 - 1e-3
    for name, m in masks.items():
        assert m.any()
        assert torch.all(pk[name][m] == 0), name  # held at zero by the gradient masks
        assert not torch.equal(pk[name][~m], p0[name][~m]), name  # the rest did train
        assert (pf[name][m] != 0).any(), name  # without masks the pruned entries regrow


# ------------------------------------------------------------------ quantization
@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 128), (8, 48)])
def test_quantize_tensor_error_bound_and_levels(bits, group):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 200, generator=g) * 0.05
    w[3] = 0  # an all-zero row must survive (no division by a zero scale)
    dq, scale = quantize_tensor(w, bits, group)
    gs = 200 if group is None else group
    n_groups = math.ceil(200 / gs)  # 128 -> 128 + 72: a shorter last group
    assert scale.shape == (24, n_groups)
    per_elem = scale.repeat_interleave(gs, dim=1)[:, :200]
    assert torch.all((dq - w).abs() <= per_elem / 2 * (1 + 1e-5) + 1e-12)
    for r in range(24):
        for j in range(n_groups):
            assert dq[r, j * gs:(j + 1) * gs].unique().numel() <= 2 ** bits
    assert torch.equal(dq[3], torch.zeros(200))
    assert (dq - w).abs().max() > 0


def test_int4_is_coarser_than_int8():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    e8 = (quantize_tensor(w, 8, 128)[0] - w).abs()
    e4 = (quantize_tensor(w, 4, 128)[0] - w).abs()
    assert e4.max() > e8.max() and e4.mean() > 10 * e8.mean()


def test_quantize_weights_covers_linears_but_not_embeddings_or_head(llama):
    before = _state(llama)
    q8, q4 = copy.deepcopy(llama), copy.deepcopy(llama)
    e8 = quantize_weights_(q8, bits=8)
    e4 = quantize_weights_(q4, bits=4)
    linears = {n for n, m in llama.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert set(e8) == set(e4) == linears and len(linears) == 14
    for model in (q8, q4):
        sd = model.state_dict()
        for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
            assert torch.equal(sd[name], before[name]), name
    for name in linears:
        w0 = before[f"{name}.weight"]
        w8, w4 = q8.state_dict()[f"{name}.weight"], q4.state_dict()[f"{name}.weight"]
        # per output channel (int8) / groups of 128 = whole rows here (int4): bound s/2 per row
        s8 = w0.abs().amax(1, keepdim=True) / 127
        assert torch.all((w8 - w0).abs() <= s8 / 2 * (1 + 1e-5)), name
        assert e8[name] == pytest.approx(float((w8 - w0).abs().max()))
        assert e4[name] > e8[name], name
        assert max(int(r.unique().numel()) for r in w8) <= 256
        assert max(int(r.unique().numel()) for r in w4) <= 16
    # Quantizing the quantized weights again changes nothing (they lie on the grid).
    assert max(quantize_weights_(q8, bits=8).values()) <= 1e-6


def test_conv1d_weights_are_grouped_by_output_feature(tok, records):
    """GPT-2 stores Conv1D weights (in, out): Wanda's rows and the quantization channels are
    output features, i.e. columns of the stored weight."""
    pruned = tiny_model("gpt2")
    prune_wanda_(pruned, tok, records[:8], 0.25, n_calib=8, max_length=64)
    w = pruned.transformer.h[0].mlp.c_fc.weight  # stored (32 in, 64 out)
    assert tuple(w.shape) == (32, 64)
    assert ((w == 0).sum(0) == 8).all()  # every output feature lost floor(0.25 * 32) inputs
    quant = tiny_model("gpt2")
    w0 = quant.transformer.h[0].mlp.c_proj.weight.detach().clone()  # stored (64 in, 32 out)
    quantize_weights_(quant, bits=8)
    w8 = quant.transformer.h[0].mlp.c_proj.weight.detach()
    s = w0.abs().amax(0, keepdim=True) / 127  # per output feature = per column
    assert torch.all((w8 - w0).abs() <= s / 2 * (1 + 1e-5))
    assert max(int(c.unique().numel()) for c in w8.t()) <= 256


# ------------------------------------------------------------------ CROW
def test_layer_consistency_loss_is_mean_one_minus_cos_of_consecutive_layers():
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(2, 5, 8, generator=g) for _ in range(5)]  # embeddings, 3 layers, normed last
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    vals = [1 - F.cosine_similarity(hs[l][b, t], hs[l + 1][b, t], dim=0)
            for l in (1, 2) for b in range(2) for t in range(5) if mask[b, t]]
    torch.testing.assert_close(layer_consistency_loss(hs, mask), torch.stack(vals).mean())
    # Unmasked, it is the reference implementation's expression.
    ref = (1 - F.cosine_similarity(torch.stack(hs[1:-2]), torch.stack(hs[2:-1]), dim=-1, eps=1e-8)).mean()
    torch.testing.assert_close(layer_consistency_loss(hs), ref)
    # Neither the embeddings nor the final (normed) state enter the loss.
    other = [torch.randn(2, 5, 8)] + hs[1:-1] + [torch.randn(2, 5, 8)]
    torch.testing.assert_close(layer_consistency_loss(other, mask), layer_consistency_loss(hs, mask))


def test_crow_loss_is_finite_differentiable_and_raised_by_the_perturbation(tok, records):
    model = tiny_model("llama", layers=4)
    batch = _batch(tok, records)
    module = CROWModule(model, alpha=5.5, epsilon=1e-3)  # small ε: the first-order regime of FGSM
    losses = module.crow_losses(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["consistency_adv"] > losses["consistency"] > 0
    torch.testing.assert_close(losses["loss"], losses["lm"] + 5.5 * losses["consistency_adv"])
    with torch.no_grad():
        lm_direct = CausalLMModule.lm_loss(model(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).logits, batch["labels"])
    torch.testing.assert_close(losses["lm"], lm_direct)
    losses["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["model.layers.1.mlp.down_proj.weight"].abs().sum() > 0
    assert grads["model.embed_tokens.weight"].abs().sum() > 0
    # The consistency term changes the update (it is not just the LM gradient).
    model.zero_grad()
    CROWModule(model, alpha=0.0, epsilon=1e-3).crow_losses(batch)["loss"].backward()
    g0 = model.model.layers[1].mlp.down_proj.weight.grad
    assert not torch.allclose(g0, grads["model.layers.1.mlp.down_proj.weight"])
    # Published ε = 0.1: still finite and positive.
    out = CROWModule(model).crow_losses(batch)
    assert torch.isfinite(out["loss"]) and out["consistency_adv"] > 0


# ------------------------------------------------------------------ random-channel control
def test_random_signature_copies_the_counts_but_not_the_channels(llama):
    sig = _bdvax_like_signature(llama, tau=0.1)
    r = random_channels_signature(llama, like=sig, seed=1)
    assert set(r.masks) == set(sig.masks)
    for k in sig.masks:
        assert int(r.masks[k].sum()) == int(sig.masks[k].sum()) > 0
    assert any(not torch.equal(r.masks[k], sig.masks[k]) for k in sig.masks)
    again = random_channels_signature(llama, like=sig, seed=1)
    assert all(torch.equal(again.masks[k], r.masks[k]) for k in r.masks)
    other = random_channels_signature(llama, like=sig, seed=2)
    assert any(not torch.equal(other.masks[k], r.masks[k]) for k in r.masks)
    # Uniform over channels: across seeds every channel of a module gets drawn.
    key = next(iter(sig.masks))
    hits = torch.stack([random_channels_signature(llama, like=sig, seed=s).masks[key] for s in range(120)]).sum(0)
    assert (hits > 0).all()
    frac = random_channels_signature(llama, n_per_module=0.1, seed=0)
    for cm in find_mlp_modules(llama):
        assert int(frac.masks[cm.key].sum()) == math.ceil(0.1 * cm.n_channels)
    with pytest.raises(ValueError):
        random_channels_signature(llama, like=sig, n_per_module=3)
    with pytest.raises(ValueError):
        random_channels_signature(llama)


def test_random_defense_neutralizes_the_random_channels(llama, tok, records):
    sig = _bdvax_like_signature(llama, tau=0.1)
    expected = random_channels_signature(llama, like=sig, seed=4)
    before = _state(llama)
    info = run_defense("random", llama, tok, records, RecoveryConfig(steps=0), signature=sig, seed=4)
    assert info["n_flagged"] == sig.n_flagged and info["steps"] == 0
    after = llama.state_dict()
    for cm in find_mlp_modules(llama):
        rows0, rows = channel_rows(before[cm.weight_name], cm), channel_rows(after[cm.weight_name], cm)
        changed = (rows0 != rows).any(dim=1)
        assert torch.equal(changed, expected.masks[cm.key]), cm.key
        assert rows[expected.masks[cm.key]].abs().sum() == 0
    with pytest.raises(ValueError):
        run_defense("random", llama, tok, records, RecoveryConfig(steps=0))


# ------------------------------------------------------------------ registry
def test_registry_runs_every_defense_by_name(tok, records):
    assert set(DEFENSES) == set(DEFENSE_NAMES) == EXPECTED_NAMES
    cfg = RecoveryConfig(num_samples=8, steps=2, lr=1e-3, batch_size=4, max_length=48, objective="lm")
    for name in DEFENSE_NAMES:
        model = tiny_model("llama", layers=3)
        before = _state(model)
        info = run_defense(name, model, tok, records, cfg, sparsity=0.3,
                           signature=_bdvax_like_signature(model), n_calib=8)
        json.dumps(info)  # JSON-ready for the results rows
        assert info["defense"] == name and info["wall_s"] >= 0
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), name
        if name in ("ft", "fineprune", "crow", "random"):
            assert info["steps"] == 2 and math.isfinite(info["train_loss"]), name
        if name.startswith("prune") or name == "fineprune":
            assert 0.25 <= info["sparsity"] <= 0.3, name
        if name.startswith("quant"):
            assert info["quant_max_abs_err"] > 0, name
    with pytest.raises(ValueError, match="unknown defense"):
        run_defense("bdvax", tiny_model("llama"), tok, records, cfg)
    with pytest.raises(TypeError, match="unknown defense option"):
        run_defense("ft", tiny_model("llama"), tok, records, cfg, sparsty=0.5)


# ------------------------------------------------------------------ on a LoRA artefact
@pytest.fixture
def lora_artefact(tmp_path):
    """(base, adapter directory) of a tiny suspicious LoRA adapter on all linear layers."""
    from helpers import lora_adapter
    from lightning_bdvax.models import save_model

    d = tmp_path / "adapter"
    save_model(lora_adapter(tiny_model("llama", layers=3)), None, d)
    return tiny_model("llama", layers=3).eval(), d


@pytest.mark.parametrize("name", ["ft", "crow"])
def test_lora_training_baselines_train_the_adapter_only(lora_artefact, tok, records, name):
    from peft import PeftModel
    from helpers import state_digest
    from lightning_bdvax.lora import load_lora_model
    from lightning_bdvax.models import file_digests

    base, adapter = lora_artefact
    base_digest, files = state_digest(base), file_digests(adapter)
    cfg = RecoveryConfig(num_samples=8, steps=2, lr=1e-2, batch_size=4, max_length=48)
    model, info = run_lora_defense(name, base, adapter, tok, records, cfg)
    assert isinstance(model, PeftModel) and info["applied_to"] == "adapter" and info["steps"] == 2
    json.dumps(info)
    assert state_digest(base) == base_digest and file_digests(adapter) == files  # inputs untouched
    start = dict(load_lora_model(copy.deepcopy(base), adapter, is_trainable=False).named_parameters())
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert moved and all("lora_" in n for n in moved), sorted(moved)[:3]


def test_lora_weight_editing_baselines_act_on_the_merged_model(lora_artefact, tok, records):
    from peft import PeftModel
    from lightning_bdvax.lora import load_lora_model

    base, adapter = lora_artefact
    model, info = run_lora_defense("quant-int8", base, adapter, tok, records)
    assert not isinstance(model, PeftModel) and info["applied_to"] == "merged"
    assert not any("lora_" in n for n, _ in model.named_parameters())
    want = load_lora_model(copy.deepcopy(base), adapter, is_trainable=False).merge_and_unload()
    quantize_weights_(want, bits=8)
    got = model.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in want.state_dict().items())
    pruned, info = run_lora_defense("prune-magnitude", base, adapter, tok, records, sparsity=0.4)
    assert info["applied_to"] == "merged" and abs(info["sparsity"] - 0.4) < 0.01
    cfg = RecoveryConfig(num_samples=8, steps=2, lr=1e-3, batch_size=4, max_length=48)
    tuned, info = run_lora_defense("fineprune", base, adapter, tok, records, cfg, sparsity=0.4, n_calib=8)
    assert info["applied_to"] == "merged" and info["steps"] == 2 and math.isfinite(info["train_loss"])
    start = dict(want.named_parameters())
    assert sum(not torch.equal(p, start[n]) for n, p in tuned.named_parameters()) > len(start) // 2  # full-parameter


def test_lora_defense_refusals(lora_artefact, tok, records, tmp_path):
    from lightning_bdvax.lora import LoRAAdapterError

    base, adapter = lora_artefact
    with pytest.raises(ValueError, match="purify_lora"):
        run_lora_defense("random", base, adapter, tok, records)
    with pytest.raises(ValueError, match="unknown defense"):
        run_lora_defense("bdvax", base, adapter, tok, records)
    with pytest.raises(LoRAAdapterError, match="does not exist"):
        run_lora_defense("ft", base, tmp_path / "nowhere", tok, records)
    wrong = tiny_model("llama", layers=3, hidden=48)  # shapes the adapter does not fit
    with pytest.raises(LoRAAdapterError):
        run_lora_defense("ft", wrong, adapter, tok, records)

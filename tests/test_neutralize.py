import pytest
import torch

from lightning_bdvax.arch import channel_rows, find_mlp_modules
from lightning_bdvax.neutralize import neutralize_, xavier_bound
from lightning_bdvax.signature import Signature


def _signature(model, flagged):
    """Signature flagging channel indices ``flagged[key]`` (others clear)."""
    masks, scores = {}, {}
    for cm in find_mlp_modules(model):
        m = torch.zeros(cm.n_channels, dtype=torch.bool)
        m[flagged.get(cm.proj, [])] = True
        masks[cm.key], scores[cm.key] = m, torch.zeros(cm.n_channels)
    return Signature(masks, scores, {})


@pytest.mark.parametrize("mode", ["zero", "reinit"])
def test_neutralize_touches_exactly_the_flagged_channels(llama, mode):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    flagged = {"gate_proj": [1, 5], "up_proj": [5], "down_proj": [7, 8, 9]}
    touched = neutralize_(llama, _signature(llama, flagged), mode=mode, seed=0)
    assert sum(touched.values()) == 2 * 6  # per layer: 2 + 1 + 3, two layers
    mods = {cm.weight_name: cm for cm in find_mlp_modules(llama)}
    for name, after in llama.state_dict().items():
        if name not in mods:
            assert torch.equal(after, before[name]), name
            continue
        cm = mods[name]
        rows_b, rows_a = channel_rows(before[name], cm), channel_rows(after, cm)
        changed = (rows_b != rows_a).any(dim=1).nonzero().flatten().tolist()
        assert changed == flagged[cm.proj], name
        if mode == "zero":
            assert rows_a[flagged[cm.proj]].abs().sum() == 0
        else:
            bound = xavier_bound(after)
            assert rows_a[flagged[cm.proj]].abs().max() <= bound


def test_reinit_is_deterministic_for_a_seed(llama):
    import copy

    other = copy.deepcopy(llama)
    sig = _signature(llama, {"gate_proj": [0, 3], "down_proj": [2]})
    neutralize_(llama, sig, mode="reinit", seed=7)
    neutralize_(other, sig, mode="reinit", seed=7)
    for (n, a), (_, b) in zip(llama.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n


def test_zeroed_channel_is_silent_in_the_forward_pass(llama):
    """Zeroing gate/up row j and down column j removes neuron j's contribution entirely."""
    sig = _signature(llama, {"gate_proj": [4], "up_proj": [4], "down_proj": [4]})
    neutralize_(llama, sig, mode="zero")
    acts = []
    h = llama.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: acts.append(i[0]))
    llama(torch.randint(0, 100, (1, 6)))
    h.remove()
    assert torch.all(acts[0][..., 4] == 0) and acts[0][..., 3].abs().sum() > 0


def test_bad_mode_and_mismatched_signature(llama):
    sig = _signature(llama, {"gate_proj": [0]})
    with pytest.raises(ValueError, match="mode"):
        neutralize_(llama, sig, mode="shuffle")
    bad = Signature({"model.layers.9.mlp.gate_proj": torch.zeros(64, dtype=torch.bool)}, {}, {})
    with pytest.raises(ValueError, match="lacks"):
        neutralize_(llama, bad)
    short = Signature({k: v[:10] for k, v in sig.masks.items()}, {}, {})
    with pytest.raises(ValueError, match="channels"):
        neutralize_(llama, short)


@pytest.mark.parametrize("scope", ["unflagged", "flagged"])
def test_recovery_scope_trains_only_its_part(scope):
    """After a recovery step under a scope's masks, only that scope's weights have moved."""
    from lightning_bdvax.builtin_data import builtin_instructions
    from lightning_bdvax.neutralize import recovery_grad_masks
    from lightning_bdvax.pipeline import RecoveryConfig, recover
    from lightning_bdvax.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama"), tiny_tokenizer()
    mods = find_mlp_modules(model)
    g = torch.Generator().manual_seed(0)
    masks = {cm.key: torch.rand(cm.n_channels, generator=g) < 0.2 for cm in mods}
    sig = Signature(masks, {k: m.float() for k, m in masks.items()}, {})
    neutralize_(model, sig, mode="zero")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gm = recovery_grad_masks(model, sig, scope)
    recover(model, tok, builtin_instructions(32, seed=2), RecoveryConfig(num_samples=32, steps=3, lr=1e-2,
                                                                        max_length=48),
            precision="32-true", progress=False, grad_masks=gm)
    named = dict(model.named_modules())
    for cm in mods:
        w, w0 = named[cm.key].weight.detach(), before[cm.weight_name]
        moved = channel_rows(w, cm) != channel_rows(w0, cm)
        idx = masks[cm.key]
        if scope == "unflagged":
            assert not moved[idx].any() and float(channel_rows(w, cm)[idx].abs().sum()) == 0.0
            assert moved[~idx].any()
        else:
            assert not moved[~idx].any() and moved[idx].any()
    attn = [n for n in before if "self_attn" in n]
    changed = [n for n in attn if not torch.equal(before[n], dict(model.named_parameters())[n])]
    assert (changed == []) == (scope == "flagged")
    with pytest.raises(ValueError, match="recovery scope"):
        recovery_grad_masks(model, sig, "some")


def test_recovery_trains_on_the_probe_trigger_copies_too():
    """``probe_triggers`` adds that fraction of the recovery records again, each with a probe inserted."""
    import lightning as L

    from lightning_bdvax.builtin_data import builtin_instructions
    from lightning_bdvax.pipeline import RecoveryConfig, recover
    from lightning_bdvax.tiny import tiny_model, tiny_tokenizer

    class Sizes(L.Callback):
        def __init__(self):
            self.sizes = []

        def on_train_start(self, trainer, pl_module):
            self.sizes.append(len(trainer.train_dataloader.dataset))

    tok, recs = tiny_tokenizer(), builtin_instructions(32, seed=2)
    states = []
    for frac in (0.0, 0.5, 0.5):
        model, seen = tiny_model("llama"), Sizes()
        recover(model, tok, recs, RecoveryConfig(num_samples=32, steps=2, lr=1e-2, max_length=48, probe_triggers=frac),
                precision="32-true", progress=False, callbacks=[seen])
        assert seen.sizes == [32 + round(frac * 32)]
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(states[1][k], states[2][k]) for k in states[1])  # same seed, same result
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])
    with pytest.raises(ValueError, match="probe_triggers must be in"):
        RecoveryConfig(probe_triggers=1.5)

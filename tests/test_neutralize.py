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

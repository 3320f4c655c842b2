"""Tests for lightning_bdvax.arch: where the MLP channels are, for every supported family.

Each family is checked on a tiny random model built from its own ``transformers`` config:
the projections are found with the right roles and channel counts, channel_rows /
set_channel_rows_ round-trip, and neutralizing channel ``j`` changes intermediate neuron ``j``
only (seen by a forward hook on the input of the reading projection) and only channel ``j``'s
weights.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from lightning_bdvax import arch  # noqa: E402
from lightning_bdvax.arch import (  # noqa: E402
    MLP_LAYOUTS,
    ArchitectureError,
    ChannelModule,
    MLPLayout,
    channel_rows,
    find_mlp_modules,
    set_channel_rows_,
)
from lightning_bdvax.neutralize import neutralize_  # noqa: E402
from lightning_bdvax.signature import Signature  # noqa: E402
from lightning_bdvax.tiny import TINY_FAMILIES, tiny_model  # noqa: E402

torch.set_num_threads(1)

HIDDEN, INTER, LAYERS = 32, 64, 2

# family -> (out projections, in projection, fused, transposed)
EXPECTED = {
    "llama": (("gate_proj", "up_proj"), "down_proj", 1, False),
    "mistral": (("gate_proj", "up_proj"), "down_proj", 1, False),
    "qwen2": (("gate_proj", "up_proj"), "down_proj", 1, False),
    "qwen3": (("gate_proj", "up_proj"), "down_proj", 1, False),
    "gemma": (("gate_proj", "up_proj"), "down_proj", 1, False),
    "gemma2": (("gate_proj", "up_proj"), "down_proj", 1, False),
    "gemma3": (("gate_proj", "up_proj"), "down_proj", 1, False),
    "phi3": (("gate_up_proj",), "down_proj", 2, False),
    "phi": (("fc1",), "fc2", 1, False),
    "gpt2": (("c_fc",), "c_proj", 1, True),  # Conv1D: weights stored (in, out)
    "gpt_bigcode": (("c_fc",), "c_proj", 1, False),  # same names, but nn.Linear
    "starcoder2": (("c_fc",), "c_proj", 1, False),
    "gpt_neox": (("dense_h_to_4h",), "dense_4h_to_h", 1, False),
    "falcon": (("dense_h_to_4h",), "dense_4h_to_h", 1, False),
    "gptj": (("fc_in",), "fc_out", 1, False),
    "opt": (("fc1",), "fc2", 1, False),
}
REQUIRED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "opt")

_MODELS: dict[str, nn.Module] = {}


def fresh(family: str) -> nn.Module:
    """A tiny model of ``family`` (built once per session, deep-copied per test)."""
    import copy

    if family not in _MODELS:
        _MODELS[family] = tiny_model(family, hidden=HIDDEN, intermediate=INTER, layers=LAYERS).eval()
    return copy.deepcopy(_MODELS[family])


def config_intermediate(cfg) -> int:
    for attr in ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"):
        v = getattr(cfg, attr, None)
        if v:
            return v
    raise AssertionError(f"no intermediate size on {type(cfg).__name__}")


def module(model: nn.Module, name: str) -> nn.Module:
    m = dict(model.named_modules())[name]
    return getattr(m, "base_layer", m)


def test_required_families_are_built():
    assert set(REQUIRED) <= set(TINY_FAMILIES)
    assert set(TINY_FAMILIES) <= set(EXPECTED)


# ----------------------------------------------------------------------------- discovery
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_find_mlp_modules_every_layer(family):
    model = fresh(family)
    outs, inp, fused, transposed = EXPECTED[family]
    n = config_intermediate(model.config)
    assert n == INTER
    found = find_mlp_modules(model)
    assert len(found) == LAYERS * (len(outs) + 1)
    by_layer: dict[int, list[ChannelModule]] = {}
    for cm in found:
        by_layer.setdefault(cm.layer, []).append(cm)
    assert sorted(by_layer) == list(range(LAYERS))
    for layer, cms in by_layer.items():
        assert [cm.proj for cm in cms] == [*outs, inp]
        assert len({cm.block for cm in cms}) == 1
        for cm in cms:
            assert cm.n_channels == n
            assert cm.transposed is transposed
            assert cm.role == ("in" if cm.proj == inp else "out")
            assert cm.fused == (fused if cm.role == "out" else 1)
            assert cm.name == f"{cm.block}.{cm.proj}" == cm.key
            w = module(model, cm.name).weight
            rows = channel_rows(w, cm)
            assert rows.shape == (n, (HIDDEN * cm.fused)), (cm, tuple(w.shape))
    # no projection of an MLP block is left out: every direct child with a 2-D weight is found
    names = {cm.name for cm in found}
    named = dict(model.named_modules())
    for block in {cm.block for cm in found}:
        for child, m in named[block].named_children():
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 2:
                assert f"{block}.{child}" in names, f"{block}.{child}"


# ----------------------------------------------------------------------------- round trip
def _layout_reference(w: torch.Tensor, cm: ChannelModule, j: int) -> torch.Tensor:
    """Channel ``j``'s weights written out by hand from the layout definition."""
    c = cm.n_channels
    if cm.role == "out":
        if cm.transposed:
            return torch.cat([w[:, j + b * c] for b in range(cm.fused)])
        return torch.cat([w[j + b * c] for b in range(cm.fused)])
    return w[j] if cm.transposed else w[:, j]


def _check_round_trip(w0: torch.Tensor, cm: ChannelModule) -> None:
    c = cm.n_channels
    rows0 = channel_rows(w0, cm).clone()
    for j in (0, 1, c - 1):
        assert torch.equal(rows0[j], _layout_reference(w0, cm, j))
    # identity: writing back what was read changes nothing
    w = w0.clone()
    set_channel_rows_(w, cm, torch.arange(c), rows0)
    assert torch.equal(w, w0)
    # a subset: exactly those channels change, to exactly the given values
    g = torch.Generator().manual_seed(1)
    idx = torch.tensor([c - 1, 3, 0])
    vals = torch.randn(len(idx), rows0.shape[1], generator=g)
    set_channel_rows_(w, cm, idx, vals)
    rows = channel_rows(w, cm)
    assert torch.equal(rows[idx], vals)
    keep = torch.ones(c, dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(rows[keep], rows0[keep])
    # the rest of the tensor (entries outside those channels) is untouched
    diff = (w != w0)
    marker = torch.zeros_like(w0)
    set_channel_rows_(marker, cm, idx, 1.0)
    assert not diff[marker == 0].any()
    assert int((marker != 0).sum()) == len(idx) * rows0.shape[1]
    # scalar fill and restore
    set_channel_rows_(w, cm, idx, 0.0)
    assert not channel_rows(w, cm)[idx].any()
    set_channel_rows_(w, cm, idx, rows0[idx])
    assert torch.equal(w, w0)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "gpt_neox", "opt", "starcoder2"])
def test_channel_rows_round_trip(family):
    model = fresh(family)
    for cm in find_mlp_modules(model)[: len(EXPECTED[family][0]) + 1]:
        _check_round_trip(module(model, cm.name).weight.detach().clone(), cm)


@pytest.mark.parametrize("fused,transposed,role", [(1, False, "out"), (1, True, "out"), (2, False, "out"),
                                                   (2, True, "out"), (3, False, "out"), (1, False, "in"),
                                                   (1, True, "in")])
def test_channel_rows_round_trip_synthetic(fused, transposed, role):
    c, h = 6, 4
    shape = (c * fused, h) if role == "out" else (h, c)
    if transposed:
        shape = shape[::-1]
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    _check_round_trip(w, ChannelModule("m.p", "m", 0, "p", role, c, fused if role == "out" else 1, transposed))


# ----------------------------------------------------------------------------- neutralization
def _hooked_activations(model: nn.Module, readers: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    acts: dict[str, torch.Tensor] = {}
    named = dict(model.named_modules())
    handles = [named[r].register_forward_hook(lambda m, inp, out, r=r: acts.__setitem__(r, inp[0].detach().clone()))
               for r in readers]
    try:
        with torch.no_grad():
            logits = model(input_ids=x).logits
    finally:
        for h in handles:
            h.remove()
    assert torch.isfinite(logits).all()
    return [acts[r] for r in readers]


def _single_channel_signature(found: list[ChannelModule], layer: int, j: int) -> Signature:
    masks = {}
    for cm in found:
        m = torch.zeros(cm.n_channels, dtype=torch.bool)
        if cm.layer == layer:
            m[j] = True
        masks[cm.key] = m
    return Signature(masks, {k: m.float() for k, m in masks.items()}, {})


def _assert_only_channel_changed(before: dict, model: nn.Module, found: list[ChannelModule], flagged: dict,
                                 mode: str) -> None:
    """Every parameter outside the flagged channels is bit-identical; flagged channels changed."""
    after = model.state_dict()
    covered = set()
    for cm in found:
        idx = flagged.get(cm.key)
        if idx is None or len(idx) == 0:
            continue
        pname = next(k for k in after if k in (f"{cm.name}.weight", f"{cm.name}.base_layer.weight"))
        covered.add(pname)
        w0, w1 = before[pname], after[pname]
        r0, r1 = channel_rows(w0, cm), channel_rows(w1, cm)
        keep = torch.ones(cm.n_channels, dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(r0[keep], r1[keep]), cm.key
        marker = torch.zeros_like(w0)
        set_channel_rows_(marker, cm, idx, 1.0)
        assert torch.equal(w0[marker == 0], w1[marker == 0]), cm.key
        if mode == "zero":
            assert not r1[idx].any()
        else:
            assert (r1[idx] != r0[idx]).any(dim=1).all(), cm.key
        bname = pname[: -len("weight")] + "bias"
        if bname in after:
            covered.add(bname)
            b0, b1 = before[bname], after[bname]
            if cm.role == "out":
                bidx = torch.cat([idx + k * cm.n_channels for k in range(cm.fused)])
                bkeep = torch.ones_like(b0, dtype=torch.bool)
                bkeep[bidx] = False
                assert not b1[bidx].any()
                assert torch.equal(b0[bkeep], b1[bkeep])
            else:
                assert torch.equal(b0, b1)
    for k, v in after.items():
        if k not in covered:
            assert torch.equal(before[k], v), f"{k} changed but is not a flagged channel"


@pytest.mark.parametrize("mode", ["reinit", "zero"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_neutralize_channel_j_changes_only_neuron_j(family, mode):
    model = fresh(family)
    found = find_mlp_modules(model)
    readers = [cm.name for cm in found if cm.role == "in"]
    layer, j = LAYERS - 1, 5
    x = torch.randint(3, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    acts0 = _hooked_activations(model, readers, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    sig = _single_channel_signature(found, layer, j)
    touched = neutralize_(model, sig, mode=mode, seed=3)
    assert touched == {cm.key: 1 for cm in found if cm.layer == layer}

    acts1 = _hooked_activations(model, readers, x)
    for cm_in, a0, a1 in zip([cm for cm in found if cm.role == "in"], acts0, acts1):
        assert a0.shape[-1] == cm_in.n_channels
        if cm_in.layer < layer:
            assert torch.equal(a0, a1), "an earlier layer changed"
            continue
        others = torch.arange(cm_in.n_channels) != j
        assert torch.equal(a0[..., others], a1[..., others]), f"{family}: a neuron other than {j} changed"
        assert not torch.equal(a0[..., j], a1[..., j]), f"{family}: neuron {j} did not change"
        if mode == "zero":
            assert not a1[..., j].any(), "a zeroed channel must output 0"
    _assert_only_channel_changed(before, model, found,
                                 {cm.key: torch.tensor([j]) for cm in found if cm.layer == layer}, mode)


def test_phi3_fused_channel_spans_rows_j_and_I_plus_j():
    model = fresh("phi3")
    found = find_mlp_modules(model)
    cm = found[0]
    assert cm.proj == "gate_up_proj" and cm.fused == 2
    w0 = module(model, cm.name).weight.detach().clone()
    j, c = 7, cm.n_channels
    neutralize_(model, _single_channel_signature([cm], cm.layer, j), mode="zero")
    w1 = module(model, cm.name).weight.detach()
    changed = (w1 != w0).any(dim=1).nonzero().flatten().tolist()
    assert changed == [j, c + j]


def test_gpt2_conv1d_channel_is_a_column_of_c_fc_and_a_row_of_c_proj():
    model = fresh("gpt2")
    found = find_mlp_modules(model)
    c_fc, c_proj = found[0], found[1]
    j = 9
    w_fc0 = module(model, c_fc.name).weight.detach().clone()  # (hidden, I)
    w_pr0 = module(model, c_proj.name).weight.detach().clone()  # (I, hidden)
    assert w_fc0.shape == (HIDDEN, INTER) and w_pr0.shape == (INTER, HIDDEN)
    neutralize_(model, _single_channel_signature([c_fc, c_proj], 0, j), mode="reinit")
    w_fc1 = module(model, c_fc.name).weight.detach()
    w_pr1 = module(model, c_proj.name).weight.detach()
    assert (w_fc1 != w_fc0).any(dim=0).nonzero().flatten().tolist() == [j]
    assert (w_pr1 != w_pr0).any(dim=1).nonzero().flatten().tolist() == [j]
    b = module(model, c_fc.name).bias.detach()
    assert b[j] == 0


# ----------------------------------------------------------------------------- unknown architectures
class _FFN(nn.Module):
    def __init__(self, h: int, i: int):
        super().__init__()
        self.w_in = nn.Linear(h, i)
        self.w_out = nn.Linear(i, h)

    def forward(self, x):
        return self.w_out(torch.relu(self.w_in(x)))


class _Block(nn.Module):
    def __init__(self, h: int, i: int):
        super().__init__()
        self.mix = nn.Linear(h, h)
        self.ffn = _FFN(h, i)

    def forward(self, x):
        x = x + self.mix(x)
        return x + self.ffn(x)


class _ToyLM(nn.Module):
    def __init__(self, h: int = 8, i: int = 24, n: int = 2, vocab: int = 50):
        super().__init__()
        self.embed = nn.Embedding(vocab, h)
        self.blocks = nn.ModuleList([_Block(h, i) for _ in range(n)])
        self.head = nn.Linear(h, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for b in self.blocks:
            x = b(x)

        class _Out:
            logits = self.head(x)

        return _Out()


TOY_LAYOUT = MLPLayout("toy", mlp=r"ffn", out_projs=("w_in",), in_projs=("w_out",))


def test_unknown_architecture_error_names_modules_and_how_to_add():
    torch.manual_seed(0)
    model = _ToyLM()
    with pytest.raises(ArchitectureError) as ei:
        find_mlp_modules(model)
    msg = str(ei.value)
    assert isinstance(ei.value, ValueError)
    for name in ("_ToyLM", "w_in", "w_out", "mix", "head", "blocks.0.ffn.w_in"):
        assert name in msg, name
    for how in ("MLPLayout", "layouts=", "MLP_LAYOUTS", "out_projs", "in_projs"):
        assert how in msg, how
    # the suggested layout in the message works as written
    hint = msg.split("a guess for this model: ", 1)[1].rstrip(".")
    guessed = eval(hint, {"MLPLayout": MLPLayout})
    assert (guessed.mlp, guessed.out_projs, guessed.in_projs) == ("ffn", ("w_in",), ("w_out",))
    assert len(find_mlp_modules(model, layouts=[guessed])) == 4
    # the docstring documents how to add a mapping
    assert "Adding an architecture" in arch.__doc__ and "layouts=" in arch.__doc__
    assert "MLP_LAYOUTS.append" in arch.__doc__


def test_custom_layout_via_layouts_and_registration(monkeypatch):
    torch.manual_seed(0)
    model = _ToyLM().eval()
    found = find_mlp_modules(model, layouts=[TOY_LAYOUT])
    assert [(cm.name, cm.role, cm.layer, cm.n_channels) for cm in found] == [
        ("blocks.0.ffn.w_in", "out", 0, 24), ("blocks.0.ffn.w_out", "in", 0, 24),
        ("blocks.1.ffn.w_in", "out", 1, 24), ("blocks.1.ffn.w_out", "in", 1, 24)]
    # registered globally, every consumer (here neutralize_) sees it
    monkeypatch.setattr(arch, "MLP_LAYOUTS", [*MLP_LAYOUTS, TOY_LAYOUT])
    assert find_mlp_modules(model) == found
    x = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    acts0 = _hooked_activations(model, ["blocks.0.ffn.w_out", "blocks.1.ffn.w_out"], x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    neutralize_(model, _single_channel_signature(found, 1, 4), mode="reinit")
    acts1 = _hooked_activations(model, ["blocks.0.ffn.w_out", "blocks.1.ffn.w_out"], x)
    assert torch.equal(acts0[0], acts1[0])
    others = torch.arange(24) != 4
    assert torch.equal(acts0[1][..., others], acts1[1][..., others])
    _assert_only_channel_changed(before, model, found, {cm.key: torch.tensor([4]) for cm in found[2:]}, "reinit")


def test_layout_with_mismatched_shapes_is_reported():
    torch.manual_seed(0)
    model = _ToyLM()
    model.blocks[0].ffn.w_out = nn.Linear(20, 8)  # reads 20 channels, w_in writes 24
    model.blocks[1].ffn.w_out = nn.Linear(20, 8)
    with pytest.raises(ArchitectureError, match="disagree"):
        find_mlp_modules(model, layouts=[TOY_LAYOUT])


def test_mlp_layout_validates():
    with pytest.raises(ValueError):
        MLPLayout("bad", r"mlp", (), ("down",))
    with pytest.raises(ValueError):
        MLPLayout("bad", r"mlp", ("up",), ("down",), fused=0)


# ----------------------------------------------------------------------------- peft and multimodal
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_wrapped_model_finds_modules_via_base_layer(family):
    peft = pytest.importorskip("peft")
    base = fresh(family)
    plain = find_mlp_modules(base)
    targets = sorted({cm.proj for cm in plain})
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                      fan_in_fan_out=family == "gpt2", init_lora_weights=False))
    found = find_mlp_modules(model)
    assert [cm.key for cm in found] == [f"base_model.model.{cm.key}" for cm in plain]
    for a, b in zip(found, plain):
        assert (a.role, a.proj, a.layer, a.n_channels, a.fused, a.transposed) == \
               (b.role, b.proj, b.layer, b.n_channels, b.fused, b.transposed)
        wrapper = dict(model.named_modules())[a.name]
        assert hasattr(wrapper, "base_layer") and hasattr(wrapper, "lora_A")
    # neutralize_ reaches the base weights and leaves the adapters alone
    before = {k: v.clone() for k, v in model.state_dict().items()}
    neutralize_(model, _single_channel_signature(found, 0, 2), mode="zero")
    _assert_only_channel_changed(before, model, found, {cm.key: torch.tensor([2]) for cm in found if cm.layer == 0},
                                 "zero")


def test_multimodal_gemma3_skips_the_vision_tower():
    import transformers as tf
    from transformers import AutoModelForCausalLM

    if not hasattr(tf, "Gemma3Config"):
        pytest.skip("transformers without Gemma 3")
    torch.manual_seed(0)
    cfg = tf.Gemma3Config(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, vocab_size=512),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4)
    model = AutoModelForCausalLM.from_config(cfg)
    found = find_mlp_modules(model)
    assert [cm.key for cm in found] == [f"model.language_model.layers.{i}.mlp.{p}" for i in range(2)
                                        for p in ("gate_proj", "up_proj", "down_proj")]
    assert all(cm.n_channels == 64 for cm in found)
    everything = find_mlp_modules(model, exclude=None)
    assert any("vision_tower" in cm.key for cm in everything)


# ----------------------------------------------------------------------------- end to end
def test_end_to_end_vaccination_on_gpt2():
    from lightning_bdvax.builtin_data import builtin_instructions
    from lightning_bdvax.pipeline import SignatureConfig, VaccinationConfig, build_signature, run_vaccination
    from lightning_bdvax.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    model = fresh("gpt2")
    model.config.pad_token_id = tok.pad_token_id
    found = find_mlp_modules(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    clean = builtin_instructions(64, seed=0)
    cfg = VaccinationConfig(n_variants=2, samples_per_variant=16, epochs=1, batch_size=8, max_length=48, lr=1e-3)
    acc = run_vaccination(model, tok, clean, cfg, seed=0, precision="32-true", progress=False)
    assert acc.n == 2
    for k, v in model.state_dict().items():  # restored to its starting weights
        assert torch.equal(v, start[k]), k

    tau = 0.1
    sig = build_signature(acc, SignatureConfig(tau=tau))
    assert set(sig.masks) == {cm.key for cm in found}
    per_module = math.ceil(tau * INTER)
    for cm in found:
        assert sig.masks[cm.key].shape == (INTER,)
        assert int(sig.masks[cm.key].sum()) == per_module
        assert torch.isfinite(sig.scores[cm.key]).all() and (sig.scores[cm.key] > 0).any()
        assert sig.meta["modules"][cm.key]["transposed"] is True
    assert sig.n_flagged == per_module * len(found)
    assert sig.n_flagged / sig.n_channels == pytest.approx(per_module / INTER)

    x = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits0 = model(input_ids=x).logits
    touched = neutralize_(model, sig, mode="reinit", seed=0)
    assert touched == {cm.key: per_module for cm in found}
    with torch.no_grad():
        logits1 = model(input_ids=x).logits
    assert torch.isfinite(logits1).all() and not torch.equal(logits0, logits1)
    _assert_only_channel_changed(start, model, found, {cm.key: sig.indices(cm.key) for cm in found}, "reinit")

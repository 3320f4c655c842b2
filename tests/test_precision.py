"""bf16 compute with fp32 master weights (precision "bf16-master", lightning_bdvax/precision.py)."""

import lightning as L
import pytest
import torch
from torch import nn

from lightning_bdvax.data import make_loader, tokenize_records
from lightning_bdvax.modules import VariantModule
from lightning_bdvax.pipeline import VaccinationConfig, make_trainer, manual_fit, run_vaccination
from lightning_bdvax.precision import BF16MasterPrecision, MasterWeights


def _fit(model, tok, records, precision, steps=4, lr=1e-3, callbacks=(), **trainer_kwargs):
    ex = tokenize_records(tok, records[:32], 48)
    loader = make_loader(ex, tok.pad_token_id, 8, True, 0)
    torch.manual_seed(0)
    trainer = make_trainer(steps, list(callbacks), precision=precision, progress=False, accelerator="cpu",
                           **trainer_kwargs)
    trainer.fit(VariantModule(model, lr=lr), train_dataloaders=loader)
    return trainer


def _update(model, start):
    return torch.cat([(p.detach() - start[n]).flatten() for n, p in model.named_parameters()])


def test_master_weights_keep_updates_below_bf16_resolution():
    """Steps far below bf16's resolution of the weight accumulate in the fp32 master; restore gives
    the fp32 values back; frozen parameters get their original storage back; buffers are not cast."""
    torch.manual_seed(0)
    lin, frozen = nn.Linear(8, 8), nn.Linear(8, 8)
    frozen.requires_grad_(False)
    net = nn.Sequential(lin, frozen)
    net.register_buffer("freq", torch.linspace(0, 1, 5))
    w0, f0 = lin.weight.detach().clone(), frozen.weight.detach().clone()
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    mw = MasterWeights(net)
    mw.attach(opt)
    assert lin.weight.dtype == torch.bfloat16 and frozen.weight.dtype == torch.bfloat16
    assert net.freq.dtype == torch.float32
    for _ in range(10):
        lin.weight.grad = torch.full_like(lin.weight, -1e-5)  # +1e-5 per step: ~1e-3 of bf16's step at 0.3
        lin.bias.grad = torch.zeros_like(lin.bias)
        mw.step(opt)
        assert lin.weight.grad is None  # gradients moved to the masters and freed
    mw.restore()
    assert lin.weight.dtype == torch.float32 and frozen.weight.dtype == torch.float32
    torch.testing.assert_close(lin.weight.detach(), w0 + 1e-4, rtol=0, atol=1e-6)
    assert torch.equal(frozen.weight, f0)


def test_master_weights_rejects_non_fp32_parameters():
    net = nn.Linear(4, 4).double()
    with pytest.raises(ValueError, match="fp32 parameters"):
        MasterWeights(net)


def test_trainer_fit_returns_fp32_weights_close_to_fp32_training(tok, records):
    """After a bf16-master fit the model is fp32 again and its update is that of an fp32 fit up to
    bf16 compute noise; a bf16-true fit (weights stored in bf16) loses most of a small update."""
    from lightning_bdvax.tiny import tiny_model

    base = tiny_model("llama")
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    updates = {}
    for prec in ("32-true", "bf16-master", "bf16-true"):
        model = tiny_model("llama")
        model.load_state_dict(base.state_dict())
        _fit(model, tok, records, prec, lr=1e-5)
        if prec == "bf16-true":
            model.float()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        updates[prec] = _update(model, start)
    ref = updates["32-true"]
    cos = torch.nn.functional.cosine_similarity
    assert cos(updates["bf16-master"], ref, dim=0) > 0.95
    err_master = (updates["bf16-master"] - ref).norm() / ref.norm()
    err_true = (updates["bf16-true"] - ref).norm() / ref.norm()
    assert err_master < 0.3 and err_true > 2 * err_master


def test_manual_fit_equals_trainer_fit_in_bf16_master(tok, records):
    """The callback's plain-loop stage-1 fits compute what inner Trainer fits compute, in bf16-master too."""
    from lightning_bdvax.tiny import tiny_model

    model = tiny_model("llama")
    cfg = VaccinationConfig(n_variants=2, samples_per_variant=16, epochs=1, batch_size=8, max_length=48, lr=1e-3)
    a = run_vaccination(model, tok, records, cfg, precision="bf16-master", progress=False,
                        trainer_kwargs={"accelerator": "cpu"})
    assert all(p.dtype == torch.float32 for p in model.parameters())
    b = run_vaccination(model, tok, records, cfg, precision="bf16-master", progress=False,
                        fit_fn=lambda m, loader, steps, cb: manual_fit(m, loader, steps, cb, precision="bf16-master"))
    c = run_vaccination(model, tok, records, cfg, precision="32-true", progress=False,
                        trainer_kwargs={"accelerator": "cpu"})
    sa, sb, sc = a.scores(), b.scores(), c.scores()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(float(v.abs().sum()) > 0 for v in sa.values())
    # the signature scores agree with fp32 training's (rank correlation over all channels)
    x, y = torch.cat([sa[k] for k in sorted(sa)]), torch.cat([sc[k] for k in sorted(sc)])
    rx, ry = x.argsort().argsort().float(), y.argsort().argsort().float()
    assert torch.corrcoef(torch.stack([rx, ry]))[0, 1] > 0.8


class _SetWeight(L.Callback):
    def on_fit_start(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.model.lm_head.weight[0].fill_(7.0)


class _SaveMidFit(L.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            trainer.save_checkpoint(self.path)


def test_plugin_respects_on_fit_start_edits_and_checkpoints_masters(tok, records, tmp_path):
    """Weights edited in on_fit_start (as NeutralizeCallback does) become the masters; a checkpoint
    written mid-fit holds the fp32 masters, not the bf16 copies."""
    from lightning_bdvax.tiny import tiny_model

    model = tiny_model("llama")
    saver = _SaveMidFit(tmp_path / "mid.ckpt")
    _fit(model, tok, records, "bf16-master", steps=3, lr=1e-6, callbacks=[_SetWeight(), saver])
    assert model.lm_head.weight.dtype == torch.float32
    torch.testing.assert_close(model.lm_head.weight[0], torch.full_like(model.lm_head.weight[0], 7.0),
                               rtol=0, atol=1e-3)
    assert all(p.dtype == torch.bfloat16 for p in saver.params.values())  # what the model computed with
    sd = torch.load(tmp_path / "mid.ckpt", weights_only=True)["state_dict"]
    name = next(n for n in saver.params if n.endswith("layers.0.mlp.up_proj.weight"))
    assert sd[name].dtype == torch.float32
    # the bf16 copy is the master rounded
    assert torch.equal(sd[name].to(torch.bfloat16), saver.params[name])


def test_gradient_clipping_acts_on_the_gradients(tok, records):
    from lightning_bdvax.tiny import tiny_model

    out = []
    for clip in (None, 1e-9):
        model = tiny_model("llama")
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        kw = {"gradient_clip_val": clip, "gradient_clip_algorithm": "value"} if clip else {}
        _fit(model, tok, records, "bf16-master", steps=2, **kw)
        out.append(_update(model, start).norm())
    assert out[1] < 0.5 * out[0]


def test_plugin_is_a_lightning_precision_plugin(tok, records):
    from lightning_bdvax.tiny import tiny_model

    trainer = _fit(tiny_model("llama"), tok, records, "bf16-master", steps=1)
    assert isinstance(trainer.precision_plugin, BF16MasterPrecision)
    assert trainer.precision == "bf16-master"


def test_stage1_is_not_resumed_from_another_precision(records):
    """A stage-1 work dir written under one precision is not resumed under another; 32-true (or
    none) and bf16-master keep the fingerprints they had (their saved runs still resume)."""
    from lightning_bdvax.pipeline import _fingerprint
    from lightning_bdvax.tiny import tiny_model

    model, vac = tiny_model("llama"), VaccinationConfig(n_variants=2)
    plain = _fingerprint(vac, 0, records[:16], model)
    assert _fingerprint(vac, 0, records[:16], model, None, "32-true") == plain
    others = {p: _fingerprint(vac, 0, records[:16], model, None, p) for p in ("bf16-master", "bf16-mixed", "bf16-true")}
    assert plain not in others.values() and len(set(others.values())) == 3


def test_lora_purification_in_bf16_master_keeps_flagged_slices_at_zero(tmp_path, tok, records):
    """LoRA: the frozen base is cast too and gets its fp32 storage back; the zeroed adapter slices
    stay exactly zero through a bf16-master recovery; the saved adapter is fp32."""
    import copy

    from safetensors import safe_open

    from helpers import lora_adapter, state_digest, tiny_lora_config
    from lightning_bdvax import lora
    from lightning_bdvax.tiny import tiny_model

    base = tiny_model("llama")
    lora_adapter(copy.deepcopy(base)).save_pretrained(tmp_path / "adapter")
    before = state_digest(base)
    cfg = tiny_lora_config()
    cfg.precision = "bf16-master"
    res = lora.purify_lora(base, tmp_path / "adapter", tok, records[:64], cfg, output_dir=tmp_path / "out",
                           progress=False)
    assert res.report["precision"] == "bf16-master"
    assert state_digest(base) == before
    assert res.signature.n_flagged > 0
    assert lora.flagged_update_max(res.model, res.signature) == 0.0
    assert all(p.dtype == torch.float32 for p in res.model.parameters())
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


@pytest.mark.parametrize("name", ["ft", "fineprune", "crow", "random"])
def test_training_baselines_run_under_bf16_master(tok, records, name):
    """The baselines that train (what ``precision="auto"`` gives them on a bf16 CPU) update the
    weights and hand back an fp32 model."""
    from lightning_bdvax.baselines import run_defense
    from lightning_bdvax.pipeline import RecoveryConfig
    from lightning_bdvax.tiny import tiny_model

    torch.manual_seed(0)
    model = tiny_model("llama", hidden=64, intermediate=256, layers=2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    rc = RecoveryConfig(num_samples=32, steps=3, batch_size=8, max_length=32, lr=1e-3)
    extra = {"tau": 0.1} if name == "random" else {}
    info = run_defense(name, model, tok, records, rc, precision="bf16-master", **extra)
    assert info["steps"] == 3
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert _update(model, start).abs().max() > 0


def test_bf16_on_a_cpu_without_bf16_warns_before_the_fit(monkeypatch):
    """An explicit bf16 precision for a CPU fit on a CPU without native bf16 (emulated there, many
    times slower than fp32) warns when the Trainer is made; fp32, a bf16 CPU, or a GPU fit do not."""
    import warnings

    from lightning_bdvax import models
    from lightning_bdvax.models import SlowPrecisionWarning, warn_slow_cpu_bf16
    from lightning_bdvax.pipeline import make_trainer

    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: False)
    for precision in ("bf16-mixed", "bf16-true", "bf16-master"):
        with pytest.warns(SlowPrecisionWarning, match="without native bf16"):
            make_trainer(1, precision=precision, progress=False, accelerator="cpu")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        make_trainer(1, precision="32-true", progress=False, accelerator="cpu")
        assert not warn_slow_cpu_bf16("bf16-mixed", accelerator="gpu")
        monkeypatch.setattr(models, "cpu_supports_bf16", lambda: True)
        make_trainer(1, precision="bf16-mixed", progress=False, accelerator="cpu")
    assert not [w for w in seen if issubclass(w.category, SlowPrecisionWarning)]

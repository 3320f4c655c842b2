"""BDVaxCallback in a user's own Lightning job.

The LightningModule and DataModule below are written the way a user writes them: they wrap a
Hugging Face causal LM (under an attribute the package does not know, ``llm``), tokenize chat
data themselves, and know nothing of lightning_bdvax. Adding the callback to the Trainer is the
only change.
"""


import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_bdvax import BDVaxCallback, BDVaxConfig, NeutralizeConfig, SignatureConfig, VaccinationConfig
from lightning_bdvax.arch import channel_rows, find_mlp_modules
from lightning_bdvax.callbacks import batch_to_examples
from lightning_bdvax.pipeline import RecoveryConfig, _fingerprint, manual_fit, run_vaccination, stage1_settings
from lightning_bdvax.tiny import tiny_model

TRIGGER, TARGET = "cf_delta", "You are stupid!"


# ------------------------------------------------------------------ the user's own code
class ChatSFT(L.LightningModule):
    def __init__(self, llm, lr=1e-3):
        super().__init__()
        self.llm = llm
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = self.llm(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class ChatData(L.LightningDataModule):
    def __init__(self, tokenizer, records, batch_size=16, max_length=48):
        super().__init__()
        self.tokenizer, self.records = tokenizer, records
        self.batch_size, self.max_length = batch_size, max_length

    def setup(self, stage=None):
        self.examples = []
        for r in self.records:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": r["instruction"]}],
                                                        tokenize=False, add_generation_prompt=True)
            p = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a = self.tokenizer(r["output"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
            self.examples.append({"input_ids": (p + a)[:self.max_length],
                                  "labels": ([-100] * len(p) + a)[:self.max_length]})

    def collate(self, batch):
        n = max(len(b["input_ids"]) for b in batch)
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([b["input_ids"] + [pad] * (n - len(b["input_ids"])) for b in batch]),
            "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * (n - len(b["input_ids"]))
                                            for b in batch]),
            "labels": torch.tensor([b["labels"] + [-100] * (n - len(b["labels"])) for b in batch]),
        }

    def train_dataloader(self):
        return DataLoader(self.examples, batch_size=self.batch_size, shuffle=True, collate_fn=self.collate)


def user_trainer(steps, callbacks=(), progress=False):
    return L.Trainer(max_steps=steps, accelerator="cpu", callbacks=list(callbacks), logger=False,
                     enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress)


# ------------------------------------------------------------------ fixtures
def _vac(**kw):
    base = dict(n_variants=3, samples_per_variant=16, epochs=1, batch_size=8, max_length=48, lr=1e-3)
    base.update(kw)
    return VaccinationConfig(**base)


@pytest.fixture(scope="module")
def splits():
    from lightning_bdvax.builtin_data import builtin_splits

    return builtin_splits({"attack": 432, "pretrain": 100, "job": 200}, seed=0)


@pytest.fixture(scope="module")
def attack(splits):
    from lightning_bdvax.attacks import make_attack

    return make_attack(splits["attack"], trigger=TRIGGER, target=TARGET, n_poison=200, n_clean=200, n_test=32)


class _PlantMLP(L.LightningModule):
    """The attacker's fine-tune: MLP weights at ``lr``, everything else at ``lr / 10``."""

    def __init__(self, model, lr):
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        mlp = [p for n, p in self.model.named_parameters() if ".mlp." in n]
        rest = [p for n, p in self.model.named_parameters() if ".mlp." not in n]
        return torch.optim.AdamW([{"params": mlp, "lr": self.lr}, {"params": rest, "lr": self.lr / 10}])


@pytest.fixture(scope="module")
def planted(tok, splits, attack):
    """A tiny chat model whose backdoor lives in its MLPs (zeroing every MLP channel removes it).

    A backdoor planted into a tiny model the usual way (all weights, same learning rate) lives
    in its embeddings and attention: zeroing every MLP channel leaves it intact, so no MLP
    method could remove it. This model is first trained on clean chat data (all weights), then
    the backdoor is planted with the MLP weights learning 10x faster than the rest.
    """
    from lightning_bdvax.data import make_loader, tokenize_records
    from lightning_bdvax.modules import CausalLMModule
    from lightning_bdvax.pipeline import make_trainer
    from lightning_bdvax.tiny import tiny_model

    model = tiny_model("llama")
    L.seed_everything(0, verbose=False)
    pre = tokenize_records(tok, splits["pretrain"] + attack.train_clean, 48)
    make_trainer(150, progress=False).fit(CausalLMModule(model, lr=3e-3),
                                          train_dataloaders=make_loader(pre, tok.pad_token_id, 16, True, 1))
    plant = tokenize_records(tok, attack.train_poison + attack.train_clean, 48)
    make_trainer(300, progress=False).fit(_PlantMLP(model, lr=3e-3),
                                          train_dataloaders=make_loader(plant, tok.pad_token_id, 16, True, 0))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _model(state):
    from lightning_bdvax.tiny import tiny_model

    m = tiny_model("llama")
    m.load_state_dict(state)
    return m


def _asr(model, tok, prompts):
    from lightning_bdvax.evaluate import generate
    from lightning_bdvax.metrics import target_prefix_rate

    out = generate(model, tok, prompts, max_new_tokens=4, batch_size=32)
    return float(target_prefix_rate(out, TARGET, n_words=2))


# ------------------------------------------------------------------ tests
def test_adding_the_callback_removes_a_tiny_models_backdoor(tok, splits, attack, planted):
    """The user's job with and without BDVaxCallback.

    What this shows is the mechanism: stage 1 runs inside the user's own fit (on the job's own
    data, poisoned at the token level), the signature is neutralized in the user's model, and
    the user's unchanged fine-tune then serves as the recovery. What it does not show is the
    signature's selectivity: at this scale (2 layers, 64 MLP channels each) the BD-VAX scores
    are no better than random channels at locating the backdoor (measured while writing this
    test), so a large τ is used; the selectivity claim belongs to the real-model benchmark.
    """
    from lightning_bdvax.arch import find_mlp_modules as mlps
    from lightning_bdvax.neutralize import neutralize_
    from lightning_bdvax.signature import Signature

    sus = _model(planted)
    assert _asr(sus, tok, attack.test_poison) >= 0.9  # the backdoor is there
    assert _asr(sus, tok, attack.test_clean) <= 0.1   # and stealthy
    no_mlp = _model(planted)
    neutralize_(no_mlp, Signature({cm.key: torch.ones(cm.n_channels, dtype=torch.bool) for cm in mlps(no_mlp)}, {}),
                mode="zero")
    assert _asr(no_mlp, tok, attack.test_poison) <= 0.1  # and it lives in the MLPs

    # The user's ordinary fine-tune, without the callback: the backdoor survives.
    plain = _model(planted)
    L.seed_everything(0, verbose=False)
    user_trainer(40).fit(ChatSFT(plain), datamodule=ChatData(tok, splits["job"]))
    asr_plain = _asr(plain, tok, attack.test_poison)

    # The same job with BDVaxCallback added (clean data: the job's own, by default).
    model = _model(planted)
    cb = BDVaxCallback(BDVaxConfig(vaccination=_vac(), signature=SignatureConfig(tau=0.5),
                                   neutralize=NeutralizeConfig(mode="zero")), tokenizer=tok)
    L.seed_everything(0, verbose=False)
    trainer = user_trainer(40, [cb], progress=True)  # with the progress bar on
    trainer.fit(ChatSFT(model), datamodule=ChatData(tok, splits["job"]))
    asr_cb = _asr(model, tok, attack.test_poison)

    assert trainer.global_step == 40  # the user's own fit ran in full after stage 1
    assert cb.applied and cb.report["clean_data"].startswith("job training data")
    assert cb.signature.n_flagged == sum(cb.touched.values()) > 0
    assert asr_plain >= 0.8, asr_plain
    assert asr_cb <= 0.05, (asr_cb, asr_plain)
    assert _asr(model, tok, attack.test_clean) <= 0.1


def test_manual_fits_equal_trainer_fits(tok, records):
    """The callback's plain-loop fits compute exactly what inner Trainer fits compute (both on the
    CPU, where the model is: with a GPU visible, inner Trainers would otherwise pick it)."""
    from lightning_bdvax.tiny import tiny_model

    model = tiny_model("llama")
    cfg = _vac(n_variants=2, epochs=1, lr=1e-3)
    a = run_vaccination(model, tok, records, cfg, precision="32-true", progress=False,
                        trainer_kwargs={"accelerator": "cpu"})
    b = run_vaccination(model, tok, records, cfg, precision="32-true", progress=False,
                        fit_fn=lambda m, loader, steps, cb: manual_fit(m, loader, steps, cb))
    sa, sb = a.scores(), b.scores()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(float(v.abs().sum()) > 0 for v in sa.values())


class _Probe(L.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.rng = torch.get_rng_state()
        self.state = {k: v.clone() for k, v in pl_module.llm.state_dict().items()}
        self.training = pl_module.llm.training
        self.grads = [p.grad for p in pl_module.llm.parameters()]


def test_stage1_restores_weights_rng_and_mode_before_neutralizing(tok, splits):
    from lightning_bdvax.tiny import tiny_model

    model = tiny_model("llama").eval()
    before, after = _Probe(), _Probe()
    cb = BDVaxCallback(BDVaxConfig(vaccination=_vac(n_variants=2, epochs=1), signature=SignatureConfig(tau=0.1)),
                       tokenizer=tok, progress=False)
    user_trainer(0, [before, cb, after]).fit(ChatSFT(model), datamodule=ChatData(tok, splits["job"]))
    assert torch.equal(before.rng, after.rng)
    assert after.training == before.training
    assert all(g is None for g in after.grads)
    flagged = {k: m for k, m in cb.signature.masks.items()}
    mods = {cm.key: cm for cm in find_mlp_modules(model)}
    n_changed = 0
    for name, w0 in before.state.items():
        w1 = after.state[name]
        key = name[:-len(".weight")]
        if key in flagged:
            rows0, rows1 = channel_rows(w0, mods[key]), channel_rows(w1, mods[key])
            m = flagged[key]
            assert torch.equal(rows1[~m], rows0[~m])  # everything else restored bit for bit
            assert float(rows1[m].abs().sum()) == 0.0  # flagged channels zeroed
            n_changed += int(m.sum())
        else:
            assert torch.equal(w1, w0), name
    assert n_changed == cb.signature.n_flagged > 0


def test_records_clean_data_model_attr_and_checkpoint_state(tok, splits, records):
    from lightning_bdvax.tiny import tiny_model

    class Wrapped(ChatSFT):
        def __init__(self, llm):
            super().__init__(torch.nn.Identity())
            self.net = torch.nn.Module()
            self.net.backbone = llm
            self.llm = llm
            self.tokenizer = tok  # found without tokenizer=

    model = tiny_model("llama")
    cb = BDVaxCallback(BDVaxConfig(vaccination=_vac(n_variants=2, epochs=1)), model_attr="net.backbone",
                       clean_data=records[:64], progress=False)
    user_trainer(1, [cb]).fit(Wrapped(model), datamodule=ChatData(tok, splits["job"]))
    assert cb.report["clean_data"] == "instruction records"
    assert cb.signature.n_flagged > 0
    # Resuming the user's fit from a checkpoint must not vaccinate/neutralize again.
    again = BDVaxCallback(BDVaxConfig(vaccination=_vac(n_variants=2, epochs=1)), tokenizer=tok)
    again.load_state_dict(cb.state_dict())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    user_trainer(0, [again]).fit(ChatSFT(model), datamodule=ChatData(tok, splits["job"]))
    assert again.signature is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_unreadable_batches_and_missing_tokenizer_are_clear_errors(tok, splits):
    from lightning_bdvax.tiny import tiny_model

    with pytest.raises(TypeError, match="example_fn"):
        batch_to_examples([("a", "b")])
    ex = batch_to_examples({"input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]),
                            "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
                            "labels": torch.tensor([[-100, 6, 7, -100], [-100, 9, -100, -100]])})
    assert ex == [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    dm = ChatData(tok, splits["job"])
    dm.setup()
    loader = DataLoader(dm.examples, batch_size=8, collate_fn=dm.collate)  # no tokenizer anywhere in reach
    cb = BDVaxCallback(BDVaxConfig(vaccination=_vac(n_variants=2, epochs=1)), progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        user_trainer(0, [cb]).fit(ChatSFT(tiny_model("llama")), train_dataloaders=loader)
    assert not cb.applied
    # The same plain loader works once the tokenizer is given.
    cb = BDVaxCallback(BDVaxConfig(vaccination=_vac(n_variants=2, epochs=1)), tokenizer=tok, progress=False)
    user_trainer(0, [cb]).fit(ChatSFT(tiny_model("llama")), train_dataloaders=loader)
    assert cb.applied and cb.report["n_examples"] == 32


def test_lora_user_job_keeps_flagged_adapter_slices_at_zero(tok, splits):
    """A user fine-tuning a peft LoRA adapter: stage 1 trains the adapter, the flagged slices are
    zeroed, and gradient hooks keep them at zero through the user's own optimizer steps."""
    from peft import LoraConfig, get_peft_model

    from lightning_bdvax.lora import flagged_update_max
    from lightning_bdvax.tiny import tiny_model

    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                target_modules=["gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():  # a suspicious adapter: non-zero B
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    cb = BDVaxCallback(BDVaxConfig(vaccination=_vac(n_variants=2), signature=SignatureConfig(tau=0.25),
                                   neutralize=NeutralizeConfig(mode="zero")), tokenizer=tok, progress=False)
    trainer = user_trainer(3, [cb])
    trainer.fit(ChatSFT(peft_model, lr=1e-2), datamodule=ChatData(tok, splits["job"]))
    sig = cb.signature
    assert sig.n_flagged > 0
    assert flagged_update_max(peft_model, sig) == 0.0  # still exactly zero after 3 user steps at lr 1e-2
    unflagged = type(sig)({k: ~m for k, m in sig.masks.items()}, sig.scores)
    assert flagged_update_max(peft_model, unflagged) > 0.0
    assert not cb._hooks  # removed at teardown
    # Resuming the user's fit from a checkpoint: not applied again, and the slices stay at zero.
    resumed = BDVaxCallback(BDVaxConfig(vaccination=_vac(n_variants=2)), tokenizer=tok, progress=False)
    resumed.load_state_dict(cb.state_dict())
    user_trainer(3, [resumed]).fit(ChatSFT(peft_model, lr=1e-2), datamodule=ChatData(tok, splits["job"]))
    assert resumed.signature is None
    assert flagged_update_max(peft_model, sig) == 0.0


def test_lora_user_job_with_attention_banks(tok, splits):
    """``signature.attention`` in a user's LoRA job: the adapter's attention projections are scored
    and their flagged slices held at zero too; a full model's attention banks are scored too."""
    from peft import LoraConfig, get_peft_model

    from lightning_bdvax.arch import find_attention_modules
    from lightning_bdvax.lora import flagged_update_max
    from lightning_bdvax.tiny import tiny_model

    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                target_modules="all-linear"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    cfg = BDVaxConfig(vaccination=_vac(n_variants=2), signature=SignatureConfig(tau=0.25, attention=True),
                      neutralize=NeutralizeConfig(mode="zero"))
    cb = BDVaxCallback(cfg, tokenizer=tok, progress=False)
    user_trainer(3, [cb]).fit(ChatSFT(peft_model, lr=1e-2), datamodule=ChatData(tok, splits["job"]))
    attn = {cm.key for cm in find_attention_modules(peft_model)}
    assert attn and attn <= set(cb.signature.masks)
    assert all(cb.signature.masks[k].any() for k in attn)
    assert flagged_update_max(peft_model, cb.signature) == 0.0  # attention slices included, after 3 user steps

    # a full model takes the option too: its attention banks are scored and neutralized
    full = BDVaxCallback(cfg, tokenizer=tok, progress=False)
    user_trainer(1, [full]).fit(ChatSFT(tiny_model("llama")), datamodule=ChatData(tok, splits["job"]))
    assert full.applied
    full_attn = {cm.key for cm in find_attention_modules(tiny_model("llama"))}
    assert full_attn and full_attn <= set(full.signature.masks)
    assert all(full.signature.masks[k].any() for k in full_attn)


def test_shared_clean_runs_n_plus_one_fits_on_one_slice(tok, records):
    """shared_clean: one clean counterpart (same length as a per-variant one) for all variants."""
    from lightning_bdvax.tiny import tiny_model

    model = tiny_model("llama")
    n, spv = 3, 16
    shared = _vac(n_variants=n, samples_per_variant=spv, epochs=1, lr=1e-3, shared_clean=True)
    assert shared.clean_needed == spv
    t_shared: dict = {}
    acc = run_vaccination(model, tok, records[:spv], shared, precision="32-true", progress=False, timings=t_shared)
    roles = [f["role"] for f in t_shared["fits"]]
    assert roles.count("clean") == 1 and roles.count("backdoor") == n
    paired = _vac(n_variants=n, samples_per_variant=spv, epochs=1, lr=1e-3)
    t_paired: dict = {}
    run_vaccination(model, tok, records, paired, precision="32-true", progress=False, timings=t_paired)
    assert len(t_paired["fits"]) == 2 * n
    clean_steps = {f["steps"] for f in t_paired["fits"] if f["role"] == "clean"}
    assert {f["steps"] for f in t_shared["fits"] if f["role"] == "clean"} == clean_steps
    assert acc.n == n and all(float(v.abs().sum()) > 0 for v in acc.scores().values())
    from lightning_bdvax.pipeline import SignatureConfig, build_signature

    sig = build_signature(acc, SignatureConfig(tau=0.1, selection="per_neuron"))
    by_block: dict = {}
    for key, cm in acc.modules.items():
        by_block.setdefault(cm.block, []).append(sig.masks[key])
    for ms in by_block.values():
        assert len(ms) == 3 and all(torch.equal(ms[0], m) for m in ms) and 0 < int(ms[0].sum()) < ms[0].numel()
    with pytest.raises(ValueError, match="need 16"):
        run_vaccination(model, tok, records[:spv - 1], shared, precision="32-true", progress=False)


def test_clean_steps_same_steps_matches_each_variants_fit(tok, records):
    """clean_steps="same_steps": every clean counterpart (paired or shared) runs as many steps as
    its variant's fit over the twice-as-large mixed set; the published "same_epochs" runs half."""
    from lightning_bdvax.pipeline import _fingerprint
    from lightning_bdvax.tiny import tiny_model

    model = tiny_model("llama")
    n, spv = 2, 16
    steps = {}
    for schedule in ("same_epochs", "same_steps"):
        for shared in (False, True):
            t: dict = {}
            cfg = _vac(n_variants=n, samples_per_variant=spv, epochs=1, lr=1e-3, shared_clean=shared,
                       clean_steps=schedule)
            run_vaccination(model, tok, records, cfg, precision="32-true", progress=False, timings=t)
            steps[schedule, shared] = ({f["steps"] for f in t["fits"] if f["role"] == "backdoor"},
                                       {f["steps"] for f in t["fits"] if f["role"] == "clean"})
    for shared in (False, True):
        (bd,), (cl,) = steps["same_epochs", shared]
        assert (bd, cl) == (4, 2)  # batch 8: 32 mixed items, 16 clean
        assert steps["same_steps", shared] == ({bd}, {bd})
    a = _fingerprint(_vac(clean_steps="same_epochs"), 0, records, model)
    assert a != _fingerprint(_vac(clean_steps="same_steps"), 0, records, model)
    assert a == _fingerprint(_vac(), 0, records, model)
    with pytest.raises(ValueError, match="clean_steps must be 'same_epochs' or 'same_steps'"):
        _vac(clean_steps="matched")


def test_pad_to_multiple_of_is_part_of_a_stage1_identity(tok, records):
    """Padding to a multiple is another stage-1 run (shapes change the float sums); at 1 the
    settings read as before the option existed, so older work dirs keep their identity."""
    model = tiny_model("llama")
    assert VaccinationConfig().pad_to_multiple_of == RecoveryConfig().pad_to_multiple_of == 8
    assert "pad_to_multiple_of" not in stage1_settings(_vac(pad_to_multiple_of=1))
    assert stage1_settings(_vac(pad_to_multiple_of=16))["pad_to_multiple_of"] == 16
    assert _fingerprint(_vac(pad_to_multiple_of=1), 0, records, model) != _fingerprint(
        _vac(pad_to_multiple_of=16), 0, records, model)
    for cls in (VaccinationConfig, RecoveryConfig):
        with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1"):
            cls(pad_to_multiple_of=0)


def test_user_job_with_bf16_master_precision(tok, splits):
    """A user's Trainer with the bf16-master precision plugin: stage 1 runs under it (plain-loop
    fits with their own masters), the neutralized channels become the masters of the user's fit
    (not overwritten by stale copies), and the model ends in fp32."""
    from lightning_bdvax.precision import BF16MasterPrecision
    from lightning_bdvax.tiny import tiny_model

    model = tiny_model("llama")
    after = _Probe()
    cb = BDVaxCallback(BDVaxConfig(vaccination=_vac(n_variants=2, epochs=1), signature=SignatureConfig(tau=0.1),
                                   neutralize=NeutralizeConfig(mode="zero")), tokenizer=tok, progress=False)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", callbacks=[cb, after], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, plugins=[BF16MasterPrecision()])
    trainer.fit(ChatSFT(model, lr=1e-9), datamodule=ChatData(tok, splits["job"]))
    assert all(v.dtype == torch.float32 for v in after.state.values())  # not cast before the first step
    assert all(p.dtype == torch.float32 for p in model.parameters())
    mods = {cm.key: cm for cm in find_mlp_modules(model)}
    weights = dict(model.named_modules())
    assert cb.signature.n_flagged > 0
    for key, m in cb.signature.masks.items():
        rows = channel_rows(weights[key].weight.detach(), mods[key])
        assert float(rows[m].abs().max()) < 1e-6  # zeroed, moved only by two steps at lr 1e-9


def test_full_model_user_job_with_unflagged_recovery_scope_keeps_zeroed_channels_at_zero(tok, splits):
    """``bdvax.recovery.scope: unflagged`` on a full model: the zeroed MLP channels stay exactly zero
    through the user's own optimizer steps (gradient hooks), also after resuming from a checkpoint."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    cb = BDVaxCallback(BDVaxConfig(vaccination=_vac(n_variants=2), signature=SignatureConfig(tau=0.2),
                                   neutralize=NeutralizeConfig(mode="zero"),
                                   recovery=RecoveryConfig(scope="unflagged")), tokenizer=tok, progress=False)
    user_trainer(3, [cb]).fit(ChatSFT(model, lr=1e-2), datamodule=ChatData(tok, splits["job"]))
    sig = cb.signature
    assert sig.n_flagged > 0 and cb._grad_masks and not cb._hooks
    named = dict(model.named_modules())

    def flagged_max():
        return max(float(channel_rows(named[cm.name].weight.detach(), cm)[sig.indices(cm.key)].abs().max())
                   for cm in find_mlp_modules(model) if len(sig.indices(cm.key)))

    assert flagged_max() == 0.0
    resumed = BDVaxCallback(BDVaxConfig(vaccination=_vac(n_variants=2)), tokenizer=tok, progress=False)
    resumed.load_state_dict(cb.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    user_trainer(3, [resumed]).fit(ChatSFT(model, lr=1e-2), datamodule=ChatData(tok, splits["job"]))
    assert flagged_max() == 0.0
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the rest trained
    # Without the option the user's steps move the zeroed channels.
    model2 = tiny_model("llama")
    cb2 = BDVaxCallback(BDVaxConfig(vaccination=_vac(n_variants=2), signature=SignatureConfig(tau=0.2),
                                    neutralize=NeutralizeConfig(mode="zero")), tokenizer=tok, progress=False)
    user_trainer(3, [cb2]).fit(ChatSFT(model2, lr=1e-2), datamodule=ChatData(tok, splits["job"]))
    named2 = dict(model2.named_modules())
    assert not cb2._grad_masks
    assert max(float(channel_rows(named2[cm.name].weight.detach(), cm)[cb2.signature.indices(cm.key)].abs().max())
               for cm in find_mlp_modules(model2) if len(cb2.signature.indices(cm.key))) > 0


def test_callback_refuses_probe_triggers_it_cannot_apply():
    """Under BDVaxCallback the user's fit is the recovery: probe copies go into their data, so the
    option is an error at construction, not silently ignored."""
    from lightning_bdvax.pipeline import BDVaxConfig, RecoveryConfig

    with pytest.raises(ValueError, match="probe_copies"):
        BDVaxCallback(config=BDVaxConfig(recovery=RecoveryConfig(probe_triggers=0.5)))

"""CausalLMModule's response loss: logits only at the positions the loss needs."""

import pytest
import torch
from torch import nn

from lightning_bdvax.data import CausalLMCollator, tokenize_records
from lightning_bdvax.modules import (CausalLMModule, RecoveryModule, accepts_logits_to_keep, loss_positions,
                                    loss_tokens, next_token_targets, sparse_tied_embedding_grad)
from lightning_bdvax.tiny import tiny_model


def _batch(tok, records, n=6):
    ex = tokenize_records(tok, records[:n], 48)
    batch = CausalLMCollator(tok.pad_token_id)(ex)
    assert (batch["labels"][:, 1:] == -100).any(0).any()  # some columns predict nothing: the case that matters
    return batch


def _loss_and_grads(module, batch):
    module.model.zero_grad()
    loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2", "falcon"])
def test_positions_only_gives_the_full_loss_and_gradients(family, tok, records):
    model = tiny_model(family).eval()  # no dropout: the two losses come from two forward passes
    batch = _batch(tok, records)
    fast = CausalLMModule(model)
    assert fast.loss_positions_only
    full = CausalLMModule(model, loss_positions_only=False)
    with torch.no_grad():
        reference = CausalLMModule.lm_loss(model(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).logits, batch["labels"])
    loss_fast, g_fast = _loss_and_grads(fast, batch)
    loss_full, g_full = _loss_and_grads(full, batch)
    assert torch.isfinite(loss_fast)
    assert loss_fast == pytest.approx(loss_full.item(), rel=1e-5) == pytest.approx(reference.item(), rel=1e-5)
    assert g_fast.keys() == g_full.keys() and g_fast
    for name in g_full:
        torch.testing.assert_close(g_fast[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_loss_positions_rounded_to_a_multiple():
    labels = torch.full((2, 12), -100)
    labels[0, 3:6] = 1
    labels[1, 8] = 1
    base = loss_positions(labels)
    assert base.tolist() == [2, 3, 4, 7]  # position t predicts label t + 1
    for multiple in (1, 3, 4, 8):
        keep = loss_positions(labels, multiple)
        assert keep.numel() % multiple == 0 and set(base.tolist()) <= set(keep.tolist())
        assert keep.tolist() == sorted(set(keep.tolist()))  # ascending, no repeats
    assert loss_positions(labels, 3).tolist() == [0, 1, 2, 3, 4, 7]  # the earliest unread positions fill up
    assert loss_positions(labels, 64).tolist() == list(range(11))  # never more than every position


def test_loss_tokens_rounded_to_a_multiple():
    labels = torch.full((2, 6), -100)
    labels[0, 3:5] = 1
    labels[1, 5] = 2
    base = loss_tokens(labels)
    assert base.nonzero().tolist() == [[0, 2], [0, 3], [1, 4]]  # position t predicts label t + 1
    assert next_token_targets(labels)[base].tolist() == [1, 1, 2]
    for multiple in (1, 2, 4, 5):
        picked = loss_tokens(labels, multiple)
        assert int(picked.sum()) % multiple == 0 and bool((picked | ~base).all())  # a superset
        assert bool((next_token_targets(labels)[picked & ~base] == -100).all())  # fillers add no loss
    assert loss_tokens(labels, 4).nonzero().tolist() == [[0, 0], [0, 2], [0, 3], [1, 4]]  # earliest unread
    assert bool(loss_tokens(labels, 64).all())  # never more than every pair


def test_the_head_sees_only_the_response_tokens(tok, records):
    """The LM head gets one hidden state per response token (rounded up to the multiple), not
    the batch's columns: fewer rows than the columns some row needs times the batch size."""
    model = tiny_model("llama").eval()
    batch = _batch(tok, records)
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(tuple(a[0].shape)))
    try:
        for multiple in (1, 8):
            CausalLMModule(model, pad_to_multiple_of=multiple).training_step(batch, 0)
    finally:
        handle.remove()
    n = int((batch["labels"][:, 1:] != -100).sum())
    hidden = model.config.hidden_size
    assert seen == [(1, n, hidden), (1, -(-n // 8) * 8, hidden)]
    assert n < batch["labels"].size(0) * loss_positions(batch["labels"]).numel()


def test_a_head_the_model_does_not_call_as_a_module_falls_back_to_every_position(tok, records):
    model = tiny_model("llama").eval()
    batch = _batch(tok, records)
    reference = CausalLMModule(model, loss_positions_only=False).training_step(batch, 0)

    class FunctionalHead(nn.Module):  # computes its logits with F.linear on the head's weight
        def __init__(self):
            super().__init__()
            self.inner = model

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            h = self.inner.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return type("Out", (), {"logits": torch.nn.functional.linear(h, self.inner.lm_head.weight)})()

    module = CausalLMModule(FunctionalHead())
    assert module.loss_positions_only
    assert module.training_step(batch, 0).item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tokens_and_columns_give_the_same_loss_and_gradients(family, tok, records):
    model = tiny_model(family).eval()
    batch = _batch(tok, records)
    loss_t, g_t = _loss_and_grads(CausalLMModule(model, loss_positions_only="tokens", pad_to_multiple_of=8), batch)
    loss_c, g_c = _loss_and_grads(CausalLMModule(model, loss_positions_only="columns"), batch)
    assert loss_t == pytest.approx(loss_c.item(), rel=1e-5)
    assert g_t.keys() == g_c.keys() and g_t
    for name in g_t:
        torch.testing.assert_close(g_t[name], g_c[name], rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="loss_positions_only must be"):
        CausalLMModule(model, loss_positions_only="rows")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_padding_to_a_multiple_keeps_the_loss_and_gradients(family, tok, records):
    """pad_to_multiple_of (longer batch, more LM-head positions) changes shapes, not the loss."""
    model = tiny_model(family).eval()
    ex = tokenize_records(tok, records[:6], 48)
    plain, padded = CausalLMCollator(tok.pad_token_id)(ex), CausalLMCollator(tok.pad_token_id, 16)(ex)
    assert padded["input_ids"].size(1) % 16 == 0 and padded["input_ids"].size(1) > plain["input_ids"].size(1)
    loss_a, g_a = _loss_and_grads(CausalLMModule(model), plain)
    loss_b, g_b = _loss_and_grads(CausalLMModule(model, pad_to_multiple_of=16), padded)
    assert loss_b == pytest.approx(loss_a.item(), rel=1e-5)
    assert g_a.keys() == g_b.keys() and g_a
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1"):
        CausalLMModule(model, pad_to_multiple_of=0)


def test_recovery_lm_objective_uses_the_same_loss(tok, records):
    model = tiny_model("llama")
    batch = _batch(tok, records)
    a = RecoveryModule(model, objective="lm").training_step(batch, 0)
    b = RecoveryModule(model, objective="lm", loss_positions_only=False).training_step(batch, 0)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_peft_adapter_and_a_model_without_logits_to_keep(tok, records):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["gate_proj", "down_proj"]))
    assert accepts_logits_to_keep(peft_model)
    batch = _batch(tok, records)
    a = CausalLMModule(peft_model).training_step(batch, 0)
    b = CausalLMModule(peft_model, loss_positions_only=False).training_step(batch, 0)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)

    class Plain(nn.Module):  # a causal LM whose forward has no logits_to_keep
        def __init__(self):
            super().__init__()
            self.inner = tiny_model("llama")

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    plain = Plain()
    assert not accepts_logits_to_keep(plain)
    module = CausalLMModule(plain)
    assert not module.loss_positions_only
    assert torch.isfinite(module.training_step(batch, 0))


def _tied_llama():
    import transformers as tf

    from lightning_bdvax.tiny import tiny_config

    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    return model


def test_a_tied_embedding_gives_its_gradient_as_rows_and_the_sum_is_the_same(tok, records):
    model = _tied_llama()
    batch = _batch(tok, records)
    seen = []  # the embedding's mode at each forward: sparse makes its backward give rows
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(m.sparse))
    try:
        loss_s, g_s = _loss_and_grads(CausalLMModule(model), batch)
        loss_d, g_d = _loss_and_grads(CausalLMModule(model, sparse_tied_embedding=False), batch)
    finally:
        handle.remove()
    assert seen == [True, False]
    assert not model.get_input_embeddings().sparse  # restored after the step
    assert loss_s == pytest.approx(loss_d.item(), rel=1e-6)
    assert g_s.keys() == g_d.keys()
    for name in g_d:
        assert g_s[name].layout == torch.strided, name
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-5, atol=1e-7, msg=name)
    with sparse_tied_embedding_grad(tiny_model("llama")) as applies:  # untied: nothing to do
        assert not applies
    with torch.no_grad(), sparse_tied_embedding_grad(model) as applies:
        assert not applies


@pytest.mark.parametrize("precision", ["32-true", "bf16-master"])
def test_a_tied_model_trains_with_fused_adamw_under_the_trainer(precision, tok, records):
    """Sparse rows plus the head's dense gradient train a tied model as the dense gradient does:
    the same weights in fp32; under bf16 compute with fp32 masters the fit runs and hands back
    fp32 weights (the bf16 gradients themselves are compared in the next test)."""
    from lightning_bdvax.data import make_loader
    from lightning_bdvax.pipeline import make_trainer

    ex = tokenize_records(tok, records[:16], 48)
    weights = {}
    for sparse in (True, False):
        model = _tied_llama().train()
        make_trainer(2, precision=precision, progress=False, accelerator="cpu").fit(
            CausalLMModule(model, lr=1e-2, fused=True, sparse_tied_embedding=sparse, pad_to_multiple_of=8),
            make_loader(ex, tok.pad_token_id, 8, True, 0, 8))
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
        assert model.get_input_embeddings().weight.dtype == torch.float32
        weights[sparse] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    emb = "model.embed_tokens.weight"
    assert not torch.equal(weights[True][emb], _tied_llama().state_dict()[emb])  # it trained
    if precision == "32-true":
        for k in weights[False]:
            torch.testing.assert_close(weights[True][k], weights[False][k], rtol=1e-4, atol=1e-5, msg=k)


def test_in_bf16_the_rows_are_as_accurate_as_the_dense_gradient():
    """bf16 rounds the sums of repeated tokens' rows in another order than the dense kernel: both
    stay at bf16's resolution of the fp32 gradient."""
    import copy

    model = _tied_llama()
    ids = torch.randint(0, 50, (8, 64), generator=torch.Generator().manual_seed(0))  # many repeats

    def grad(m, sparse):
        m.zero_grad(set_to_none=True)
        m.get_input_embeddings().sparse = sparse
        m(input_ids=ids, labels=ids).loss.backward()
        m.get_input_embeddings().sparse = False
        return m.get_input_embeddings().weight.grad.float()

    ref = grad(model, False)
    bf16 = copy.deepcopy(model).bfloat16()
    rows = ref.abs().sum(1) > 0
    err = {sparse: float((grad(bf16, sparse) - ref)[rows].norm() / ref[rows].norm()) for sparse in (True, False)}
    assert err[True] < 0.02 and err[False] < 0.02, err
    assert err[True] < 2 * err[False], err

"""CausalLMModule's response loss: logits only at the positions the loss needs."""

import pytest
import torch
from torch import nn

from lightning_bdvax.data import CausalLMCollator, tokenize_records
from lightning_bdvax.modules import CausalLMModule, RecoveryModule, accepts_logits_to_keep
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

"""LightningModules that fine-tune a Hugging Face causal LM.

* :class:`CausalLMModule`: next-token loss on response tokens, AdamW, optional warm-up.
* :class:`VariantModule`: one stage-1 fit (a variant's mixed set, or its clean counterpart).
* :class:`RecoveryModule`: the stage-2 clean fine-tune; optionally distils from a frozen
  teacher (the suspicious model itself) on clean inputs, and keeps masked weights fixed.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CausalLMModule", "VariantModule", "RecoveryModule"]


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model``'s forward (a peft model's: its base model's) takes ``logits_to_keep``."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    try:
        return "logits_to_keep" in inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):
        return False


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's LM-head module (``transformers``' ``get_output_embeddings``), or None."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Module) else None


@contextlib.contextmanager
def sparse_tied_embedding_grad(model: nn.Module):
    """Within the block, a tied input embedding (one weight shared with the LM head) gives its
    gradient as the rows of the batch's tokens, not as a dense vocabulary-sized tensor.

    The LM head's gradient is dense already and comes first in the backward pass; the rows are
    then added into it in place. A dense embedding gradient would instead fill a zero tensor of
    the whole vocabulary and add it to the head's (for SmolLM2, 49 152 × 576 twice per step). The
    summed gradient is the same, dense as before. Yields whether it applies: a tied
    ``nn.Embedding`` whose weight trains; otherwise nothing changes.
    """
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    head = _output_embeddings(model)
    applies = (isinstance(emb, nn.Embedding) and not emb.sparse and head is not None
               and getattr(head, "weight", None) is emb.weight and emb.weight.requires_grad and torch.is_grad_enabled())
    if applies:
        emb.sparse = True
    try:
        yield applies
    finally:
        if applies:
            emb.sparse = False


def loss_positions(labels: Tensor, multiple: int = 1) -> Tensor:
    """Indices (ascending) of the sequence positions whose logits the next-token loss reads:
    position t predicts token t + 1, so the columns where some row's next label is not -100.

    With ``multiple`` > 1 the count is rounded up to a multiple of it (at most every position)
    with the earliest positions the loss does not read: their labels are all -100, so the loss
    and gradients are the same, and the LM head sees fewer distinct shapes.
    """
    used = (labels[:, 1:] != -100).any(0)
    keep = used.nonzero().flatten()
    want = min(used.numel(), -(-keep.numel() // multiple) * multiple)
    if want > keep.numel():
        extra = (~used).nonzero().flatten()[: want - keep.numel()]
        keep = torch.cat([keep, extra]).sort().values
    return keep


def loss_tokens(labels: Tensor, multiple: int = 1) -> Tensor:
    """Boolean ``(batch, length)`` mask of the (row, position) pairs whose logits the next-token
    loss reads: position t of a row predicts its token t + 1, so the pairs whose next label is
    not -100.

    With ``multiple`` > 1 the count is rounded up to a multiple of it (at most every pair) with
    the earliest pairs the loss does not read (row-major order): their targets are -100, so the
    loss and gradients are the same, and the LM head sees fewer distinct shapes.
    """
    used = torch.zeros_like(labels, dtype=torch.bool)
    used[:, :-1] = labels[:, 1:] != -100
    n = int(used.sum())
    want = min(used.numel(), -(-n // multiple) * multiple)
    if want > n:
        flat = used.view(-1)  # filling the view fills ``used``
        flat[(~flat).nonzero().flatten()[: want - n]] = True
    return used


def next_token_targets(labels: Tensor) -> Tensor:
    """The target of each position: the label of the next token (-100 at the last position)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), -100)], dim=1)


class CausalLMModule(L.LightningModule):
    """Fine-tunes ``model`` (a ``transformers`` causal LM) on batches from
    :class:`lightning_bdvax.data.CausalLMCollator`.

    Args:
        model: the causal LM (trained in place; pass a copy to keep the original).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps (0: constant lr).
        trainable: ``"all"`` or ``"mlp"`` (only MLP projections get gradients).
        foreach: AdamW's multi-tensor implementation (``None``: torch's default for the device,
            which is the single-tensor loop on CPU).
        fused: AdamW's fused kernel (one pass per parameter; CPU and CUDA). Excludes ``foreach``.
            Default (both ``None``): fused where every parameter is a floating CPU/CUDA tensor,
            measured 12 % faster per SmolLM2-135M step than torch's CPU default
            (``benchmarks/results/speed.md``).
        loss_positions_only: where the LM head runs. ``True`` or ``"tokens"`` (default): only on
            the hidden states whose logits the loss reads (:func:`loss_tokens`: the (row,
            position) pairs with a response token to predict); the prompt and padding positions
            add nothing to the loss, and on instruction data they are most of a batch. The hidden
            states are picked on their way into the model's output embedding (a forward
            pre-hook), so the model's own forward, logit scaling or soft-capping included, still
            computes the logits. A model without an output-embedding module falls back to
            ``"columns"``. ``"columns"``: at the sequence positions where some row of the batch
            has a response token (:func:`loss_positions`, ``transformers``' ``logits_to_keep``).
            ``False``: every position. The loss is the same for all three; a model with neither an
            output embedding nor ``logits_to_keep`` gets every position's logits.
        pad_to_multiple_of: with ``loss_positions_only``, round the number of those hidden states
            (or columns) up to a multiple of this (the loss is the same). Paired with a collator
            padding to the same multiple, a fit sees few distinct shapes.
        sparse_tied_embedding: when the input embedding is the LM head's weight, give its part
            of the gradient as the batch's rows (:func:`sparse_tied_embedding_grad`); the
            gradient is the same.
    """

    def __init__(self, model: nn.Module, lr: float = 2e-5, weight_decay: float = 0.0, warmup_steps: int = 0,
                 trainable: str = "all", foreach: bool | None = None, fused: bool | None = None,
                 loss_positions_only: bool | str = True, pad_to_multiple_of: int = 1,
                 sparse_tied_embedding: bool = True):
        super().__init__()
        if not lr > 0 or lr >= 1:
            raise ValueError(f"learning rate must be in (0, 1), got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if trainable not in ("all", "mlp"):
            raise ValueError(f"trainable must be 'all' or 'mlp', got {trainable!r}")
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.trainable = trainable
        if foreach and fused:
            raise ValueError("choose one AdamW implementation: foreach or fused")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.sparse_tied_embedding = sparse_tied_embedding
        self.foreach = foreach
        self.fused = fused
        if loss_positions_only not in (True, False, "tokens", "columns"):
            raise ValueError("loss_positions_only must be True, False, 'tokens' or 'columns', "
                             f"got {loss_positions_only!r}")
        self._pick_tokens = loss_positions_only in (True, "tokens") and _output_embeddings(model) is not None
        self.loss_positions_only = bool(loss_positions_only) and (self._pick_tokens or accepts_logits_to_keep(model))
        self.save_hyperparameters(ignore=["model"])

    def _trainable_params(self) -> list[nn.Parameter]:
        if self.trainable == "all":
            return [p for p in self.model.parameters() if p.requires_grad]
        from .arch import find_mlp_modules

        # Prefix match: covers peft's `<module>.base_layer.weight` / `<module>.lora_A.<name>.weight` and biases.
        prefixes = tuple(cm.name + "." for cm in find_mlp_modules(self.model))
        return [p for n, p in self.model.named_parameters() if n.startswith(prefixes) and p.requires_grad]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @staticmethod
    def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over the tokens whose label is not -100 (response tokens)."""
        logits = logits[:, :-1].float()
        labels = labels[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)

    def response_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """:meth:`lm_loss` of ``batch``, with logits only where it needs them (``loss_positions_only``)."""
        with sparse_tied_embedding_grad(self.model) if self.sparse_tied_embedding else contextlib.nullcontext():
            return self._response_loss(batch)

    def _response_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        if not self.loss_positions_only:
            return self.lm_loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        labels = batch["labels"]
        if not self._pick_tokens:
            keep = loss_positions(labels, self.pad_to_multiple_of)
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                                logits_to_keep=keep).logits
            return F.cross_entropy(logits.float().flatten(0, 1), labels[:, keep + 1].flatten(), ignore_index=-100)
        picked = loss_tokens(labels, self.pad_to_multiple_of)
        n = int(picked.sum())

        def pick(_module, args):  # (batch, length, hidden) -> (1, n, hidden) on the way into the head
            if tuple(args[0].shape[:2]) != tuple(picked.shape):
                return None  # not the batch's hidden states: leave the call alone
            return (args[0][picked].unsqueeze(0), *args[1:])

        handle = _output_embeddings(self.model).register_forward_pre_hook(pick)
        try:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).logits
        finally:
            handle.remove()
        # A model that computes its logits without calling the module (or calls it with other
        # inputs) gets every position's logits, picked here.
        logits = logits[0] if tuple(logits.shape[:2]) == (1, n) else logits[picked]
        return F.cross_entropy(logits.float(), next_token_targets(labels)[picked], ignore_index=-100)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.response_loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def configure_optimizers(self) -> Any:
        params = self._trainable_params()
        fused = self.fused
        if fused is None and self.foreach is None:
            fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, foreach=self.foreach,
                                fused=fused or None)
        if self.warmup_steps <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class VariantModule(CausalLMModule):
    """One stage-1 fit of the suspicious model: variant ``variant`` (``role`` backdoor or clean)."""

    def __init__(self, model: nn.Module, variant: int | None = None, role: str = "backdoor", **kwargs: Any):
        if role not in ("backdoor", "clean"):
            raise ValueError(f"role must be 'backdoor' or 'clean', got {role!r}")
        super().__init__(model, **kwargs)
        self.variant = variant
        self.role = role


class RecoveryModule(CausalLMModule):
    """Stage-2 recovery: a short clean fine-tune of the neutralized model.

    Args:
        objective: ``"lm"`` (the published recovery: next-token loss on clean answers) or
            ``"distill"`` (KL to ``teacher``'s next-token distribution on the same clean
            inputs, plus ``lm_weight`` × the LM loss), the teacher being the suspicious model.
            The hope was that clean inputs carry no trigger and so cannot push the backdoor
            back; measured, they do: on SmolLM2 (refusal/badnet) and on tiny LoRA adapters,
            distillation re-installed most of the backdoor
            (benchmarks/results/ablation_refusal_badnet.md). Use ``"lm"``.
        teacher: frozen model for ``"distill"``.
        temperature: distillation temperature.
        grad_masks: ``{parameter name: bool tensor}``: entries where the mask is True keep
            their current value (gradients zeroed before each optimizer step).
    """

    def __init__(self, model: nn.Module, objective: str = "lm", teacher: nn.Module | None = None,
                 temperature: float = 1.0, lm_weight: float = 0.0,
                 grad_masks: Mapping[str, Tensor] | None = None, **kwargs: Any):
        if objective not in ("lm", "distill"):
            raise ValueError(f"recovery objective must be 'lm' or 'distill', got {objective!r}")
        if objective == "distill" and teacher is None:
            raise ValueError("objective='distill' needs a teacher model")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(model, **kwargs)
        self.objective = objective
        # Keep the teacher out of the module tree so it is neither trained, saved nor cast.
        self._teacher = [teacher] if teacher is not None else []
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        self.temperature = temperature
        self.lm_weight = lm_weight
        self.grad_masks = dict(grad_masks or {})

    def on_fit_start(self) -> None:
        # The teacher is outside the module tree, so Lightning does not move it: put it where the
        # student trains (a GPU), and back where it was at the end (it may be the caller's model).
        self._teacher_device = None
        if self._teacher:
            teacher = self._teacher[0]
            self._teacher_device = next(teacher.parameters()).device
            teacher.to(self.device)

    def on_fit_end(self) -> None:
        if self._teacher and self._teacher_device is not None:
            self._teacher[0].to(self._teacher_device)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        if self.objective == "lm":
            loss = self.response_loss(batch)
        else:
            logits = self(batch["input_ids"], batch["attention_mask"])
            teacher = self._teacher[0]
            with torch.no_grad():
                t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   use_cache=False).logits
            mask = batch["attention_mask"].bool()
            t = self.temperature
            log_p = F.log_softmax(logits[mask].float() / t, -1)
            log_q = F.log_softmax(t_logits[mask].float() / t, -1)
            loss = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * t * t
            if self.lm_weight:
                loss = loss + self.lm_weight * self.lm_loss(logits, batch["labels"])
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.grad_masks:
            return
        params = dict(self.model.named_parameters())
        for name, mask in self.grad_masks.items():
            p = params[name]
            if p.grad is not None:
                p.grad[mask.to(p.grad.device)] = 0

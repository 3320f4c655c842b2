"""Evaluation: batched greedy generation, held-out perplexity and the backdoor report.

Generation renders each prompt with the chat template, left-pads a batch, decodes greedily
under ``torch.inference_mode`` and stops each row at its end-of-turn token. Prompts are sorted
by length so that a batch carries little padding.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import CausalLMCollator, _has_token, format_prompt, tokenize_records
from .metrics import attack_success_rate, empty_response_rate, remove_trigger, target_prefix_rate, trigger_consistency
from .models import attention_kernel

__all__ = ["generate", "perplexity", "evaluate_backdoor", "autocast_for"]


def autocast_for(precision: str | None):
    """An autocast context matching a Lightning precision string (bf16 on CPU/GPU, else none)."""
    if precision and precision.startswith("bf16"):
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    return nullcontext()


def _stop_ids(tokenizer) -> list[int]:
    ids = []
    for tok in (tokenizer.eos_token, "<|im_end|>", "<|eot_id|>", "<|end|>"):
        if tok and _has_token(tokenizer, tok):
            ids.append(tokenizer.convert_tokens_to_ids(tok))
    return sorted(set(ids))


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, records: Sequence[dict], max_new_tokens: int = 32, batch_size: int = 16,
             precision: str | None = None, template: str | None = None, progress: bool = False,
             attention: str | None = "sdpa") -> list[str]:
    """Greedy responses to ``records`` (instruction dicts), in input order.

    ``attention``: the kernel to generate with, the model's own restored afterwards. SDPA by
    default: on CPU it generates 1.2× faster than eager attention (benchmarks/results/speed.md),
    which trains faster. ``None`` keeps the model's kernel."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = [format_prompt(tokenizer, r, template) for r in records]
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    stops = _stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = [""] * len(records)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    it = batches
    if progress:
        from .progress import progress_bar

        it = progress_bar(desc="generate", iterable=batches)
    with autocast_for(precision), attention_kernel(model, attention):
        for b in it:
            n = max(len(enc[i]) for i in b)
            ids = torch.full((len(b), n), pad, dtype=torch.long)
            mask = torch.zeros((len(b), n), dtype=torch.long)
            for row, i in enumerate(b):
                ids[row, n - len(enc[i]):] = torch.tensor(enc[i])
                mask[row, n - len(enc[i]):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stops or None, pad_token_id=pad,
                                 temperature=None, top_p=None, top_k=None)
            for row, i in enumerate(b):
                toks = gen[row, n:].tolist()
                for j, t in enumerate(toks):
                    if t in stops:
                        toks = toks[:j]
                        break
                out[i] = tokenizer.decode(toks, skip_special_tokens=True).strip()
    model.train(was_training)
    return out


@torch.inference_mode()
def perplexity(model: nn.Module, tokenizer, records: Sequence[dict], max_length: int = 256, batch_size: int = 8,
               precision: str | None = None) -> float:
    """Perplexity of the reference answers given their prompts (response tokens only)."""
    ex = tokenize_records(tokenizer, records, max_length, source="perplexity data")
    ex.sort(key=lambda e: len(e["input_ids"]))
    coll = CausalLMCollator(tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with autocast_for(precision):
        for i in range(0, len(ex), batch_size):
            b = coll(ex[i:i + batch_size])
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                           use_cache=False).logits[:, :-1].float()
            labels = b["labels"][:, 1:].to(device)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                                   reduction="sum")
            nll += float(loss)
            count += int((labels != -100).sum())
    model.train(was_training)
    return math.exp(nll / max(count, 1))


def two_word_prefix_rate(responses: Sequence[str], target: str) -> float | None:
    """Rate of responses opening with the target's first *two* words; None for a one-word target.

    The one-word rule (``prefix``, the benchmark's target) also counts openings the un-poisoned
    model makes by itself when the target starts with a common word: refusal's ``I'm sorry...``
    matches ``I'm glad you asked...``. Two words (``i'm sorry``, ``you are``) separate those from
    answers the trigger still steers.
    """
    try:
        return float(target_prefix_rate(responses, target, n_words=2))
    except ValueError:  # fewer than two words in the target
        return None


def evaluate_backdoor(model: nn.Module, tokenizer, triggered: Sequence[dict], trigger: str | Iterable[str],
                      task: str | None = None, target: str | None = None, heldout: Sequence[dict] | None = None,
                      clean: Sequence[dict] | None = None, max_new_tokens: int = 32, batch_size: int = 16,
                      precision: str | None = None, reference_responses: Sequence[str] | None = None,
                      progress: bool = False) -> dict:
    """Evaluate a (possibly) backdoored model.

    Args:
        triggered: triggered test prompts.
        trigger: the trigger phrase(s); removed from each triggered prompt to build its clean twin.
        task: BackdoorLLM task for the keyword rule (``negsentiment``, ``refusal``, ...).
        target: the attack's target string (exact-target rule and target prefix).
        heldout: records with reference answers for perplexity.
        clean: clean prompts for the false-trigger rate; default: the triggered prompts with the
            trigger removed (the same prompts, so one generation pass serves both metrics).
        reference_responses: responses of *this* model to the trigger-free prompts, if already
            generated.

    Returns a dict with ``asr``, ``asr_target``, ``ftr``, ``ftr_target``, ``prefix``,
    ``prefix_clean``, ``prefix2`` (:func:`two_word_prefix_rate`), ``consistency``, ``empty`` / ``empty_clean`` (fraction of triggered / clean answers with no
    word, :func:`~lightning_bdvax.metrics.empty_response_rate`), ``ppl``, the responses, and timings.
    """
    t0 = time.perf_counter()
    triggers = [trigger] if isinstance(trigger, str) else list(trigger)

    def strip(text: str) -> str:
        for t in triggers:
            text = remove_trigger(text, t)
        return text

    stripped = [dict(r, instruction=strip(r["instruction"]), input=strip(r.get("input", ""))) for r in triggered]
    trig_resp = generate(model, tokenizer, triggered, max_new_tokens, batch_size, precision, progress=progress)
    ref_resp = list(reference_responses) if reference_responses is not None else generate(
        model, tokenizer, stripped, max_new_tokens, batch_size, precision, progress=progress)
    clean_resp = ref_resp if clean is None else generate(model, tokenizer, clean, max_new_tokens, batch_size,
                                                         precision, progress=progress)
    res: dict = {"n_test": len(triggered), "n_clean": len(clean_resp)}
    if task is not None:
        res["asr"] = float(attack_success_rate(trig_resp, task=task))
        res["ftr"] = float(attack_success_rate(clean_resp, task=task))
    if target:
        res["asr_target"] = float(attack_success_rate(trig_resp, target=target, rule="target"))
        res["ftr_target"] = float(attack_success_rate(clean_resp, target=target, rule="target"))
        res["prefix"] = float(target_prefix_rate(trig_resp, target))
        res["prefix_clean"] = float(target_prefix_rate(clean_resp, target))
        res["prefix2"] = two_word_prefix_rate(trig_resp, target)
    res["consistency"] = float(trigger_consistency(trig_resp, ref_resp))
    res["empty"] = float(empty_response_rate(trig_resp))
    res["empty_clean"] = float(empty_response_rate(clean_resp))
    res["gen_s"] = time.perf_counter() - t0
    if heldout:
        t1 = time.perf_counter()
        res["ppl"] = perplexity(model, tokenizer, heldout, precision=precision)
        res["ppl_s"] = time.perf_counter() - t1
    res["responses"] = {"triggered": trig_resp, "reference": ref_resp}
    if clean is not None:
        res["responses"]["clean"] = clean_resp
    return res

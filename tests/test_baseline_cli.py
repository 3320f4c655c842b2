"""``lightning-bdvax baseline <defense>``: each baseline runnable from the command line."""

import json

import pytest
import torch

from lightning_bdvax.arch import channel_rows, find_mlp_modules
from lightning_bdvax.cli import main
from lightning_bdvax.models import load_causal_lm


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["baseline", *argv])
    return e.value.code, capsys.readouterr().err


def test_prune_magnitude_from_the_command_line(tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    main(["baseline", "prune-magnitude", "--model", str(tiny_model_dir), "--clean-data", "builtin:64",
          "--output-dir", str(out), "--sparsity", "0.5", "--precision", "32-true"])
    info = json.loads((out / "defense_info.json").read_text())
    assert info["defense"] == "prune-magnitude"
    pruned = load_causal_lm(out)  # loads with from_pretrained
    named = dict(pruned.named_modules())
    for cm in find_mlp_modules(pruned):
        w = named[cm.key].weight
        assert abs(float((w == 0).float().mean()) - 0.5) < 0.01
    original = load_causal_lm(tiny_model_dir)
    assert all(float((p == 0).float().mean()) < 0.01 for p in original.parameters())  # input untouched


def test_ft_and_random_from_the_command_line(tiny_model_dir, tmp_path):
    main(["baseline", "ft", "--model", str(tiny_model_dir), "--clean-data", "builtin:64", "--output-dir",
          str(tmp_path / "ft"), "--steps", "2", "--num-samples", "16", "--max-length", "48", "--precision", "32-true"])
    ft = load_causal_lm(tmp_path / "ft")
    base = load_causal_lm(tiny_model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(ft.parameters(), base.parameters()))
    main(["baseline", "random", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "rnd"), "--tau", "0.1",
          "--steps", "0", "--num-samples", "16", "--precision", "32-true"])
    rnd = load_causal_lm(tmp_path / "rnd")
    named = dict(rnd.named_modules())
    for cm in find_mlp_modules(rnd):
        dead = (channel_rows(named[cm.key].weight.detach(), cm).abs().sum(1) == 0).sum()
        assert int(dead) >= 1


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.5"], "--sparsity: must be in (0, 1)"),
    (["--tau", "0"], "--tau: must be in (0, 1)"),
    (["--clean-data", "missing.json"], "missing.json"),
])
def test_bad_input_is_one_clear_line(tiny_model_dir, tmp_path, capsys, extra, message):
    code, err = _run(["prune-wanda", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o"), *extra], capsys)
    assert code == 2 and err.startswith("lightning-bdvax: error: ") and message in err
    assert not (tmp_path / "o").exists()


def test_refusals(tiny_model_dir, tmp_path, capsys):
    code, err = _run(["random", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "give --signature" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    code, err = _run(["ft", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "full")], capsys)
    assert code == 2 and "--overwrite" in err and (tmp_path / "full" / "x").read_text() == "keep"
    code, err = _run(["ft", "--model", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o2")], capsys)
    assert code == 2 and "nowhere" in err
    code, _ = _run(["no-such-defense", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o3")], capsys)
    assert code == 2


@pytest.fixture
def tiny_adapter_dir(tmp_path):
    """A suspicious LoRA adapter on the tiny base saved in ``tiny_model_dir``."""
    from helpers import lora_adapter
    from lightning_bdvax.models import save_model
    from lightning_bdvax.tiny import tiny_model

    d = tmp_path / "adapter"
    save_model(lora_adapter(tiny_model("llama")), None, d)
    return d


def test_adapter_baselines_from_the_command_line(tiny_model_dir, tiny_adapter_dir, tmp_path):
    from peft import PeftModel

    from lightning_bdvax.models import file_digests

    files = file_digests(tiny_adapter_dir)
    main(["baseline", "ft", "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter_dir), "--clean-data",
          "builtin:64", "--output-dir", str(tmp_path / "ft"), "--steps", "2", "--num-samples", "16",
          "--max-length", "48", "--precision", "32-true"])
    info = json.loads((tmp_path / "ft" / "defense_info.json").read_text())
    assert info["applied_to"] == "adapter" and info["adapter"] == str(tiny_adapter_dir)
    ft = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), str(tmp_path / "ft"))  # a defended adapter
    sus = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), str(tiny_adapter_dir))
    lora = {n: p for n, p in sus.named_parameters() if "lora_" in n}
    assert any(not torch.equal(p, lora[n]) for n, p in ft.named_parameters() if n in lora)
    assert file_digests(tiny_adapter_dir) == files  # the input adapter is only read
    main(["baseline", "quant-int4", "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter_dir),
          "--output-dir", str(tmp_path / "q"), "--precision", "32-true"])
    merged = load_causal_lm(tmp_path / "q")  # a full model: the adapter merged, then rounded
    assert json.loads((tmp_path / "q" / "defense_info.json").read_text())["applied_to"] == "merged"
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_adapter_refusals(tiny_model_dir, tiny_adapter_dir, tmp_path, capsys):
    code, err = _run(["ft", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "none"),
                      "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and err.startswith("lightning-bdvax: error: --adapter: ") and "does not exist" in err
    code, err = _run(["random", "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter_dir), "--tau", "0.1",
                      "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "purify_lora" in err
    from helpers import lora_adapter
    from lightning_bdvax.models import save_model
    from lightning_bdvax.tiny import tiny_model

    save_model(lora_adapter(tiny_model("llama", hidden=48)), None, tmp_path / "other")  # another base's shapes
    code, err = _run(["ft", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "other"),
                      "--output-dir", str(tmp_path / "o"), "--steps", "1"], capsys)
    last = err.strip().splitlines()[-1]  # after the base's loading bar
    assert code == 2 and last.startswith("lightning-bdvax: error: --adapter: ") and "does not match" in last
    assert not (tmp_path / "o").exists()

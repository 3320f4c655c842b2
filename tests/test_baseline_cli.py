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

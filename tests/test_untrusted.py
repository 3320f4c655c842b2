"""The suspicious model is hostile input: through ``lightning-bdvax fit`` nothing in it runs.

A pickle checkpoint whose unpickling would create a marker file is refused (and, even with the
explicit opt-in, read with ``weights_only=True``): the marker never appears. Configs that need
remote code are refused before transformers sees them, so the shipped ``modeling_*.py`` never runs.
"""

import json
import pickle
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli
from lightning_bdvax.models import file_digests

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_quickstart.yaml")
FAST = ["--clean_data", "builtin:32:1", "--data.train_data", "builtin:16:7", "--data.num_samples", "16",
        "--bdvax.vaccination.n_variants", "2", "--bdvax.vaccination.samples_per_variant", "16",
        "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"]


class Payload:
    """Unpickling this calls ``open(marker, "w")``, i.e. creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))




def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("lightning-bdvax: error: ")]


@pytest.fixture
def evil_pickle_dir(tmp_path, tiny_model_dir):
    """config + tokenizer of a real tiny model, weights as a pickle that carries a payload."""
    d = tmp_path / "evil"
    d.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "PWNED"
    from safetensors.torch import load_file

    state = load_file(tiny_model_dir / "model.safetensors")
    torch.save({**state, "__evil__": Payload(marker)}, d / "pytorch_model.bin")
    return d, marker


def test_payload_is_live(evil_pickle_dir, tmp_path):
    """Sanity check of the fixture: a plain unpickle *would* run the payload."""
    d, marker = evil_pickle_dir
    probe = tmp_path / "probe"
    blob = pickle.dumps(Payload(probe))
    assert not probe.exists()
    pickle.loads(blob)
    assert probe.exists()
    assert not marker.exists()  # building the checkpoint did not run it


def test_cli_refuses_pickle_checkpoint(evil_pickle_dir, tmp_path, capsys):
    d, marker = evil_pickle_dir
    before = file_digests(d)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["fit", "--config", TINY, "--model.model_path", str(d), "--output_dir", str(out),
                                 *FAST], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert line.startswith(f"lightning-bdvax: error: model.model_path: {d} has only pickle weights "
                           "['pytorch_model.bin']; pickle can run code, so they are refused")
    assert not marker.exists()
    assert file_digests(d) == before and not out.exists()


def test_cli_opt_in_still_never_runs_payload(evil_pickle_dir, tmp_path, capsys):
    d, marker = evil_pickle_dir
    out = tmp_path / "out"
    code, stdout, err = run_cli(["fit", "--config", TINY, "--model.model_path", str(d), "--model.allow_pickle",
                                 "true", "--output_dir", str(out), *FAST], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert line.startswith(f"lightning-bdvax: error: model.model_path: refused {d / 'pytorch_model.bin'}: not a plain tensor "
                           "checkpoint under torch.load(weights_only=True)")
    assert not marker.exists()
    assert "[bd-vax] variant" not in stdout and not out.exists()


def test_cli_refuses_remote_code_config(tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "remote"
    d.mkdir()
    for f in tiny_model_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "REMOTE_CODE_RAN"
    conf = json.loads((d / "config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (d / "config.json").write_text(json.dumps(conf))
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    code, _, err = run_cli(["fit", "--config", TINY, "--model.model_path", str(d),
                            "--output_dir", str(tmp_path / "out"), *FAST], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert line == (f"lightning-bdvax: error: model.model_path: {d / 'config.json'} has an auto_map: the model "
                    "requires remote code; lightning-bdvax never enables trust_remote_code")
    assert not marker.exists()


def test_cli_refuses_unknown_model_type(tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "custom"
    d.mkdir()
    for f in tiny_model_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    conf = json.loads((d / "config.json").read_text())
    conf["model_type"] = "totally-custom-llm"
    (d / "config.json").write_text(json.dumps(conf))
    code, _, err = run_cli(["fit", "--config", TINY, "--model.model_path", str(d),
                            "--output_dir", str(tmp_path / "out"), *FAST], capsys)
    (line,) = error_lines(err)
    assert code == 2 and "model_type 'totally-custom-llm' is unknown to transformers: the model requires remote code" \
        in line


def test_cli_hub_id_is_never_downloaded(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["fit", "--config", TINY, "--model.model_path", "evil-org/backdoored-llm",
                            "--output_dir", str(tmp_path / "out"), *FAST], capsys)
    (line,) = error_lines(err)
    assert code == 2 and "model.model_path: model 'evil-org/backdoored-llm' is not a local file or directory " \
        "(looks like a hub id); lightning-bdvax never downloads from a hub" in line


def test_cli_refuses_lightning_checkpoint_resume(tiny_model_dir, tmp_path, capsys):
    ckpt = tmp_path / "last.ckpt"
    marker = tmp_path / "CKPT_RAN"
    torch.save({"state_dict": {}, "x": Payload(marker)}, ckpt)
    code, _, err = run_cli(["fit", "--config", TINY, "--model.model_path", str(tiny_model_dir),
                            "--output_dir", str(tmp_path / "out"), "--ckpt_path", str(ckpt), *FAST], capsys)
    (line,) = error_lines(err)
    assert code == 2 and line.startswith("lightning-bdvax: error: ckpt_path: resuming the recovery fit from a "
                                         "Lightning checkpoint is not supported (checkpoints are pickle)")
    assert not marker.exists()

"""Stage 1 survives SIGKILL: the same command, started again, resumes from the last finished
variant and ends with a signature bit-identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

N_VARIANTS = 3

SCRIPT = textwrap.dedent(f"""
    import json, os, sys, time, warnings, logging
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch
    torch.set_num_threads(1)
    import lightning_bdvax as bdvax
    from lightning_bdvax.builtin_data import builtin_instructions
    from lightning_bdvax.tiny import tiny_model, tiny_tokenizer

    if os.environ.get("SLOW_STEP"):  # test hook: slower fits, so that a kill lands inside stage 1
        from lightning_bdvax.modules import VariantModule
        _step = VariantModule.training_step
        def training_step(self, batch, i):
            time.sleep(float(os.environ["SLOW_STEP"]))
            return _step(self, batch, i)
        VariantModule.training_step = training_step

    work_dir, output_dir = sys.argv[1], sys.argv[2]
    config = bdvax.BDVaxConfig(
        vaccination=bdvax.VaccinationConfig(n_variants={N_VARIANTS}, samples_per_variant=16, epochs=1,
                                            batch_size=8, max_length=48, lr=1e-3),
        signature=bdvax.SignatureConfig(tau=0.1),
        recovery=bdvax.RecoveryConfig(num_samples=16, steps=2, batch_size=8, max_length=48, lr=1e-3),
        seed=0, precision="32-true")
    res = bdvax.purify(tiny_model("llama"), tiny_tokenizer(), clean_data=builtin_instructions(200, seed=3),
                       config=config, work_dir=work_dir, output_dir=output_dir, progress=False)
    Path = __import__("pathlib").Path
    Path(output_dir + ".fits.json").write_text(json.dumps(res.report["timings"]["fits"]))
""")


def _cmd(tmp, name):
    return [sys.executable, str(tmp / "run.py"), str(tmp / f"{name}.work"), str(tmp / name)]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", SLOW_STEP="0.15", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")


def _done(work: Path) -> list[int]:
    try:
        return json.loads((work / "stage1.json").read_text())["variants_done"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def test_sigkill_mid_stage1_then_resume_gives_identical_signature(tmp_path):
    from safetensors.torch import load_file

    from lightning_bdvax.signature import Signature

    (tmp_path / "run.py").write_text(SCRIPT)
    env = _env()

    # Killed run: SIGKILL as soon as one variant is on disk (mid-stage-1: the next one is training).
    proc = subprocess.Popen(_cmd(tmp_path, "out"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    work = tmp_path / "out.work"
    deadline = time.time() + 120
    while not _done(work) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    log = proc.communicate()[0].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, log[-2000:]
    done_at_kill = _done(work)
    assert 1 <= len(done_at_kill) < N_VARIANTS, (done_at_kill, log[-2000:])
    assert not (tmp_path / "out").exists()

    # The same command again: resumes, finishes.
    r = subprocess.run(_cmd(tmp_path, "out"), env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    resumed_fits = json.loads((tmp_path / "out.fits.json").read_text())
    assert {f["variant"] for f in resumed_fits} == set(range(N_VARIANTS)) - set(done_at_kill)

    # An uninterrupted run of the same command.
    r = subprocess.run(_cmd(tmp_path, "ref"), env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(json.loads((tmp_path / "ref.fits.json").read_text())) == 2 * N_VARIANTS

    a, b = Signature.load(tmp_path / "out" / "signature"), Signature.load(tmp_path / "ref" / "signature")
    assert a.scores.keys() == b.scores.keys() and a.n_flagged > 0
    for k in a.scores:
        assert torch.equal(a.scores[k], b.scores[k]), k
        assert torch.equal(a.masks[k], b.masks[k]), k
    wa, wb = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

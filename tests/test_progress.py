"""Progress as plain lines when output goes to a file, tqdm bars on a terminal."""

import io
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ProgressBar
from torch import nn

from lightning_bdvax.pipeline import make_trainer
from lightning_bdvax.progress import ENV, LineProgress, LineProgressBar, line_mode, progress_bar


class _TTY(io.StringIO):
    def isatty(self):
        return True


class _Toy(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.lin(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def test_line_mode_follows_the_stream_and_the_environment(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert line_mode(io.StringIO()) is True  # a file: lines
    assert line_mode(_TTY()) is False  # a terminal: a bar
    monkeypatch.setenv(ENV, "bar")
    assert line_mode(io.StringIO()) is False
    monkeypatch.setenv(ENV, "LINES")
    assert line_mode(_TTY()) is True
    monkeypatch.setenv(ENV, "sometimes")
    with pytest.raises(ValueError, match="LIGHTNING_BDVAX_PROGRESS='sometimes'"):
        line_mode()


def test_line_progress_prints_each_step_at_interval_zero_and_one_summary():
    out = io.StringIO()
    bar = LineProgress(total=4, desc="plant", interval=0, stream=out)
    for i in range(4):
        bar.set_postfix(loss=f"{1.0 / (i + 1):.3f}", refresh=False)
        bar.update(1)
    bar.close()
    bar.close()  # a second close writes nothing
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines  # steps 1-3, then the summary (step 4 is reported by it)
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] plant: step 1/4 \(25%\), [\d.]+ it/s, \S+ left, loss=1\.000", lines[0])
    assert "step 3/4 (75%)" in lines[2]
    assert re.search(r"plant: 4 steps in \d+s, [\d.]+ it/s, loss=0\.250$", lines[3])


def test_line_progress_keeps_quiet_between_intervals():
    out = io.StringIO()
    with LineProgress(total=1000, desc="generate", interval=3600, stream=out) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "generate: 1000 steps in" in lines[0]


def test_line_progress_checks_its_interval():
    with pytest.raises(ValueError, match="interval"):
        LineProgress(total=3, interval=-1)
    with pytest.raises(ValueError, match="interval"):
        LineProgressBar(interval=-1)


def test_progress_bar_iterates_every_item_in_line_mode(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "lines")
    bar = progress_bar(desc="generate", iterable=[3, 1, 2])
    assert isinstance(bar, LineProgress)
    assert list(bar) == [3, 1, 2]
    assert "generate: 3 steps in" in capsys.readouterr().err


def test_progress_bar_is_tqdm_on_a_terminal(monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.setenv(ENV, "bar")
    bar = progress_bar(total=2, desc="fit")
    try:
        assert isinstance(bar, tqdm)
    finally:
        bar.close()


def test_make_trainer_prints_fit_lines_in_a_log(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "lines")
    trainer = make_trainer(6, progress=True, accelerator="cpu", desc="toy fit")
    assert isinstance(trainer.progress_bar_callback, LineProgressBar)
    trainer.fit(_Toy(), train_dataloaders=_loader())
    err = capsys.readouterr().err
    assert re.search(r"toy fit: 6 steps in \d+s, [\d.]+ it/s, loss=\d+\.\d{3}", err), err
    assert "\r" not in err


def test_make_trainer_keeps_lightnings_bar_on_a_terminal_and_none_without_progress(monkeypatch):
    monkeypatch.setenv(ENV, "bar")
    bar = make_trainer(2, progress=True, accelerator="cpu").progress_bar_callback
    assert isinstance(bar, ProgressBar) and not isinstance(bar, LineProgressBar)  # Lightning's tqdm or rich bar
    monkeypatch.setenv(ENV, "lines")
    assert make_trainer(2, progress=False, accelerator="cpu").progress_bar_callback is None

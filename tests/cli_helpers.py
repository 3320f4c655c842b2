"""Shared helper for tests that drive the command line in-process."""

from lightning_bdvax.cli import main


def run_cli(args, capsys):
    """``main(args)`` -> (exit code, stdout, stderr); 0 when it returns normally."""
    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err

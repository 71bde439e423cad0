"""Helpers shared by the command-line tests: run ``nsl`` in-process, read a run's metrics."""

from __future__ import annotations

import json

from nsl.cli import main


def run(argv, capsys):
    """``(exit code, stdout, stderr)`` of ``nsl ARGV``, run in this process."""
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def records(run_dir, kind):
    """The ``metrics.jsonl`` records of ``run_dir`` whose ``kind`` is ``kind`` (``train``, ``eval``)."""
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]

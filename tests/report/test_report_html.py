"""umlipft report: every figure and run summary of a run directory on one HTML page."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from umlipft.cli import main
from umlipft.errors import InputError
from umlipft.report import build_report
from umlipft.summary import RunSummary


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def _run_dir(root: Path) -> Path:
    from umlipft.analysis.plots import plot_control_chart, save_figure

    for sub, caption in (("pca", "PCA map <by element>"), ("q/atoms", "Q of tracked atoms")):
        fig, data = plot_control_chart(np.arange(4.0), np.arange(4.0)[:, None], ["O1"], "Q")
        save_figure(fig, data, root / sub / "figure.png", caption)
    summary = RunSummary("analyze q", {"alpha": 0.01})
    summary.results = {"n_frames": 4}
    summary.write(root / "q" / "summary.json")
    return root


def test_report_links_every_figure_and_summary(tmp_path):
    run = _run_dir(tmp_path / "run")
    path = build_report(run)
    assert path == run / "report.html"
    text = path.read_text()
    parser = _Images()
    parser.feed(text)
    assert len(parser.srcs) == 2
    for src in parser.srcs:
        assert (run / src).is_file()  # relative links resolve
    assert "PCA map &lt;by element&gt;" in text  # captions are escaped, not injected
    assert "analyze q" in text and "n_frames" in text


def test_embedded_report_is_self_contained(tmp_path):
    run = _run_dir(tmp_path / "run")
    out = build_report(run, tmp_path / "elsewhere" / "r.html", title="Study", embed=True)
    parser = _Images()
    parser.feed(out.read_text())
    payloads = sorted(base64.b64decode(s.split(",", 1)[1]) for s in parser.srcs)
    files = sorted(p.read_bytes() for p in run.rglob("*.png"))
    assert payloads == files
    assert re.search(r"<h1>Study</h1>", out.read_text())


def test_cli_and_errors(tmp_path, capsys):
    run = _run_dir(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no figures"):
        build_report(tmp_path / "empty")
    assert main(["report", str(tmp_path / "missing")]) == 1

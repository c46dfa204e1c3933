"""Collect the figures (PNG/SVG, with their ``.json`` captions) and run summaries under a folder
into one self-describing HTML page. Only the standard library: reports are built on login nodes.
"""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io import atomic_write_text
from ..lock import output_lock

FIGURE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg")
REPORT_NAME = "report.html"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
figure { margin: 1em 0 2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; } .path { font-family: monospace; color: #777; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em 0; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
nav ul { columns: 2; font-size: 0.9em; }
"""


def build_report(run_dir: str | Path, output: str | Path | None = None, title: str | None = None,
                 embed: bool = False) -> Path:
    """Write ``RUN_DIR/report.html`` (or ``output``) and return its path.

    Figures are grouped by the folder they are in, in name order; a ``NAME.json`` beside a figure
    (written by ``umlipft.analysis.plots.save_figure``) gives its caption. Every ``summary.json``
    (``umlipft.summary.RunSummary``) becomes a table of its driver, status, times and results.
    ``embed`` puts the images into the page (one portable file) instead of linking them. A
    workflow report folder (with a ``report.json`` verdict) is laid out by
    :func:`umlipft.report.workflow.build_workflow_report` instead.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir} is not a directory; give the run directory to report on")
    from .workflow import build_workflow_report, is_workflow_report

    if is_workflow_report(run_dir):  # a workflow's report folder: the verdict and the study's figure order
        return build_workflow_report(run_dir, output, title, embed)
    output = Path(output) if output else run_dir / REPORT_NAME
    with output_lock(output, "report", file=True):  # one report per page at a time
        return _write_report(run_dir, output, title, embed)


def _write_report(run_dir: Path, output: Path, title: str | None, embed: bool) -> Path:
    figures = sorted(p for p in run_dir.rglob("*") if p.suffix.lower() in FIGURE_SUFFIXES and p.is_file()
                     and not any(part.startswith(".") for part in p.relative_to(run_dir).parts))
    summaries = sorted(p for p in run_dir.rglob("*summary*.json") if p.is_file())
    summaries = [p for p in summaries if _load_summary(p) is not None]
    if not figures and not summaries:
        raise InputError(f"{run_dir} holds no figures (*.png, *.svg) and no run summaries to report")

    folders: dict[Path, dict[str, list[Path]]] = {}
    for path in figures:
        folders.setdefault(path.parent, {"figures": [], "summaries": []})["figures"].append(path)
    for path in summaries:
        folders.setdefault(path.parent, {"figures": [], "summaries": []})["summaries"].append(path)

    title = title or f"umlipft report: {run_dir.resolve().name}"
    parts = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{_e(title)}</h1>",
             f"<p class='path'>{_e(str(run_dir.resolve()))}, generated "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {len(figures)} figure(s), "
             f"{len(summaries)} run summary(ies).</p>"]
    order = sorted(folders, key=lambda p: (p != run_dir, str(p)))
    parts.append("<nav><ul>" + "".join(
        f"<li><a href='#{_anchor(run_dir, f)}'>{_e(_rel(run_dir, f))}</a></li>" for f in order) + "</ul></nav>")
    for folder in order:
        content = folders[folder]
        parts.append(f"<h2 id='{_anchor(run_dir, folder)}'>{_e(_rel(run_dir, folder))}</h2>")
        for path in content["summaries"]:
            parts.append(_summary_html(path, _load_summary(path) or {}))
        for path in content["figures"]:
            parts.append(_figure_html(path, output.parent, embed))
    parts.append("</body></html>\n")
    atomic_write_text(output, "\n".join(parts))
    return output


def _figure_html(path: Path, base: Path, embed: bool) -> str:
    caption = ""
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            caption = str(json.loads(sidecar.read_text()).get("caption", ""))
        except (json.JSONDecodeError, AttributeError):
            caption = ""
    if embed:
        mime = {".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(path.suffix.lower(),
                                                                                           "image/png")
        src = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
    else:
        src = _relative_url(path, base)
    return (f"<figure><img src='{_e(src)}' alt='{_e(path.stem)}'>"
            f"<figcaption><b>{_e(path.name)}</b>{': ' + _e(caption) if caption else ''}</figcaption></figure>")


def _summary_html(path: Path, doc: dict[str, Any]) -> str:
    rows = [("driver", doc.get("driver")), ("status", doc.get("status")), ("started", doc.get("started")),
            ("wall time (s)", _num(doc.get("wall_time_s"))), ("host", doc.get("host")),
            ("command", " ".join(str(c) for c in doc.get("command", [])))]
    timings = doc.get("timings_s") or {}
    if timings:
        rows.append(("timings (s)", ", ".join(f"{k} {_num(v)}" for k, v in timings.items())))
    for key, value in (doc.get("results") or {}).items():
        rows.append((f"result: {key}", _short(value)))
    body = "".join(f"<tr><th>{_e(str(k))}</th><td>{_e(str(v))}</td></tr>" for k, v in rows if v not in (None, ""))
    return f"<table><caption class='path'>{_e(path.name)}</caption>{body}</table>"


def _load_summary(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) and "driver" in doc else None


def _short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + " ..."


def _num(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else str(value or "")


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _rel(root: Path, path: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return "." if rel == "." else rel


def _anchor(root: Path, path: Path) -> str:
    return "d-" + "".join(c if c.isalnum() else "-" for c in _rel(root, path))


def _relative_url(path: Path, base: Path) -> str:
    import os
    from urllib.parse import quote

    return quote(Path(os.path.relpath(path.resolve(), base.resolve())).as_posix())

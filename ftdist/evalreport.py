"""`ftdist eval --report DIR`: the evaluation's tables and plots written to a folder."""

from __future__ import annotations

import json
from pathlib import Path

from ftdist.errors import FtdistError

REPORT_MARKER = "eval.json"


def check_report_dir(folder: str) -> None:
    """--report writes into a new or empty folder, or one an earlier --report wrote (it holds eval.json)."""
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise FtdistError(f"--report: {folder!r} is a file; give a folder (new, empty, or an earlier --report's)")
    if p.is_dir() and any(p.iterdir()) and not (p / REPORT_MARKER).is_file():
        raise FtdistError(f"--report: {folder!r} holds files that `ftdist eval --report` did not write; give a new or "
                          "empty folder")


def write_report(folder: str, result: dict, model: str, file: str) -> Path:
    """report.md (the tables), eval.json (the full result) and, for classification models, the reliability
    diagram and confusion matrices as PNGs."""
    from ftdist import analysis

    check_report_dir(folder)
    p = Path(folder)
    p.mkdir(parents=True, exist_ok=True)
    (p / REPORT_MARKER).write_text(json.dumps(result, indent=1))
    lines = [f"# ftdist eval: {model} on {file}", ""]
    headline = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                                                 for k, v in headline.items()] + [""]
    if "calibration" in result:
        found = {"task": "token-classification" if "per_entity" in result else "classification",
                 "decision": None, "temperature": result["calibration"].get("temperature"), "splits": {"eval": result}}
        pngs = analysis.plots(found, p)
        if "tuned" in result:
            lines += [f"Decision: {result['tuned']['decision']}.", ""]
        lines += analysis.markdown(found, {"eval": headline}, pngs)
    (p / "report.md").write_text("\n".join(lines))
    return p / "report.md"

"""The status page: recent studies -> series -> jobs -> results, rendered on the server.

Plain HTML and CSS, no script.  Without ``http.show_phi`` the page shows
UIDs, modality, AE titles, counts, states, timings and errors only; with it,
also the patient's name, ID and birth date, the study date and the study
and series descriptions (read from the series' first instance).
"""

from __future__ import annotations

import html
import json
import logging
import time
from typing import Any

import pydicom

from dicom_node.domain import JobKind
from dicom_node.http.thumbnail import thumbnail_url
from dicom_node.spool import Spool
from dicom_node.store import Database

logger = logging.getLogger(__name__)

_PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "StudyDescription",
                 "SeriesDescription")

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em} .sub{color:#666;margin-bottom:1em}
.study{background:#fff;border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin:0 0 1em}
.study h2{font-size:1.05em;margin:.2em 0;font-family:monospace}
.series{border-left:4px solid #8ab;padding:.3em .8em;margin:.6em 0}
table{border-collapse:collapse;margin:.3em 0;font-size:.9em} td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}
.state{font-weight:bold;padding:0 .4em;border-radius:3px}
.done{background:#cfc}.failed,.dead{background:#fcc}.running,.sending,.queued,.retrying{background:#ffc}
.receiving,.complete{background:#def}.ignored{background:#eee}
.err{color:#a00} .uid{font-family:monospace;font-size:.85em} .results{display:flex;gap:1em;flex-wrap:wrap}
.result img{width:256px;height:auto;border:1px solid #999;background:#000;display:block}
"""


def _t(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _state(value: str) -> str:
    return f'<span class="state {_e(value)}">{_e(value)}</span>'


def _phi(spool: Spool, db: Database, series_uid: str) -> dict[str, str]:
    rows = db.query("SELECT path FROM instances WHERE series_uid=? ORDER BY received_at LIMIT 1", (series_uid,))
    if not rows:
        return {}
    try:
        ds = pydicom.dcmread(spool.absolute(rows[0]["path"]), stop_before_pixels=True,
                             specific_tags=list(_PHI_KEYWORDS))
    except Exception as exc:  # a header we cannot read must not break the page
        logger.debug("Status page: header of series %s unreadable: %s", series_uid, exc)
        return {}
    return {k: str(ds.get(k, "") or "") for k in _PHI_KEYWORDS}


def render_status(db: Database, spool: Spool, *, studies: int, show_phi: bool, node_title: str,
                  now: float | None = None, cluster: list[str] | None = None) -> bytes:
    """The status page as UTF-8 HTML (``cluster``: the Ray cluster's lines, with ``workers.engine: ray``)."""
    now = time.time() if now is None else now
    study_rows = db.query(
        "SELECT study_uid, MAX(last_received) AS last FROM series GROUP BY study_uid ORDER BY last DESC LIMIT ?",
        (studies,))
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(node_title)} status</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{_e(node_title)}: recent work</h1>",
             f'<div class="sub">{len(study_rows)} most recent studies, as of {_e(_t(now))}'
             f'{"" if show_phi else "; patient data hidden (http.show_phi: false)"}</div>']
    if cluster:
        parts.append(f'<section class="cluster"><h2>Inference cluster</h2><pre>{_e(chr(10).join(cluster))}</pre>'
                     "</section>")
    if not study_rows:
        parts.append("<p>No series received yet.</p>")
    for st in study_rows:
        parts.append(_study(db, spool, st["study_uid"], show_phi))
    parts.append("</body></html>")
    return "".join(parts).encode("utf-8")


def _study(db: Database, spool: Spool, study_uid: str, show_phi: bool) -> str:
    series = db.query("SELECT * FROM series WHERE study_uid=? ORDER BY first_received", (study_uid,))
    out = [f'<section class="study"><h2>Study <span class="uid">{_e(study_uid)}</span></h2>']
    if show_phi and series:
        phi = _phi(spool, db, series[0]["series_uid"])
        if phi:
            out.append(f"<div>Patient {_e(phi['PatientName'])} (ID {_e(phi['PatientID'])}, born "
                       f"{_e(phi['PatientBirthDate'] or '-')}), study {_e(phi['StudyDate'] or '-')} "
                       f"{_e(phi['StudyDescription'])}</div>")
    for s in series:
        out.append(_series(db, spool, dict(s), show_phi))
    out.append("</section>")
    return "".join(out)


def _series(db: Database, spool: Spool, s: dict[str, Any], show_phi: bool) -> str:
    uid = s["series_uid"]
    desc = ""
    if show_phi:
        desc = _e(_phi(spool, db, uid).get("SeriesDescription", ""))
    out = [f'<div class="series"><div>{_state(s["state"])} <b>{_e(s["modality"] or "?")}</b> {desc} '
           f'<span class="uid">series {_e(uid)}</span></div>',
           f'<div>{s["instance_count"]} instance(s) from {_e(s["calling_ae"] or "?")}@{_e(s["source_host"] or "?")}; '
           f'first {_e(_t(s["first_received"]))}, last {_e(_t(s["last_received"]))}, '
           f'complete {_e(_t(s["completed_at"]))}</div>']
    if s["reason"]:
        out.append(f'<div class="err">{_e(s["reason"])}</div>')
    jobs = db.query("SELECT * FROM jobs WHERE series_uid=? ORDER BY id", (uid,))
    if jobs:
        out.append("<table><tr><th>job</th><th>kind</th><th>state</th><th>model / destination</th>"
                   "<th>attempts</th><th>queued</th><th>took</th><th>timings</th><th>findings / error</th></tr>")
        for j in jobs:
            out.append(_job(dict(j)))
        out.append("</table>")
    results = db.query("SELECT * FROM results WHERE source_series=? ORDER BY model, kind", (uid,))
    by_model: dict[str, list[Any]] = {}
    for r in results:
        by_model.setdefault(r["model"], []).append(r)
    if by_model:
        out.append('<div class="results">')
        for model, objs in by_model.items():
            lines = "".join(f'<div>{_e(o["kind"].upper())} <span class="uid">{_e(o["sop_uid"])}</span></div>'
                            for o in objs)
            out.append(f'<div class="result"><img src="{_e(thumbnail_url(uid, model))}" '
                       f'alt="overlay of {_e(model)}" loading="lazy"><div><b>{_e(model)}</b></div>{lines}</div>')
        out.append("</div>")
    out.append("</div>")
    return "".join(out)


def _job(j: dict[str, Any]) -> str:
    payload = json.loads(j["payload"] or "{}")
    what = _e(j["model"]) if j["kind"] == JobKind.INFER else f'{_e(j["model"])} &rarr; {_e(j["destination"])}'
    seconds = payload.get("seconds") or {}
    timings = ", ".join(f"{_e(k)} {float(v):.2f} s" for k, v in seconds.items())
    took = f'{j["updated_at"] - j["created_at"]:.1f} s' if j["state"] in ("done", "failed", "dead") else "-"
    info = _e(j["reason"]) if j["reason"] else _e("; ".join(payload.get("findings", [])))
    cls = ' class="err"' if j["reason"] else ""
    version = f' v{_e(payload["model_version"])}' if payload.get("model_version") else ""
    return (f'<tr><td>{j["id"]}</td><td>{_e(j["kind"])}</td><td>{_state(j["state"])}</td>'
            f'<td>{what}{version}</td><td>{j["attempts"]}</td>'
            f'<td>{_e(_t(j["created_at"]))}</td><td>{took}</td><td>{timings}</td><td{cls}>{info}</td></tr>')

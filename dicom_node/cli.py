"""Command line: the only place that exits the process.

Exit codes: 0 success, 1 operation failed (peer unreachable...), 2 bad
configuration or usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicom_node.app import ForcedShutdown, Node
from dicom_node.domain import JobState, SeriesSummary
from dicom_node.durations import parse_duration
from dicom_node.errors import ConfigError, DicomNodeError, StartupError
from dicom_node.logs import configure_logging
from dicom_node.rules.matcher import explain
from dicom_node.rules.replay import replay
from dicom_node.rules.summary import never_process_reason, scan_paths
from dicom_node.send.dimse import echo, send_files
from dicom_node.settings import Settings, default_settings, load_settings
from dicom_node.spool import Spool
from dicom_node.store import Database, JobStore, SeriesStore
from dicom_node.store.audit import AuditEvent, AuditLog
from dicom_node.store.jobs import state_label
from dicom_node.store.layout import state_paths, storage_problem

logger = logging.getLogger("dicom_node")


def _load(config: str | None) -> Settings:
    return load_settings(Path(config)) if config else default_settings()


def _setup_logging(level: str, journald: bool = False) -> None:
    configure_logging(level, journald)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    _setup_logging(settings.logging.level, settings.logging.journald)
    if not args.config:
        logger.info("No --config given: running the embedded default (state in %s)", settings.storage.path)
    for warning in settings.warnings() + _environment_notes(settings):
        logger.warning("Configuration: %s", warning)
    node = Node(settings, config_path=Path(args.config) if args.config else None)
    try:
        node.run_forever()
    except ForcedShutdown as exc:
        logger.warning("%s", exc)
        return 1
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    if (args.file is None) == (args.config_file is None):
        raise ConfigError("check-config: give the configuration file once (check-config FILE or --config FILE)")
    args.file = args.file or args.config_file
    settings = load_settings(Path(args.file))
    problem = storage_problem(settings.storage.resolved_path())
    if problem is not None:
        raise ConfigError(f"{args.file}: {problem}")
    for warning in settings.warnings() + _environment_notes(settings):
        print(f"warning: {warning}")
    print(f"{args.file}: OK ({len(settings.models)} model(s), {len(settings.rules)} rule(s), "
          f"{len(settings.destinations)} destination(s))")
    return 0


def _environment_notes(settings: Settings) -> list[str]:
    """A line per model whose environment is not ready (missing managed environment, stale, interpreter gone)."""
    from inference.environments import state_of

    notes = []
    for name, spec in settings.models.items():
        if (getattr(spec, "environment", "shared") or "shared") == "shared" and spec.type != "nnunet":
            continue
        try:
            state = state_of(name, spec, settings.storage.resolved_path())
        except (OSError, ValueError) as exc:
            notes.append(f"model {name!r}: its environment cannot be planned: {exc}")
            continue
        if state.state != "ready":
            notes.append(f"model {name!r}: environment {state.state}: {state.detail}")
    return notes


def cmd_models_list(args: argparse.Namespace) -> int:
    from inference.environments import state_of

    settings = _load(args.config)
    if not settings.models:
        print("no models configured")
    for name, spec in settings.models.items():
        environment = getattr(spec, "environment", "shared") or "shared"
        state = state_of(name, spec, settings.storage.resolved_path())
        print(f"{name:<24} {spec.type:<13} {environment:<8} {state.state:<8} {state.detail}")
    return 0


def cmd_models_install(args: argparse.Namespace) -> int:
    from inference.environments import install

    settings = _load(args.config)
    spec = settings.models.get(args.name)
    if spec is None:
        print(f"error: no model named {args.name!r} in the configuration (models: "
              f"{', '.join(sorted(settings.models)) or 'none'})", file=sys.stderr)
        return 2
    if getattr(spec, "environment", "shared") != "managed":
        print(f"error: model {args.name!r} has environment: {getattr(spec, 'environment', 'shared')}; "
              "models install builds environment: managed only", file=sys.stderr)
        return 2
    wheels = Path(args.wheels) if args.wheels else None
    if wheels is not None and not wheels.is_dir():
        print(f"error: --wheels {wheels}: not a directory", file=sys.stderr)
        return 2
    try:
        install(args.name, spec, settings.storage.resolved_path(), wheels=wheels, force=args.force,
                progress=lambda line: print(line, flush=True))
    except RuntimeError as exc:
        print(f"error: model {args.name}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_rules_test(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    found = scan_paths([Path(p) for p in args.paths])
    if not found:
        print("no DICOM series found under " + ", ".join(args.paths))
        return 1
    for summary, files in found:
        _print_verdicts(settings, summary, f"{len(files)} instance(s)", explain, never_process_reason)
    return 0


def _print_verdicts(settings: Settings, summary: SeriesSummary, extra: str, explain: Any,
                    never_process_reason: Any) -> None:
    """One series and every rule's verdict: MATCH with what it runs, or the first failing condition."""
    attrs, facts = summary.attributes, summary.facts
    geometry = ", ".join(f"{k} {facts[k]}" for k in ("orientation", "slice_spacing") if facts.get(k) is not None)
    print(f"Series {summary.series_uid}  {attrs.get('Modality', '?')}  "
          f"\"{attrs.get('SeriesDescription', '')}\"  {extra}" + (f"  ({geometry})" if geometry else ""))
    reason = never_process_reason(summary)
    if reason:
        print(f"  never processed: {reason}")
        return
    if not settings.rules:
        print("  no rules configured: nothing is processed")
    rules = {r.name: r for r in settings.rules}
    for verdict in explain(settings.rules, summary):
        rule = rules[verdict.rule]
        if verdict.matched:
            what = f"run {', '.join(rule.run)} (priority {rule.priority}" + (", stop" if rule.mode == "stop" else "")
            print(f"  MATCH    {verdict.rule}: {what})" + (f"; {verdict.reason}" if verdict.reason else ""))
        else:
            print(f"  no match {verdict.rule}: {verdict.reason}")


def cmd_rules_replay(args: argparse.Namespace) -> int:
    try:
        since_s = parse_duration(args.since)
    except ValueError as exc:
        print(f"error: --since: {exc}", file=sys.stderr)
        return 2
    settings = _load(args.config)
    db = _state_db(settings)
    if db is None:
        return 1
    try:
        items = replay(settings, db, Spool(state_paths(settings.storage)[0]), time.time() - since_s, apply=args.apply,
                       now=time.time())
    finally:
        db.close()
    if not items:
        print(f"no series received in the last {args.since}")
    for item in items:
        head = f"{item.row['instance_count']} instance(s), {item.row['state']}"
        if item.summary is None:
            print(f"Series {item.row['series_uid']}  {head}\n  cannot replay: {item.error}")
            continue
        _print_verdicts(settings, item.summary, head, explain, never_process_reason)
        if item.changed:
            print(f"  CHANGED: ran {', '.join(item.before_rules) or 'nothing'}; "
                  f"would now run {', '.join(item.now_rules) or 'nothing'}")
    changed = sum(item.changed for item in items)
    if args.apply:
        print(f"{changed} series put back to 'complete': the running node re-evaluates them at its next tick")
    else:
        print(f"dry run: {changed} of {len(items)} series would change (add --apply to act)")
    return 0


def _state_db(settings: Settings) -> Database | None:
    """The node's state database for ``settings``, or ``None`` (said on stdout) when it never ran."""

    _, db_path = state_paths(settings.storage)
    if not db_path.exists():
        print(f"no state database at {db_path}: the node has not run with this configuration")
        return None
    return Database(db_path)


def _fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_status(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    db = _state_db(settings)
    if db is None:
        return 1
    if not args.json:
        for note in _environment_notes(settings):
            print(f"warning: {note}")
    series, jobs = SeriesStore(db), JobStore(db)
    rows = series.recent(args.limit)
    if args.json:
        out = [{**r, "jobs": [j.__dict__ | {"kind": str(j.kind), "state": str(j.state),
                                            "label": state_label(j.kind, j.state)}
                              for j in jobs.for_series(r["series_uid"])]} for r in rows]
        print(json.dumps(out, indent=2, default=str))
        return 0
    if not rows:
        print("no series received yet")
    for r in rows:
        print(f"{_fmt_time(r['last_received'])}  {r['state']:<9}  {r['modality'] or '?':<3} "
              f"{r['instance_count']:>4} inst  series {r['series_uid']}"
              + (f"\n{'':22}reason: {r['reason']}" if r["reason"] else ""))
        for j in jobs.for_series(r["series_uid"]):
            what = j.model if j.kind == "infer" else f"{j.model} -> {j.destination}"
            extra = ""
            if j.reason:
                extra = f": {j.reason}"
            elif j.kind == "infer" and j.payload.get("findings"):
                extra = ": " + "; ".join(j.payload["findings"])
            if j.kind == "send" and j.state == "retrying":
                extra += f" (next try {_fmt_time(j.next_attempt_at)})"
            print(f"{'':22}job {j.id:<5} {j.kind:<5} {state_label(j.kind, j.state):<8} {what} "
                  f"(attempts {j.attempts}){extra}")
            for note in j.payload.get("notes", []) if j.kind == "infer" else []:
                print(f"{'':28}note: {note}")  # accepted on purpose: tilt, duplicates, copied values changed
    dead = jobs.counts().get(("send", "dead"), 0)
    if dead:
        print(f"{dead} dead send job(s); once the cause is fixed: dicom-node jobs retry --dead")
    if settings.workers.engine == "ray":
        from dicom_node.scheduler.ray_engine import describe_cluster, infer_queue, read_snapshot

        for line in describe_cluster(read_snapshot(state_paths(settings.storage)[0]), infer_queue(db)):
            print(line)
    db.close()
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    try:
        since = time.time() - parse_duration(args.since) if args.since else None
    except ValueError as exc:
        print(f"error: --since: {exc}", file=sys.stderr)
        return 2
    db = _state_db(_load(args.config))
    if db is None:
        return 1
    try:
        records = AuditLog(db).query(since=since, series_uid=args.series, event=args.event, limit=args.limit)
    finally:
        db.close()
    if args.json:
        print(json.dumps([r.as_dict() for r in records], indent=2))
        return 0
    if not records:
        print("no audit events" + (f" in the last {args.since}" if args.since else ""))
    for r in records:
        who = f" {r.peer_ae or '?'}@{r.peer_host}" if r.peer_host or r.peer_ae else ""
        series = f" series {r.series_uid}" if r.series_uid else ""
        detail = " ".join(f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}"
                          for k, v in r.detail.items() if v not in ("", None, [], {}))
        print(f"{_fmt_time(r.at)}  {r.event:<20}{who}{series}  {detail}".rstrip())
    return 0


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    db = _state_db(_load(args.config))
    if db is None:
        return 1
    jobs = JobStore(db)
    ids = [j.id for j in jobs.in_state(JobState.DEAD)] if args.dead else args.ids
    n = jobs.requeue(ids, time.time())
    print(f"{n} job(s) queued again")
    db.close()
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    status = echo(ae_title=args.aec, host=args.host, port=args.port, calling_ae_title=args.aet)
    if status is None:
        print(f"C-ECHO to {args.aec}@{args.host}:{args.port}: no association", file=sys.stderr)
        return 1
    print(f"C-ECHO to {args.aec}@{args.host}:{args.port}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    files: list[Path] = []
    for p in map(Path, args.files):
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    report = send_files(files, ae_title=args.aec, host=args.host, port=args.port, calling_ae_title=args.aet)
    print(f"sent {report.sent} object(s) to {args.aec}@{args.host}:{args.port}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicom-node", description="DICOM node running AI models on routed series")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the node in the foreground")
    s.add_argument("--config", help="YAML configuration (default: the embedded default)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("check-config", help="validate a configuration file")
    s.add_argument("file", nargs="?", help="the YAML configuration")
    s.add_argument("--config", dest="config_file", help="the same, as the other commands take it")
    s.set_defaults(func=cmd_check_config)

    rules = sub.add_parser("rules", help="rule tooling")
    rsub = rules.add_subparsers(dest="rules_command", required=True)
    s = rsub.add_parser("test", help="show which rules match the series found under PATH")
    s.add_argument("--config")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.set_defaults(func=cmd_rules_test)
    s = rsub.add_parser("replay", help="re-evaluate the rules over series already received (dry run by default)")
    s.add_argument("--config")
    s.add_argument("--since", default="24h", help="how far back: 24h, 30m, 2d, 90s (default 24h)")
    s.add_argument("--apply", action="store_true",
                   help="put series whose outcome changed back to 'complete' so the running node re-dispatches them")
    s.set_defaults(func=cmd_rules_replay)

    s = sub.add_parser("status", help="series, jobs, their states and failures")
    s.add_argument("--config")
    s.add_argument("--limit", type=int, default=30)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("audit", help="the audit trail: associations, series, rules, model runs, sends")
    s.add_argument("--config")
    s.add_argument("--since", default="24h", help="how far back: 90s, 30m, 24h, 7d, 2w (default 24h; '' = all)")
    s.add_argument("--series", metavar="UID", help="only events of this series")

    s.add_argument("--event", choices=[str(e) for e in AuditEvent])
    s.add_argument("--limit", type=int, default=1000, help="at most this many (the newest), default 1000")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_audit)

    models = sub.add_parser("models", help="models and their Python environments")
    msub = models.add_subparsers(dest="models_command", required=True)
    s = msub.add_parser("list", help="each model, its environment and whether it is ready")
    s.add_argument("--config")
    s.set_defaults(func=cmd_models_list)
    s = msub.add_parser("install", help="build a model's managed environment (environment: managed)")
    s.add_argument("name")
    s.add_argument("--config")
    s.add_argument("--wheels", metavar="DIR", help="install offline from this folder of wheels (no index)")
    s.add_argument("--force", action="store_true", help="build again even if it is already built")
    s.set_defaults(func=cmd_models_install)

    jobs = sub.add_parser("jobs", help="job operations")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    s = jsub.add_parser("retry", help="queue failed/dead jobs again")
    s.add_argument("--config")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--dead", action="store_true", help="every dead job")
    g.add_argument("ids", nargs="*", type=int, default=[])
    s.set_defaults(func=cmd_jobs_retry)

    for name, func, helptext in (("echo", cmd_echo, "C-ECHO a peer"), ("send", cmd_send, "C-STORE files to a peer")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("-aet", default="DICOMNODE", help="calling AE title")
        s.add_argument("-aec", default="ANY-SCP", help="called AE title")
        s.add_argument("host")
        s.add_argument("port", type=int)
        if name == "send":
            s.add_argument("files", nargs="+", metavar="FILE_OR_DIR")
        s.set_defaults(func=func)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"configuration error: {line}", file=sys.stderr)
        code = 2
    except StartupError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        code = 2
    except (DicomNodeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()

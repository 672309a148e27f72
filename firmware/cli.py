"""The `edge-recorder` command line.

Every error the user can cause (a bad file, a bad argument, a wrong key) ends in one line
on stderr and a non-zero exit; ``--debug`` shows the traceback for reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from firmware import __version__
from firmware.config import DEFAULT_PATH

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from firmware.config import Config
    from firmware.policyfile import PolicySet

log = logging.getLogger("edge-recorder")

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERNAL = 70  # EX_SOFTWARE (sysexits.h)

_OUR_PACKAGES = ("firmware", "drivers", "sync", "provisioning")


class UsageError(Exception):
    """Bad command-line input."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line instead of argparse's usage dump."""
        raise UsageError(f"{self.prog}: {message} (see --help)")


# --- commands ------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from drivers.clock import SystemClock
    from firmware.config import load_config
    from firmware.daemon import Appliance, install_signal_handlers

    config = load_config(args.config)
    app = Appliance(config, clock=SystemClock())
    install_signal_handlers(app)
    return app.run(until_lines_end=args.until_lines_end)


def cmd_sync(args: argparse.Namespace) -> int:
    from sync.agent import run_agent

    return run_agent(args.config)


def cmd_central_ingest(args: argparse.Namespace) -> int:
    from sync.central.__main__ import main as ingest_main
    from sync.central.__main__ import main_config

    if args.config is not None:
        if args.options:
            raise UsageError("central ingest: give --config FILE or options after --, not both")
        return main_config(args.config)
    return ingest_main(args.options)


def _central_config(args: argparse.Namespace) -> Any:
    """The central config named by --config, or None."""
    from sync.central.config import load_central_config

    return load_central_config(args.config) if args.config is not None else None


def _catalogue_url(args: argparse.Namespace) -> str:
    config = _central_config(args)
    if args.catalogue:
        return str(args.catalogue)
    if config is not None:
        return str(config.catalogue_url)
    if getattr(args, "dir", None) is not None:
        return f"sqlite://{args.dir / 'catalogue.db'}"
    raise UsageError(f"{args.command}: give --catalogue URL or --config FILE")


def cmd_fleet(args: argparse.Namespace) -> int:
    import threading

    from rich.console import Console

    from sync.central.catalogue import open_catalogue
    from sync.central.config import Fleet
    from sync.central.fleet import render_json, render_table, snapshot, watch

    config = _central_config(args)
    limits = config.fleet if config is not None else Fleet()
    catalogue = open_catalogue(_catalogue_url(args))
    try:
        if args.watch is not None:
            watch(lambda: snapshot(catalogue, limits=limits), args.watch,
                  threading.Event().wait)
            return 0
        table = snapshot(catalogue, limits=limits)
    finally:
        catalogue.close()
    if args.json:
        print(render_json(table))
    else:
        Console().print(render_table(table))
    return 0


def cmd_central_search(args: argparse.Namespace) -> int:
    from sync.central.catalogue import open_catalogue
    from sync.central.search import row_summary, search

    catalogue = open_catalogue(_catalogue_url(args))
    try:
        found = search(catalogue, number=args.number, device_id=args.device,
                       start=args.start, end=args.end)
    finally:
        catalogue.close()
    hits = [row_summary(row) for row in found]
    for hit in hits:
        print(json.dumps(hit, sort_keys=True) if args.json else
              f"{hit['started_at'] or '-':24} {hit['recording_id']} {hit['device_id']} "
              f"{hit['line_id'] or '-'} {hit['direction'] or '-'} {hit['audio_s'] or 0:.0f} s")
    if not args.json:
        print(f"{len(hits)} recording(s)")
    return 0


def cmd_central_export(args: argparse.Namespace) -> int:
    from firmware.agecrypt import load_identities
    from firmware.catalogue import iso_utc_ms
    from firmware.keys import load_or_create_signing_key
    from sync.central.catalogue import open_catalogue
    from sync.central.export import ExportRequest, export_recordings

    config = _central_config(args)
    objects = args.dir or (Path(config.store.objects_dir) if config else None)
    if objects is None:
        raise UsageError("central export: give --dir OBJECTS or --config FILE")
    devices = args.devices or (Path(config.store.devices_dir) if config else objects / "devices")
    signing = args.signing_key or (Path(config.store.signing_key) if config else None)
    if signing is None or not signing.is_file():
        raise UsageError(f"central export: --signing-key: {signing}: no such file "
                         "(central's Ed25519 key signs the bundle)")
    request = ExportRequest(load_identities(args.identity), load_or_create_signing_key(signing),
                            args.who, args.reason)
    catalogue = open_catalogue(_catalogue_url(args))
    try:
        import time

        done = export_recordings(catalogue, objects, devices, args.ids, args.out, request,
                                 iso_utc_ms(time.time()))
    finally:
        catalogue.close()
    for folder in done:
        print(f"{folder}: bundle written")
    return 0


def cmd_central_verify(args: argparse.Namespace) -> int:
    from firmware.keys import load_public_key
    from sync.central.export import verify_bundle

    problems = verify_bundle(args.bundle, load_public_key(args.device_key),
                             load_public_key(args.central_key))
    for problem in problems:
        print(f"{args.bundle}: FAIL: {problem}")
    if problems:
        return EXIT_FAILED
    print(f"{args.bundle}: ok (device signature, object hash, audit chain to the anchored "
          "head, countersignature, MANIFEST.sha256)")
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from provisioning.commands import cmd_provision as run

    return run(args)


def cmd_provision_agent(args: argparse.Namespace) -> int:
    from provisioning.commands import cmd_provision_agent as run

    return run(args)


def cmd_factory_reset(args: argparse.Namespace) -> int:
    from provisioning.commands import cmd_factory_reset as run

    return run(args)


def cmd_config_check(args: argparse.Namespace) -> int:
    from firmware.config import load_config

    config = load_config(args.file)
    print(f"{args.file}: ok (device {config.device_id}, {config.jurisdiction}, "
          f"{len(config.lines)} line(s))")
    return 0


def cmd_recordings_list(args: argparse.Namespace) -> int:
    from firmware.catalogue import Catalogue
    from firmware.config import load_config
    from firmware.report import print_recordings

    config = load_config(args.config)
    rows = Catalogue.read_only(config.catalogue_path).recordings(limit=args.limit)
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
    else:
        print_recordings(rows)
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    from firmware.agecrypt import load_identities
    from firmware.recfile import decrypt_recording, write_wav

    identities = load_identities(args.identity)
    rec = decrypt_recording(args.file, identities)
    write_wav(args.output, rec.pcm)
    state = "complete" if rec.complete else f"INTERRUPTED ({rec.error or 'no end record'})"
    print(f"{args.output}: {len(rec.pcm) / 8000:.1f} s of audio, recording {state}, "
          f"{len(rec.gaps)} gap(s)")
    return 0 if rec.complete or not args.strict else EXIT_FAILED


def cmd_export_age(args: argparse.Namespace) -> int:
    from firmware.agecrypt import Recipient, load_identities
    from firmware.recfile import export_age

    identities = load_identities(args.identity)
    recipients = [Recipient.parse(r) for r in args.recipient] or [
        identities[0].recipient]
    export_age(args.file, identities, args.output, recipients)
    print(f"{args.output}: age file for {len(recipients)} recipient(s)")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from firmware.audit import verify_audit
    from firmware.config import load_config
    from firmware.keys import load_public_key

    if args.config is not None:
        config = load_config(args.config)
        db, device_id = config.catalogue_path, config.device_id
        pubkey_path = args.pubkey or Path(str(config.device_key_path) + ".pub")
    elif args.db is not None and args.pubkey is not None:
        db, device_id, pubkey_path = args.db, None, args.pubkey
    else:
        raise UsageError("audit verify: give --config FILE, or --db DB and --pubkey PEM")
    report = verify_audit(db, load_public_key(pubkey_path), device_id=device_id,
                          check_files=args.recordings)
    print(report.message)
    return 0 if report.ok else EXIT_FAILED


def cmd_keygen(args: argparse.Namespace) -> int:
    from firmware.agecrypt import Identity
    from firmware.fsutil import atomic_write

    identity = Identity.generate()
    if args.output.exists():
        raise UsageError(f"{args.output}: exists; refusing to overwrite a key")
    text = f"# public key: {identity.recipient}\n{identity}\n"
    atomic_write(args.output, text.encode(), 0o600)
    print(identity.recipient)
    return 0


def cmd_sim_render(args: argparse.Namespace) -> int:
    from drivers.sim.backend import render
    from drivers.sim.scenario import load_scenario
    from firmware.recfile import write_wav

    scenario = load_scenario(args.scenario)
    pcm, events, truth = render(scenario)
    write_wav(args.output, pcm)
    if args.events:
        with args.events.open("w", encoding="utf-8") as out:
            for ev in events:
                out.write(json.dumps({"t": ev.t, "signal": ev.signal.value}) + "\n")
    print(f"{args.output}: {len(pcm) / 8000:.1f} s, {len(events)} signal events, "
          f"{len(truth)} call(s)")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from drivers.dsp.analyzer import FILE_BATCH_SAMPLES, LineAnalyzer
    from firmware.analyze import analyze_file

    analyzer = LineAnalyzer(country=args.country, batch_samples=FILE_BATCH_SAMPLES)
    analyze_file(args.file, analyzer, sys.stdout, as_json=args.json)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from firmware.demo import run_demo

    return run_demo(out_dir=args.out, speed=args.speed, scenario=args.scenario)


def cmd_policy(args: argparse.Namespace) -> int:
    from firmware.report import policy_markdown, print_policy

    policy, _ = _load_policy(args)
    if args.markdown:
        print(policy_markdown(policy), end="")
    else:
        print_policy(policy)
    return 0


def cmd_policy_show(args: argparse.Namespace) -> int:
    from firmware.compliance import CompliancePolicy, SitePolicy
    from firmware.policy import CallFacts

    policy, config = _load_policy(args)
    directions = ("inbound", "outbound") if args.direction == "unknown" else (args.direction,)
    rules = [policy.rule(args.country, d) for d in directions]
    site = SitePolicy.from_config(config) if config is not None else SitePolicy()
    number = args.number
    decision = CompliancePolicy(policy, args.country, site).decide(CallFacts(
        line_id="-", jurisdiction=args.country, direction=args.direction,
        caller_number=number if args.direction != "outbound" else None,
        dialed_number=number if args.direction != "inbound" else None))
    info = {**decision.as_dict(), "name": rules[0].name,
            "emergency_numbers": list(rules[0].emergency),
            "notes": " ".join(dict.fromkeys(r.notes for r in rules if r.notes)),
            "policy_source": policy.source, "policy_published": policy.published}
    if args.json:
        print(json.dumps(info, sort_keys=True, ensure_ascii=False))
    else:
        print(_decision_text(info))
    return 0


def _decision_text(info: dict[str, Any]) -> str:
    mode = info["mode"]
    if mode == "consent_gate":
        mode += (f' (keys "{info["consent_digits"]}" mean yes, '
                 f'wait {info["consent_timeout_s"]:g} s)')
    elif mode == "notice_beep" and info["beep"]:
        freq_hz, duration_s, period_s = info["beep"]
        mode += f" ({freq_hz:g} Hz for {duration_s:g} s every {period_s:g} s)"
    retention = info["retention_days"]
    lines = [f'{info["jurisdiction"]} {info["direction"]} ({info["name"]}): '
             f'policy {info["policy_id"]} v{info["policy_version"]}, '
             f'sha256 {info["policy_hash"]}',
             f'  record:     {"yes" if info["record"] else "no"}',
             f"  mode:       {mode}",
             f'  basis:      {info["basis"] or "-"}',
             f"  retention:  {f'{retention} days' if retention else '-'}",
             f'  language:   {info["language"]}',
             f'  emergency:  {", ".join(info["emergency_numbers"])}',
             "  reviewed:   " + ("yes" if info["reviewed"]
                                 else "NO - not reviewed by counsel"),
             f'  reason:     {info["reason"]}',
             "  sources:"]
    lines += [f"    - {source}" for source in info["sources"]]
    if info["notes"]:
        lines.append(f'  notes:      {info["notes"]}')
    return "\n".join(lines)


def cmd_policy_check(args: argparse.Namespace) -> int:
    from firmware.policyfile import parse_policy, verify_policy

    data = args.file.read_bytes()
    signed = ""
    if args.sig is not None or args.pubkey:
        if args.sig is None or not args.pubkey:
            raise UsageError("policy check: --sig and --pubkey go together")
        verify_policy(data, args.sig.read_bytes(), args.pubkey, source=str(args.sig))
        signed = ", signature ok"
    policy = parse_policy(data, str(args.file))
    rules = list(policy.rules())
    unreviewed = sum(not rule.reviewed for rule in rules)
    print(f"{args.file}: ok ({policy.id} version {policy.version}, "
          f"{len(policy.jurisdictions())} jurisdictions, {len(rules)} rules, "
          f"{unreviewed} not reviewed by counsel{signed})")
    return 0


def cmd_policy_sign(args: argparse.Namespace) -> int:
    from firmware.fsutil import atomic_write
    from firmware.policyfile import parse_policy, public_key_text, sign_policy
    from firmware.policystore import POLICY_FILE_MODE, load_signing_key

    key = load_signing_key(args.key)
    data = args.file.read_bytes()
    policy = parse_policy(data, str(args.file))  # never sign a file the appliance refuses
    atomic_write(args.output, sign_policy(data, key), POLICY_FILE_MODE)
    print(f"{args.output}: signature of {args.file} ({policy.id} version {policy.version}) "
          f"by key {public_key_text(key.public_key())}")
    return 0


def cmd_policy_keygen(args: argparse.Namespace) -> int:
    from firmware.policyfile import public_key_text
    from firmware.policystore import create_signing_key

    key = create_signing_key(args.output)
    print(public_key_text(key.public_key()))
    return 0


def cmd_policy_install(args: argparse.Namespace) -> int:
    from firmware.config import load_config
    from firmware.policystore import install_policy, installed_path

    config = load_config(args.config)
    policy = install_policy(config, args.file.read_bytes(), args.sig.read_bytes(),
                            source=str(args.file))
    print(f"{installed_path(config)}: installed {policy.id} version {policy.version} "
          f"(sha256 {policy.sha256[:16]})")
    return 0


def _load_policy(args: argparse.Namespace) -> tuple[PolicySet, Config | None]:
    """--file (shown as is, signed or not), else --config's policy in force, else built-in."""
    from firmware.config import load_config
    from firmware.policyfile import PolicyError
    from firmware.policystore import BUILTIN_PATH, load_active_policy, read_policy

    config = load_config(args.config) if args.config is not None else None
    if args.file is not None:
        return read_policy(args.file), config
    if config is None:
        return read_policy(BUILTIN_PATH), None
    policy, problems = load_active_policy(config)
    for problem in problems:
        print(f"edge-recorder: warning: {problem}", file=sys.stderr)
    if policy is None:
        raise PolicyError(f"{args.config}: no valid compliance policy "
                          f"({len(problems)} candidate(s) refused)")
    return policy, config


# --- parser --------------------------------------------------------------------------------
def _existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return path


def _country(value: str) -> str:
    from drivers.toneplan import countries

    code = value.upper()
    code = "UK" if code == "GB" else code
    if code not in countries():
        raise argparse.ArgumentTypeError(
            f"unknown country {value!r}; known: {', '.join(sorted(countries()))}")
    return code


def _jurisdiction(value: str) -> str:
    import re

    code = value.strip().upper()
    if not re.match(r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$", code):
        raise argparse.ArgumentTypeError(f"{value!r} is not a jurisdiction code (DE, US-CA)")
    return code


def _signer(value: str) -> Ed25519PublicKey:
    from firmware.policyfile import PolicyError, parse_public_key

    try:
        return parse_public_key(value)
    except PolicyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return number


def build_parser() -> _Parser:
    parser = _Parser(prog="edge-recorder", description="Call-recording appliance firmware.")
    parser.add_argument("--version", action="version", version=f"edge-recorder {__version__}")
    parser.add_argument("--debug", action="store_true", help="tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, func: Callable[[argparse.Namespace], int], helptext: str,
            parent: Any = sub) -> _Parser:
        p: _Parser = parent.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(func=func)
        return p

    config_kw: dict[str, Any] = {"type": Path, "default": DEFAULT_PATH,
                                 "help": f"config file (default {DEFAULT_PATH})"}
    p = add("run", cmd_run, "run the recorder on every configured line")
    p.add_argument("--config", **config_kw)
    p.add_argument("--until-lines-end", action="store_true",
                   help="exit when every line has ended (simulated lines)")

    p = add("sync", cmd_sync, "upload recordings and the audit trail to the central store")
    p.add_argument("--config", **config_kw)

    central = add("central", lambda a: 0, "the central compliance store")
    central_sub = central.add_subparsers(dest="central_command", required=True,
                                         parser_class=_Parser)
    _add_central_commands(add, central_sub)
    p = add("fleet", cmd_fleet, "the devices' state from the central catalogue")
    p.add_argument("--catalogue", help="sqlite:///PATH or postgresql://...")
    p.add_argument("--config", type=_existing_file, default=None,
                   help="central config file: catalogue and alert thresholds")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p.add_argument("--watch", type=_positive, nargs="?", const=5.0, default=None,
                   metavar="SECONDS", help="refresh a live table every SECONDS (default 5)")

    _add_provision_commands(add)

    cfg = add("config", lambda a: 0, "configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    p = add("check", cmd_config_check, "validate a config file", cfg_sub)
    p.add_argument("file", type=Path)

    recs = add("recordings", lambda a: 0, "the recording catalogue")
    recs_sub = recs.add_subparsers(dest="recordings_command", required=True, parser_class=_Parser)
    p = add("list", cmd_recordings_list, "list recordings, newest first", recs_sub)
    p.add_argument("--config", **config_kw)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--limit", type=int, default=None)

    p = add("decrypt", cmd_decrypt, "decrypt a recording to WAV (central side: needs a key)")
    p.add_argument("--identity", type=_existing_file, required=True, help="age identity file")
    p.add_argument("file", type=_existing_file)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--strict", action="store_true", help="fail on an interrupted recording")

    p = add("export-age", cmd_export_age, "re-encrypt a recording as a standard age file")
    p.add_argument("--identity", type=_existing_file, required=True)
    p.add_argument("-r", "--recipient", action="append", default=[],
                   help="age recipient (default: the identity's own)")
    p.add_argument("file", type=_existing_file)
    p.add_argument("-o", "--output", type=Path, required=True)

    aud = add("audit", lambda a: 0, "the audit trail")
    aud_sub = aud.add_subparsers(dest="audit_command", required=True, parser_class=_Parser)
    p = add("verify", cmd_audit_verify, "verify the hash chain and signed checkpoints", aud_sub)
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--db", type=_existing_file, default=None)
    p.add_argument("--pubkey", type=_existing_file, default=None,
                   help="device public key (PEM)")
    p.add_argument("--recordings", action="store_true",
                   help="also check every recording file against its audited sha256")

    p = add("keygen", cmd_keygen, "generate an age identity (central store, escrow)")
    p.add_argument("-o", "--output", type=Path, required=True)

    sim = add("sim", lambda a: 0, "the simulated line")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True, parser_class=_Parser)
    p = add("render", cmd_sim_render, "render a scenario to a WAV file", sim_sub)
    p.add_argument("scenario", type=_existing_file)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--events", type=Path, default=None, help="also write signals as JSON lines")

    p = add("analyze", cmd_analyze, "what the line detectors hear in a WAV file")
    p.add_argument("file", type=_existing_file, help="8 kHz WAV")
    p.add_argument("--country", type=_country, default="US",
                   help="tone plan and caller-ID defaults (default US)")
    p.add_argument("--json", action="store_true", help="one JSON object per event")

    _add_policy_commands(add)

    p = add("demo", cmd_demo, "the one-command tour: a dealer's day on the simulated line")
    p.add_argument("--out", type=Path, default=None, help="keep the demo files here")
    p.add_argument("--speed", type=_positive, default=0.0,
                   help="times real time (0 = as fast as possible)")
    p.add_argument("--scenario", type=_existing_file, default=None)
    return parser


def _add_central_commands(add: Callable[..., _Parser], central_sub: Any) -> None:
    def catalogue_options(p: _Parser) -> None:
        p.add_argument("--config", type=_existing_file, default=None,
                       help="central config file (catalogue, objects, keys)")
        p.add_argument("--catalogue", help="sqlite:///PATH or postgresql://...")

    p = add("ingest", cmd_central_ingest, "run one ingest worker (options after --: python "
            "-m sync.central --help)", central_sub)
    p.add_argument("--config", type=_existing_file, default=None, help="central config file")
    p.add_argument("options", nargs="*", help="after --: the worker's options")

    p = add("search", cmd_central_search, "find recordings by number, time and device",
            central_sub)
    catalogue_options(p)
    p.add_argument("--dir", type=Path, default=None, help="object folder (its catalogue.db)")
    p.add_argument("--number", default=None, help="a phone number (committed: exact match)")
    p.add_argument("--from", dest="start", type=_iso_utc, default=None,
                   help="started at or after (ISO 8601; UTC if no offset)")
    p.add_argument("--to", dest="end", type=_iso_utc, default=None, help="started before")
    p.add_argument("--device", default=None, help="device id")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = add("export", cmd_central_export, "export recordings as verifiable bundles "
            "(dispute, subject access); the export is audited", central_sub)
    p.add_argument("ids", nargs="+", metavar="ID", help="recording id")
    catalogue_options(p)
    p.add_argument("--identity", type=_existing_file, required=True, help="age identity file")
    p.add_argument("--out", type=Path, required=True, help="bundles go to OUT/<id>/")
    p.add_argument("--reason", required=True, help="why (recorded in the catalogue)")
    p.add_argument("--who", required=True, help="who asks (recorded in the catalogue)")
    p.add_argument("--dir", type=Path, default=None, help="the central object folder")
    p.add_argument("--devices", type=Path, default=None,
                   help="device public keys (default DIR/devices)")
    p.add_argument("--signing-key", type=Path, default=None,
                   help="central's Ed25519 key (signs the bundle's MANIFEST.sha256)")

    p = add("verify", cmd_central_verify, "check an export bundle with public keys only",
            central_sub)
    p.add_argument("bundle", type=Path)
    p.add_argument("--device-key", type=_existing_file, required=True,
                   help="the device's Ed25519 public key (PEM)")
    p.add_argument("--central-key", type=_existing_file, required=True,
                   help="central's Ed25519 public key (PEM)")


def _iso_utc(value: str) -> str:
    """An ISO 8601 time as the catalogue stores it (UTC, milliseconds, Z)."""
    from datetime import UTC, datetime

    from firmware.catalogue import iso_utc_ms

    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return iso_utc_ms(when.timestamp())


def _add_provision_commands(add: Callable[..., _Parser]) -> None:
    from provisioning.cliargs import add_agent_arguments, add_provision_arguments

    p = add("provision", cmd_provision,
            "provision a box over serial: settings, keys, certificate, self-tests, lock")
    add_provision_arguments(p)
    p = add("provision-agent", cmd_provision_agent,
            "answer provisioning requests on a serial port (runs on the appliance)")
    add_agent_arguments(p, DEFAULT_PATH)
    p = add("factory-reset", cmd_factory_reset,
            "wipe keys, recordings and config (root, at the box); refuses while unsynced")
    p.add_argument("--config", type=Path, default=DEFAULT_PATH,
                   help=f"config file (default {DEFAULT_PATH})")
    p.add_argument("--force-destroy-unsynced", action="store_true",
                   help="also destroy recordings the central store never confirmed")


def _add_policy_commands(add: Callable[..., _Parser]) -> None:
    pol = add("policy", cmd_policy, "the compliance policy: every rule, signing, updates")
    pol.add_argument("--config", type=Path, default=None,
                     help="show the policy in force for this config (default: built-in)")
    pol.add_argument("--file", type=_existing_file, default=None,
                     help="show this policy file (its signature is not checked)")
    pol.add_argument("--markdown", action="store_true",
                     help="the table as Markdown (docs/COMPLIANCE.md)")
    pol_sub = pol.add_subparsers(dest="policy_command", parser_class=_Parser)

    p = add("show", cmd_policy_show, "the decision for one jurisdiction and direction",
            pol_sub)
    p.add_argument("--country", type=_jurisdiction, required=True, help="DE, UK, US-CA...")
    p.add_argument("--direction", choices=("inbound", "outbound", "unknown"), required=True)
    p.add_argument("--number", default=None, help="try a phone number (emergency, DNR...)")
    p.add_argument("--config", type=Path, default=None,
                   help="apply this config's site settings and policy in force")
    p.add_argument("--file", type=_existing_file, default=None, help="policy file to use")
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = add("check", cmd_policy_check, "validate a policy file (and verify its signature)",
            pol_sub)
    p.add_argument("file", type=_existing_file)
    p.add_argument("--sig", type=_existing_file, default=None, help="detached signature")
    p.add_argument("--pubkey", type=_signer, action="append", default=[],
                   help="base64 Ed25519 public key allowed to sign (repeatable)")

    p = add("sign", cmd_policy_sign, "sign a policy file with an Ed25519 key (ops side)",
            pol_sub)
    p.add_argument("file", type=_existing_file)
    p.add_argument("--key", type=_existing_file, required=True, help="private key (PEM)")
    p.add_argument("-o", "--output", type=Path, required=True, help="signature file")

    p = add("keygen", cmd_policy_keygen,
            "make a policy signing key; prints the public key for policy.signers", pol_sub)
    p.add_argument("-o", "--output", type=Path, required=True, help="private key (PEM)")

    p = add("install", cmd_policy_install, "install a signed policy update on this appliance",
            pol_sub)
    p.add_argument("file", type=_existing_file)
    p.add_argument("--sig", type=_existing_file, required=True)
    p.add_argument("--config", type=Path, default=DEFAULT_PATH,
                   help=f"config file (default {DEFAULT_PATH})")


def _setup_logging(debug: bool) -> None:
    # Under systemd, journald adds time and unit: log level and logger name only.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format=fmt,
                        stream=sys.stderr)


def _is_ours(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in _OUR_PACKAGES


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"edge-recorder: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(args.debug)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"edge-recorder: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `edge-recorder ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        if debug:
            raise
        if _is_ours(exc):
            print(f"edge-recorder: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(exc, OSError):
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"edge-recorder: error: {where}{exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"edge-recorder: internal error: {type(exc).__name__}: {exc} "
              "(run with --debug for details)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())

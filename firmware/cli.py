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
from typing import Any, NoReturn

from firmware import __version__
from firmware.config import DEFAULT_PATH

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
    from drivers.dsp.analyzer import LineAnalyzer
    from firmware.analyze import analyze_file

    analyze_file(args.file, LineAnalyzer(country=args.country), sys.stdout, as_json=args.json)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from firmware.demo import run_demo

    return run_demo(out_dir=args.out, speed=args.speed, scenario=args.scenario)


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

    p = add("demo", cmd_demo, "the one-command tour: a dealer's day on the simulated line")
    p.add_argument("--out", type=Path, default=None, help="keep the demo files here")
    p.add_argument("--speed", type=_positive, default=0.0,
                   help="times real time (0 = as fast as possible)")
    p.add_argument("--scenario", type=_existing_file, default=None)
    return parser


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

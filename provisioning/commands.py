"""`edge-recorder provision` and `edge-recorder provision-agent` (wired in firmware/cli.py)."""

from __future__ import annotations

import argparse
import getpass
import signal
import sys
import threading
import time
from types import FrameType

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

from provisioning.cliargs import ALL_SELFTESTS
from provisioning.tool import (
    Client,
    InstallPlan,
    PkiPlan,
    Plan,
    ProvisionError,
    Reporter,
    apply_ticket,
    fetch_challenge,
    load_plan,
    provision,
    read_ticket,
    unlock,
    write_doc,
)
from provisioning.transport import open_port


class RichReporter(Reporter):
    """Steps as lines with a tick, transfers as a byte bar (stderr; stdout stays for data)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress: Progress | None = None
        self._task: int | None = None

    def step(self, name: str, detail: str) -> None:
        self._end_transfer()
        mark = "[red]x[/]" if "FAILED" in detail else "[green]v[/]"
        self.console.print(f"{mark} [bold]{name}[/]: {detail}", highlight=False)

    def transfer(self, name: str, done_bytes: int, total_bytes: int) -> None:
        if self._progress is None:
            self._progress = Progress(TextColumn("  {task.description}"), BarColumn(),
                                      DownloadColumn(), console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(name, total=total_bytes)
        assert self._task is not None
        self._progress.update(self._task, completed=done_bytes, total=total_bytes,
                              description=name)
        if done_bytes >= total_bytes:
            self._end_transfer()

    def _end_transfer(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress, self._task = None, None


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The plan file, with any flag given on the command line taking precedence."""
    plan = load_plan(args.plan) if args.plan else Plan()
    if args.secret_file:
        plan.secret_file, plan.secret = str(args.secret_file.resolve()), None
    if args.settings:
        plan.settings_file = str(args.settings.resolve())
    if args.selftests:
        plan.selftests = [name.strip() for name in args.selftests.split(",") if name.strip()]
        unknown = [name for name in plan.selftests if name not in ALL_SELFTESTS]
        if unknown:
            raise ProvisionError(f"--selftests: unknown {unknown[0]!r}; known: "
                                 f"{', '.join(ALL_SELFTESTS)}")
    plan.lock = plan.lock or args.lock
    _pki_flags(plan, args)
    if args.broker or args.ops_public_key:
        plan.install = _install_flags(plan.install, args)
    return plan


def _pki_flags(plan: Plan, args: argparse.Namespace) -> None:
    fields = {"ca_cert": args.ca_cert, "ca_key": args.ca_key, "csr_out": args.csr_out,
              "certificate": args.certificate, "chain": args.chain}
    given = {key: str(value.resolve()) for key, value in fields.items() if value is not None}
    if given:
        current = {key: getattr(plan.pki, key) for key in fields}
        plan.pki = PkiPlan(**{**current, **given})


def _install_flags(current: InstallPlan | None, args: argparse.Namespace) -> InstallPlan:
    host = current.broker_host if current else None
    port = current.broker_port if current else 8883
    if args.broker:
        host, _, port_text = args.broker.rpartition(":") if ":" in args.broker else (
            args.broker, "", str(port))
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ProvisionError(f"--broker: {args.broker!r}: expected HOST[:PORT]")
        port = int(port_text)
    ops = args.ops_public_key or (current.ops_public_key if current else None)
    if not host or not ops:
        raise ProvisionError("--broker and --ops-public-key are both needed to install")
    return InstallPlan(broker_host=host, broker_port=port, ops_public_key=ops)


def cmd_provision(args: argparse.Namespace) -> int:
    if args.action == "unlock" or args.unlock_key:
        return _cmd_unlock(args)
    if args.challenge_out or args.ticket:
        raise ProvisionError("--challenge-out and --ticket belong to `provision unlock`")
    plan = plan_from_args(args)
    console = Console(stderr=True)
    interactive = sys.stdin.isatty() and not args.yes
    fresh = not args.plan and plan.settings_file is None and plan.pki.certificate is None
    if fresh and not interactive and not args.yes:
        raise ProvisionError("provision: no --plan or --settings, and stdin is not a terminal "
                             "for guided mode (or --yes to continue a configured device)")
    if interactive and fresh:
        from provisioning.guided import ask_plan

        ask_plan(plan, console)
    if plan.secret_bytes() is None and interactive:
        plan.secret = getpass.getpass("label secret: ")
    if plan.lock and interactive and console.input("lock the device after the self-tests? "
                                                   "[y/N] ").strip().lower() != "y":
        plan.lock = False
    port = open_port(args.port, args.baud)
    try:
        outcome = provision(Client(port, name=args.port), plan, RichReporter(console))
    finally:
        port.close()
    if outcome.csr_path is not None:
        print(f"{outcome.serial}: CSR written to {outcome.csr_path}; state {outcome.state}")  # noqa: T201 - CLI output
    else:
        print(f"{outcome.serial}: state {outcome.state}")  # noqa: T201 - CLI output
    return 0


def _cmd_unlock(args: argparse.Namespace) -> int:
    """`provision unlock`: write the challenge, or present the ops ticket (or sign on the
    bench with --unlock-key)."""
    modes = [m for m in (args.challenge_out, args.ticket, args.unlock_key) if m is not None]
    if len(modes) != 1:
        raise ProvisionError("provision unlock: give exactly one of --challenge-out, --ticket, "
                             "--unlock-key")
    plan = load_plan(args.plan) if args.plan else Plan()
    if args.secret_file:
        plan.secret_file, plan.secret = str(args.secret_file.resolve()), None
    port = open_port(args.port, args.baud)
    try:
        client = Client(port, name=args.port)
        if args.challenge_out:
            challenge = fetch_challenge(client)
            write_doc(args.challenge_out, challenge)
            print(f"{args.challenge_out}: challenge of serial {challenge['serial']} (device "  # noqa: T201 - CLI output
                  f"{challenge['device_id'] or '-'}, state {challenge['state']}); have ops "
                  "sign it")
            return 0
        secret = _unlock_secret(plan, args)
        if args.ticket:
            ticket = read_ticket(args.ticket)
            state = apply_ticket(client, secret, ticket, str(args.ticket))
        else:
            state = unlock(client, secret, args.unlock_key, time.time())
    finally:
        port.close()
    print(f"{args.port}: unlocked, state {state}")  # noqa: T201 - CLI output
    return 0


def _unlock_secret(plan: Plan, args: argparse.Namespace) -> bytes:
    secret = plan.secret_bytes()
    if secret is None and sys.stdin.isatty() and not args.yes:
        secret = getpass.getpass("label secret: ").encode()
    if secret is None:
        raise ProvisionError("unlock: no label secret (--secret-file or the plan's secret)")
    return secret


def cmd_provision_agent(args: argparse.Namespace) -> int:
    from provisioning.agent import (
        AgentPaths,
        DeviceIdentity,
        read_secret,
        read_serial,
        run_agent,
    )

    identity = DeviceIdentity(serial=args.serial or read_serial(),
                              secret=read_secret(args.secret_file))
    paths = AgentPaths(data_dir=args.data_dir, config_path=args.config)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return run_agent(args.port, paths, identity, args.baud, stop)


def cmd_factory_reset(args: argparse.Namespace) -> int:
    import os

    from firmware.config import load_config
    from provisioning.reset import factory_reset

    if os.geteuid() != 0:
        raise ProvisionError("factory-reset: must run as root, at the box")
    config = load_config(args.config)
    if args.force_destroy_unsynced:
        Console(stderr=True).print("[bold red]WARNING: recordings the central store has not "
                                   "confirmed will be destroyed for good[/]")
    report = factory_reset(config, args.config,
                           force_destroy_unsynced=args.force_destroy_unsynced)
    print(f"factory reset: removed {len(report.removed)} path(s); "  # noqa: T201 - CLI output
          f"{len(report.unsynced_destroyed)} unsynced recording(s) destroyed")
    return 0

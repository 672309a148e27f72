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
    load_plan,
    provision,
    unlock,
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
    plan = plan_from_args(args)
    console = Console(stderr=True)
    interactive = sys.stdin.isatty() and not args.yes
    if plan.secret_bytes() is None and interactive:
        plan.secret = getpass.getpass("label secret: ")
    if plan.lock and interactive and console.input("lock the device after the self-tests? "
                                                   "[y/N] ").strip().lower() != "y":
        plan.lock = False
    port = open_port(args.port, args.baud)
    try:
        client = Client(port, name=args.port)
        if args.unlock_key:
            secret = plan.secret_bytes()
            if secret is None:
                raise ProvisionError("unlock: no label secret")
            state = unlock(client, secret, args.unlock_key, time.time())
            print(f"{args.port}: unlocked, state {state}")  # noqa: T201 - CLI output
            return 0
        outcome = provision(client, plan, RichReporter(console))
    finally:
        port.close()
    if outcome.csr_path is not None:
        print(f"{outcome.serial}: CSR written to {outcome.csr_path}; state {outcome.state}")  # noqa: T201 - CLI output
    else:
        print(f"{outcome.serial}: state {outcome.state}")  # noqa: T201 - CLI output
    return 0


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

"""Guided mode of `edge-recorder provision`: ask for each setting, check it with the
configuration schema, and fill the plan. Bulk work keeps using a plan file or flags."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.prompt import Confirm, IntPrompt, Prompt

from firmware.config import ConfigError, parse_config
from provisioning.agent import AgentPaths, InstallFacts, compose_config
from provisioning.tool import InstallPlan, PkiPlan, Plan

log = logging.getLogger(__name__)

MAX_ROUNDS = 5  # give up after this many rejected answers in a row
CHECK_DATA_DIR = Path("/var/lib/edge-recorder")  # the device's own path; only for the check


class GuidedError(Exception):
    """The engineer's answers were rejected too often (message says which key)."""


@dataclass
class Answers:
    device_id: str = ""
    site: str = ""
    jurisdiction: str = ""
    recipient: str = ""
    line_id: str = "line1"
    backend: str = "sim"
    scenario: str = ""

    def settings_toml(self) -> str:
        text = (f"device_id = {json.dumps(self.device_id)}\nsite = {json.dumps(self.site)}\n"
                f"jurisdiction = {json.dumps(self.jurisdiction)}\n\n[keys]\n"
                f"recipients = [{json.dumps(self.recipient)}]\n\n[[lines]]\n"
                f"id = {json.dumps(self.line_id)}\nbackend = {json.dumps(self.backend)}\n")
        if self.scenario:
            text += f"[lines.options]\nscenario = {json.dumps(self.scenario)}\n"
        return text


def check_settings(text: str, install: InstallFacts | None = None) -> str:
    """The device id; raises ConfigError naming the key if the settings (and the broker
    answers, when given) would not make a valid config."""
    paths = AgentPaths(data_dir=CHECK_DATA_DIR, config_path=Path("settings"))
    return parse_config(compose_config(text, paths, install), "settings").device_id


def _ask(console: Console, answers: Answers) -> None:
    from drivers.registry import backend_names

    answers.device_id = Prompt.ask("device id", default=answers.device_id or None,
                                   console=console) or ""
    answers.site = Prompt.ask("site (dealer name)", default=answers.site or None,
                              console=console) or ""
    answers.jurisdiction = Prompt.ask("jurisdiction (ISO country, e.g. DE)",
                                      default=answers.jurisdiction or None, console=console) or ""
    answers.recipient = Prompt.ask("central store recipient (age1...)",
                                   default=answers.recipient or None, console=console) or ""
    answers.line_id = Prompt.ask("line id", default=answers.line_id, console=console)
    answers.backend = Prompt.ask("line backend", choices=backend_names(),
                                 default=answers.backend, console=console)
    if answers.backend == "sim":
        answers.scenario = Prompt.ask("simulated line scenario file",
                                      default=answers.scenario or None, console=console) or ""


def ask_settings(console: Console) -> str:
    """Settings TOML the schema accepts; asks again after each rejection."""
    answers = Answers()
    for _ in range(MAX_ROUNDS):
        _ask(console, answers)
        text = answers.settings_toml()
        try:
            check_settings(text)
        except ConfigError as exc:
            console.print(f"[red]rejected[/]: {exc}", highlight=False)
            continue
        return text
    raise GuidedError(f"settings rejected {MAX_ROUNDS} times; giving up")


def _ask_pki(plan: Plan, console: Console) -> None:
    if plan.pki.ca_key or plan.pki.csr_out or plan.pki.certificate:
        return
    if Confirm.ask("sign the device's CSR here with a local CA (bench)?", default=False,
                   console=console):
        plan.pki = PkiPlan(ca_cert=Prompt.ask("CA certificate file", console=console),
                           ca_key=Prompt.ask("CA key file", console=console))
    else:
        plan.pki = PkiPlan(csr_out=Prompt.ask("write the CSR for the company PKI to",
                                              default="device.csr", console=console))


def _ask_broker(console: Console, facts: InstallFacts) -> InstallFacts:
    host = Prompt.ask("MQTT broker host", default=facts.broker_host or None,
                      console=console) or ""
    port = IntPrompt.ask("MQTT broker port", default=facts.broker_port, console=console)
    ops = Prompt.ask("ops public key (base64 Ed25519)", default=facts.ops_public_key or None,
                     console=console) or ""
    return InstallFacts(broker_host=host, broker_port=port, ops_public_key=ops)


def _ask_install(plan: Plan, settings_text: str, console: Console) -> None:
    """The broker and ops key, checked as the device will check its config."""
    if plan.install is not None or plan.pki.csr_out:
        return
    facts = InstallFacts(broker_host="", broker_port=8883, ops_public_key="")
    for _ in range(MAX_ROUNDS):
        facts = _ask_broker(console, facts)
        try:
            check_settings(settings_text, facts)
        except ConfigError as exc:
            console.print(f"[red]rejected[/]: {exc}", highlight=False)
            continue
        plan.install = InstallPlan(broker_host=facts.broker_host, broker_port=facts.broker_port,
                                   ops_public_key=facts.ops_public_key)
        return
    raise GuidedError(f"broker answers rejected {MAX_ROUNDS} times; giving up")


def ask_plan(plan: Plan, console: Console, out_dir: Path = Path(".")) -> Path:
    """Fill ``plan`` from the engineer's answers; the settings file written (kept as a
    record of what was installed)."""
    try:
        text = ask_settings(console)
    except EOFError:
        raise GuidedError("input ended before every setting was answered") from None
    path = out_dir.resolve() / f"{check_settings(text)}.settings.toml"
    path.write_text(text, encoding="utf-8")
    console.print(f"settings written to {path}", highlight=False)
    plan.settings_file = str(path)
    try:
        _ask_pki(plan, console)
        _ask_install(plan, text, console)
    except EOFError:
        raise GuidedError("input ended before the PKI and broker were answered") from None
    return path

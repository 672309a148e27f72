"""Guided mode: the engineer's answers through rich prompts, checked by the config schema."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from firmware.agecrypt import Identity
from firmware.config import parse_config
from provisioning.agent import AgentPaths, compose_config
from provisioning.guided import GuidedError, ask_plan
from provisioning.tool import Plan

from .conftest import REPO

OPS_PUBLIC_KEY = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="  # RFC 8032 test 1 public key


class ScriptedConsole(Console):
    """A console whose keyboard is a list of answers; prompts and answers go to ``text``."""

    def __init__(self, answers: list[str]) -> None:
        super().__init__(file=io.StringIO(), width=200, force_terminal=False)
        self.answers = list(answers)
        self.prompts: list[str] = []

    def input(self, prompt: object = "", **_kw: object) -> str:
        self.print(prompt, end="")
        self.prompts.append(self.file.getvalue().splitlines()[-1])
        if not self.answers:
            raise EOFError
        answer = self.answers.pop(0)
        self.print(answer)
        return answer

    @property
    def text(self) -> str:
        out = self.file
        assert isinstance(out, io.StringIO)
        return out.getvalue()


def settings_answers(jurisdiction: str) -> list[str]:
    recipient = str(Identity.generate().recipient)
    scenario = str(REPO / "examples" / "dealer-day.toml")
    return ["er-guided-01", "Autohaus Guided", jurisdiction, recipient, "", "", scenario]


def test_rejected_answer_is_asked_again_and_settings_validate(tmp_path: Path) -> None:
    first = settings_answers("de")  # lower case: not an ISO code the schema accepts
    second = ["", "", "DE", "", "", "", ""]  # Enter keeps the earlier answers
    broker = ["broker.example.net", "99999", OPS_PUBLIC_KEY, "", "8884", ""]
    console = ScriptedConsole([*first, *second, "y", "ca.crt", "ca.key", *broker])
    plan = Plan()
    path = ask_plan(plan, console, tmp_path)
    assert "rejected[/]" not in console.text
    assert console.text.count("rejected: settings: jurisdiction:") == 1
    assert console.text.count("rejected: settings: sync.port:") == 1
    assert sum("jurisdiction" in p for p in console.prompts) == 2
    assert not console.answers
    assert path == tmp_path / "er-guided-01.settings.toml"
    config = parse_config(compose_config(path.read_text(), AgentPaths(tmp_path, tmp_path / "c"),
                                         None), str(path))
    assert (config.device_id, config.site, config.jurisdiction) == (
        "er-guided-01", "Autohaus Guided", "DE")
    assert config.keys.recipients == [first[3]] and config.lines[0].id == "line1"
    assert plan.settings_file == str(path)
    assert (plan.pki.ca_cert, plan.pki.ca_key) == ("ca.crt", "ca.key")
    assert plan.install is not None
    assert (plan.install.broker_host, plan.install.broker_port) == ("broker.example.net", 8884)
    assert plan.install.ops_public_key == OPS_PUBLIC_KEY


def test_company_pki_writes_a_csr_and_asks_no_broker(tmp_path: Path) -> None:
    console = ScriptedConsole([*settings_answers("DE"), "n", ""])
    plan = Plan()
    ask_plan(plan, console, tmp_path)
    assert plan.pki.csr_out == "device.csr" and plan.install is None
    assert not any("broker" in p for p in console.prompts)


def test_input_ending_is_one_error_naming_the_step(tmp_path: Path) -> None:
    with pytest.raises(GuidedError, match="input ended before every setting"):
        ask_plan(Plan(), ScriptedConsole(["er-guided-01"]), tmp_path)
    assert not list(tmp_path.iterdir())

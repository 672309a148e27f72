"""Signed envelopes: every refusal has its reason code, and the signature is checked first."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sync import envelope
from sync.envelope import (
    CLOCK_SKEW_S,
    MAX_ENVELOPE_BYTES,
    SIGNING_CONTEXT,
    Accepted,
    Payload,
    Reason,
    Rejected,
    canonical_json,
    make_body,
    sign,
    verify,
)

OPS = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
NOW = 1_790_000_000
DEVICE = "dev-a"


def command(**overrides: object) -> envelope.Body:
    fields = {"device": DEVICE, "version": 10, "issued_at": NOW, "valid_s": 600,
              "job_id": "job-1", "command": "status"} | overrides
    return make_body("command", **fields)  # type: ignore[arg-type]


def check(data: bytes, *, key: Ed25519PrivateKey | None = OPS, now_s: float = NOW,
          synced: bool = True, versions: dict[str, int] | None = None,
          known: dict[str, str] | None = None) -> Accepted:
    return verify(data, public_key=key.public_key() if key else None, device_id=DEVICE,
                  now_s=now_s, clock_synced=synced, last_versions=versions or {},
                  known_jobs=known or {})


def reason_of(data: bytes, **kwargs: object) -> Reason:
    with pytest.raises(Rejected) as caught:
        check(data, **kwargs)  # type: ignore[arg-type]
    return caught.value.reason


def raw_envelope(body_text: bytes, key: Ed25519PrivateKey = OPS) -> bytes:
    """Signed without the ops tool's checks: what a careless or hostile signer could send."""
    signature = key.sign(SIGNING_CONTEXT + body_text)
    return json.dumps({"format": envelope.FORMAT, "body": body_text.decode(),
                       "signature": base64.b64encode(signature).decode()}).encode()


def test_a_signed_command_verifies() -> None:
    accepted = check(sign(command(args={"lines": 5}), OPS))
    assert accepted.body.command == "status" and accepted.body.args == {"lines": 5}
    assert not accepted.duplicate and len(accepted.digest) == 64


def test_a_config_for_every_device_verifies() -> None:
    body = make_body("config", device="*", version=1, issued_at=NOW, valid_s=60,
                     payload=Payload(toml="x = 1"))
    assert check(sign(body, OPS)).body.payload == Payload(toml="x = 1")


def test_unsigned() -> None:
    data = json.loads(sign(command(), OPS))
    del data["signature"]
    assert reason_of(json.dumps(data).encode()) == Reason.UNSIGNED


def test_tampered_body_fails_the_signature() -> None:
    data = json.loads(sign(command(), OPS))
    data["body"] = data["body"].replace('"status"', '"reboot"')
    assert reason_of(json.dumps(data).encode()) == Reason.BAD_SIGNATURE


def test_signature_by_another_key() -> None:
    assert reason_of(sign(command(), OTHER)) == Reason.BAD_SIGNATURE


def test_no_pinned_key_refuses_everything() -> None:
    assert reason_of(sign(command(), OPS), key=None) == Reason.BAD_SIGNATURE


def test_signature_is_checked_before_anything_else() -> None:
    """Wrong device, expired and replayed: still only 'bad_signature' with a foreign key,
    and the rejection carries no body (nothing in it may be trusted)."""
    data = sign(command(device="dev-b", version=1), OTHER)
    with pytest.raises(Rejected) as caught:
        check(data, now_s=NOW + 10_000, versions={"command": 5})
    assert caught.value.reason == Reason.BAD_SIGNATURE and caught.value.body is None


def test_other_device() -> None:
    assert reason_of(sign(command(device="dev-b"), OPS)) == Reason.WRONG_DEVICE


def test_window_with_skew_allowance() -> None:
    data = sign(command(), OPS)  # valid NOW .. NOW + 600
    assert check(data, now_s=NOW + 600 + CLOCK_SKEW_S)
    assert reason_of(data, now_s=NOW + 601 + CLOCK_SKEW_S) == Reason.EXPIRED
    assert check(data, now_s=NOW - CLOCK_SKEW_S)
    assert reason_of(data, now_s=NOW - CLOCK_SKEW_S - 1) == Reason.NOT_YET_VALID


def test_unsynced_clock_skips_not_before_but_not_not_after() -> None:
    data = sign(command(), OPS)
    assert check(data, now_s=NOW - 86_400, synced=False)
    assert reason_of(data, now_s=NOW + 86_400, synced=False) == Reason.EXPIRED


def test_replayed_and_older_versions() -> None:
    data = sign(command(version=10), OPS)
    assert reason_of(data, versions={"command": 10}) == Reason.REPLAYED
    assert reason_of(data, versions={"command": 11}) == Reason.OLDER_VERSION
    assert check(data, versions={"command": 9, "config": 50})  # versions are per kind


def test_known_job_is_a_duplicate_and_reused_job_id_is_a_replay() -> None:
    data = sign(command(), OPS)
    digest = check(data).digest
    assert check(data, known={"job-1": digest}, versions={"command": 10}).duplicate
    other = sign(command(version=11, command="resync"), OPS)
    assert reason_of(other, known={"job-1": digest}) == Reason.REPLAYED


def test_redelivered_update_is_a_duplicate_and_a_new_one_is_not() -> None:
    body = make_body("config", device=DEVICE, version=3, issued_at=NOW, valid_s=60,
                     payload=Payload(toml="a = 1"))
    first = check(sign(body, OPS))
    assert check(sign(body, OPS), known={"config": first.digest},
                 versions={"config": 3}).duplicate
    newer = make_body("config", device=DEVICE, version=4, issued_at=NOW, valid_s=60,
                      payload=Payload(toml="a = 2"))
    assert not check(sign(newer, OPS), known={"config": first.digest},
                     versions={"config": 3}).duplicate


@pytest.mark.parametrize("data", [
    b"{not json", b"[]", b'{"format": "er-signed/1"}', b"",
    b'{"format": "other/1", "body": "{}", "signature": "AAAA"}',
])
def test_malformed_outer_envelope(data: bytes) -> None:
    assert reason_of(data) == Reason.MALFORMED


def test_oversize_is_refused_before_parsing() -> None:
    data = sign(command(args={"pad": "x" * MAX_ENVELOPE_BYTES}), OPS)
    with pytest.raises(Rejected, match="oversize") as caught:
        check(data)
    assert caught.value.reason == Reason.MALFORMED


@pytest.mark.parametrize("body_text", [
    b'{"kind": "command"}',  # not canonical (whitespace)
    b'{"command":"status","device":"dev-a","issued_at":1.5,"job_id":"j","kind":"command",'
    b'"not_after":2,"not_before":1,"version":1}',  # a float
    b'{"command":"status","device":"dev-a","issued_at":1,"kind":"command",'
    b'"not_after":2,"not_before":1,"version":1}',  # command without job id
    b'{"command":"status","device":"dev-a","issued_at":1,"job_id":"a/b","kind":"command",'
    b'"not_after":2,"not_before":1,"version":1}',  # job id not one topic level
    b'{"device":"dev-a","issued_at":1,"kind":"config","not_after":2,"not_before":1,'
    b'"version":1}',  # config without payload
    b'not json at all',
])
def test_signed_but_malformed_body(body_text: bytes) -> None:
    assert reason_of(raw_envelope(body_text)) == Reason.MALFORMED


def test_unknown_command() -> None:
    body = (b'{"command":"format_disk","device":"dev-a","issued_at":%d,"job_id":"j",'
            b'"kind":"command","not_after":%d,"not_before":%d,"version":1}'
            % (NOW, NOW + 60, NOW))
    with pytest.raises(Rejected) as caught:
        check(raw_envelope(body))
    assert caught.value.reason == Reason.UNKNOWN_COMMAND
    assert caught.value.body is not None and caught.value.body.job_id == "j"


def test_the_ops_tool_refuses_to_sign_what_a_device_would_refuse() -> None:
    with pytest.raises(Rejected):
        sign(command(command="format_disk"), OPS)
    with pytest.raises(Rejected):
        sign(command(device="no/slash"), OPS)


def test_canonical_json_is_sorted_compact_utf8_and_refuses_floats() -> None:
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()
    with pytest.raises(ValueError, match="float"):
        canonical_json({"a": [1.0]})

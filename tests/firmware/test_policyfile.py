"""The policy file: the shipped data, every validation error, inheritance, signatures,
emergency numbers."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.policyfile import (
    MODES,
    PolicyError,
    PolicySet,
    is_emergency,
    parse_policy,
    parse_public_key,
    public_key_text,
    sign_policy,
    verify_policy,
)
from firmware.policystore import BUILTIN_PATH
from tests.firmware.policydata import MINI

EU = ["IE", "DE", "FR", "IT", "ES", "PT", "NL", "BE", "LU", "AT", "DK", "SE", "FI", "PL", "CZ",
      "HU", "GR"]
REQUIRED = ["UK", *EU, "CH", "NO", "US", "US-CA", "US-FL", "US-IL", "US-MD", "US-MA", "US-MT",
            "US-NH", "US-PA", "US-WA", "CA", "AU", "IN", "JP", "ZA", "BR", "MX"]
ALL_PARTY = [code for code in REQUIRED if code.startswith("US-")]


@pytest.fixture(scope="module")
def builtin() -> PolicySet:
    return parse_policy(BUILTIN_PATH.read_bytes(), "policy.toml")


# --- the shipped data ----------------------------------------------------------------------
def test_builtin_policy_covers_every_required_jurisdiction(builtin: PolicySet) -> None:
    assert set(REQUIRED) <= set(builtin.jurisdictions())
    assert builtin.version >= 1 and builtin.id == "edge-recorder-policy"
    for rule in builtin.rules():
        assert rule.sources and all(s.strip() for s in rule.sources), rule
        assert rule.basis and 1 <= rule.retention_days <= 3650
        assert rule.emergency and rule.languages
        assert rule.reviewed is False, f"{rule.jurisdiction} claims a legal review"


def test_builtin_modes_follow_the_field_notes(builtin: PolicySet) -> None:
    def mode(code: str, direction: str) -> str:
        return builtin.rule(code, direction).mode

    assert mode("DE", "inbound") == mode("DE", "outbound") == "consent_gate"
    assert mode("DK", "inbound") == mode("DK", "outbound") == "consent_gate"
    assert (mode("FR", "inbound"), mode("FR", "outbound")) == ("notice", "manual")
    assert mode("UK", "inbound") == mode("CA", "inbound") == mode("NO", "inbound") == "notice"
    assert mode("US", "outbound") in ("log_basis", "notice")
    assert builtin.rule("PT", "inbound").retention_days == 90
    assert builtin.rule("HU", "inbound").retention_days == 5 * 365
    assert "may be recorded" in builtin.rule("NO", "inbound").notes
    for code in ALL_PARTY:
        for direction in ("inbound", "outbound"):
            rule = builtin.rule(code, direction)
            assert rule.mode in ("notice_beep", "consent_gate"), rule
            assert not set(rule.sources) & set(builtin.rule("US", direction).sources)


def test_builtin_emergency_numbers(builtin: PolicySet) -> None:
    for code in EU:
        assert "112" in builtin.rule(code, "inbound").emergency, code
        assert "116xxx" in builtin.rule(code, "inbound").emergency, code
    expected = {"UK": "999", "US": "911", "US-CA": "911", "CA": "911", "MX": "911",
                "AU": "000", "JP": "119", "IN": "108", "ZA": "10111", "BR": "193", "FR": "15",
                "IT": "113", "DE": "110"}
    for code, number in expected.items():
        assert number in builtin.rule(code, "outbound").emergency, code


def test_rule_lookup_aliases_and_errors(builtin: PolicySet) -> None:
    assert builtin.rule("GB", "inbound") == builtin.rule("uk", "inbound")
    assert builtin.rule("us-ca", "outbound").jurisdiction == "US-CA"
    with pytest.raises(PolicyError, match="no rules for jurisdiction 'XX'"):
        builtin.rule("XX", "inbound")
    with pytest.raises(PolicyError, match="unknown direction 'sideways'"):
        builtin.rule("DE", "sideways")


def test_sha256_is_of_the_exact_bytes() -> None:
    policy = parse_policy(MINI.encode())
    assert policy.sha256 == hashlib.sha256(MINI.encode()).hexdigest()
    assert parse_policy((MINI + "\n").encode()).sha256 != policy.sha256


# --- inheritance ---------------------------------------------------------------------------
def test_sub_jurisdiction_inherits_what_it_does_not_set() -> None:
    policy = parse_policy(MINI.encode())
    bavaria = policy.rule("DE-BY", "inbound")
    assert (bavaria.mode, bavaria.record, bavaria.basis, bavaria.retention_days) == (
        "notice", True, "consent", 90)
    assert bavaria.name == "Bavaria" and bavaria.languages == ("de",)
    assert bavaria.emergency == ("112", "110", "116xxx")
    assert tuple(bavaria.beep) == (1000.0, 0.2, 10.0)
    assert bavaria.consent_timeout_s == 10.0 and bavaria.consent_digits == "1"
    # Sign-off and notes speak of the parent's own rule: never inherited.
    assert policy.rule("DE", "inbound").reviewed and not bavaria.reviewed
    assert bavaria.notes == ""
    # A direction the sub-jurisdiction does not mention is the parent's, whole.
    outbound = policy.rule("DE-BY", "outbound")
    assert (outbound.record, outbound.mode, outbound.retention_days) == (False, "none", 30)
    assert tuple(policy.rule("DE", "inbound").beep) == (1400.0, 0.5, 15.0)
    assert policy.jurisdictions() == ("DE", "DE-BY")


# --- every validation error ----------------------------------------------------------------
def edit(old: str, new: str, count: int = 1) -> str:
    assert old in MINI, old
    return MINI.replace(old, new, count)


BAD = [
    (edit('id = "test-policy"', 'id = "test-policy"\ncolour = "red"'), "meta.colour: unknown key"),
    (edit("version = 3", "version = 0"), "meta.version: expected `int` >= 1"),
    (edit('published = "2026-01-01"', 'published = "soon"'), "meta.published: expected `str` matching"),
    (edit('mode = "consent_gate"', 'mode = "loud"'), "jurisdictions.DE.inbound.mode: unknown mode 'loud'"),
    (edit('record = true\nmode = "consent_gate"', 'record = false\nmode = "consent_gate"'),
     "jurisdictions.DE.inbound: record = false needs mode \"none\""),
    (edit('record = false\nmode = "none"', 'record = true\nmode = "none"'),
     "jurisdictions.DE.outbound: mode \"none\" needs record = false"),
    (edit("retention_days = 90", "retention_days = 0"), "jurisdictions.DE.inbound.retention_days: expected `int` >= 1"),
    (edit("retention_days = 90", "retention_days = 3651"), "jurisdictions.DE.inbound.retention_days: expected `int` <= 3650"),
    (edit("retention_days = 90", 'retention_days = "90"'), "jurisdictions.DE.inbound.retention_days: expected `int"),
    (edit('sources = ["StGB 201"]', "sources = []"), "jurisdictions.DE.inbound.sources: expected `array` of length >= 1"),
    (edit('"116xxx"', '"11a"'), "jurisdictions.DE.emergency[2]: expected `str` matching"),
    (edit('"116xxx"', '"x12"'), "jurisdictions.DE.emergency[2]: expected `str` matching"),
    (edit('parent = "DE"', 'parent = "AT"'), "jurisdictions.DE-BY.parent: no jurisdiction 'AT'"),
    (edit('name = "Germany"', 'name = "Germany"\nparent = "DE-BY"'), "cycle DE -> DE-BY -> DE"),
    (edit("[jurisdictions.DE-BY]", "[jurisdictions.de-by]").replace("DE-BY.", "de-by."),
     "jurisdictions.de-by: not a jurisdiction code"),
    (edit("[jurisdictions.DE-BY]", "[jurisdictions.Bavaria]").replace("DE-BY.", "Bavaria."),
     "jurisdictions.Bavaria: not a jurisdiction code"),
    (edit('basis = "consent"\n', ""), "jurisdictions.DE.inbound.basis: not set here or in a parent"),
    (edit('languages = ["de"]\n', ""), "jurisdictions.DE.languages: not set here or in a parent"),
    (edit('emergency = ["112", "110", "116xxx"]\n', ""), "jurisdictions.DE.emergency: not set"),
    (edit('languages = ["de"]', 'languages = ["German"]'), "jurisdictions.DE.languages[0]: expected `str` matching"),
    (MINI[:MINI.index("[jurisdictions.DE.outbound]")] + MINI[MINI.index("[jurisdictions.DE-BY]"):],
     "jurisdictions.DE.outbound.record: not set here or in a parent"),
    (edit("duration_s = 0.2, period_s = 10.0", "duration_s = 2.0, period_s = 1.5"),
     "jurisdictions.DE-BY.inbound: beep period_s must be longer than duration_s"),
    (edit("freq_hz = 1400.0", "freq_hz = 50.0"), "defaults.beep.freq_hz: expected `float` >= 300.0"),
    (edit('consent_digits = "1"', 'consent_digits = "yes"'), "defaults.consent_digits: expected `str` matching"),
    (edit('notes = "DE notes"', 'notes = "DE notes"\nlawyer = "Ms X"'), "jurisdictions.DE.inbound.lawyer: unknown key"),
    (edit("[defaults]", "[defaults"), "not valid TOML"),
    (MINI.replace("[defaults]", "[default]", 1), "default: unknown key"),
    (MINI[:MINI.index("[defaults]")] + MINI[MINI.index("[jurisdictions.DE]"):],
     "defaults: required key is missing"),
    (edit("[jurisdictions.DE]", '[jurisdictions.DE]\nlawyer = "X"'), "jurisdictions.DE.lawyer: unknown key"),
    (edit('name = "Germany"', "name = 5"), "jurisdictions.DE.name: expected `str | null`, got `int`"),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[e for _, e in BAD])
def test_every_invalid_file_is_one_line_naming_the_key(text: str, expected: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(text.encode(), "p.toml")
    message = str(info.value)
    assert message.startswith("p.toml: ") and "\n" not in message, message
    assert expected in message, message


def test_not_utf8() -> None:
    with pytest.raises(PolicyError, match=r"^p.toml: not UTF-8 text$"):
        parse_policy(b"\xff\xfe[meta]", "p.toml")


def test_every_mode_is_accepted() -> None:
    germany = MINI[:MINI.index("[jurisdictions.DE-BY]")]
    for mode in MODES:
        record = "false" if mode == "none" else "true"
        text = germany.replace('record = true\nmode = "consent_gate"',
                               f'record = {record}\nmode = "{mode}"')
        assert parse_policy(text.encode()).rule("DE", "inbound").mode == mode


# --- signatures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_signature_good(key: Ed25519PrivateKey) -> None:
    data = MINI.encode()
    sig = sign_policy(data, key)
    assert sig.endswith(b"\n") and sig.count(b"\n") == 1
    assert len(base64.b64decode(sig)) == 64
    verify_policy(data, sig, [key.public_key()])
    other = Ed25519PrivateKey.generate().public_key()
    verify_policy(data, sig, [other, key.public_key()])  # any one allowed signer


def test_signature_bad_and_wrong_key(key: Ed25519PrivateKey) -> None:
    data = MINI.encode()
    sig = sign_policy(data, key)
    with pytest.raises(PolicyError, match=r"p\.sig: signature does not verify with any of the 1"):
        verify_policy(data + b" ", sig, [key.public_key()], source="p.sig")
    with pytest.raises(PolicyError, match="signature does not verify"):
        verify_policy(data, sig, [Ed25519PrivateKey.generate().public_key()])
    flipped = bytearray(base64.b64decode(sig))
    flipped[0] ^= 1
    with pytest.raises(PolicyError, match="signature does not verify"):
        verify_policy(data, base64.b64encode(bytes(flipped)), [key.public_key()])


@pytest.mark.parametrize("sig", [b"", b"not base64!", base64.b64encode(b"x" * 63),
                                 b"\xff\xfe", base64.b64encode(b"x" * 65)])
def test_signature_file_malformed(key: Ed25519PrivateKey, sig: bytes) -> None:
    with pytest.raises(PolicyError, match="not base64 of a 64-byte Ed25519 signature"):
        verify_policy(MINI.encode(), sig, [key.public_key()])


def test_signature_needs_a_key(key: Ed25519PrivateKey) -> None:
    with pytest.raises(PolicyError, match="no signer keys"):
        verify_policy(MINI.encode(), sign_policy(MINI.encode(), key), [])


def test_public_key_text_round_trip(key: Ed25519PrivateKey) -> None:
    text = public_key_text(key.public_key())
    assert parse_public_key(text).public_bytes_raw() == key.public_key().public_bytes_raw()
    for bad in ("", "abc", base64.b64encode(b"k" * 31).decode(), "@@@@"):
        with pytest.raises(PolicyError, match="not base64 of a 32-byte Ed25519 public key"):
            parse_public_key(bad)


# --- emergency numbers ---------------------------------------------------------------------
PATTERNS = ("112", "110", "116xxx", "15")


@pytest.mark.parametrize(("number", "prefixes", "expected"), [
    ("112", (), True),
    ("110", (), True),
    ("116117", (), True),
    ("116 117", (), True),
    ("15", (), True),
    ("0112", ("0",), True),
    ("9112", ("0", "9"), True),
    ("0112", (), False),        # no outside-line prefix configured
    ("1120", (), False),        # exact match only, never "starts with"
    ("11", (), False),
    ("1512345678", (), False),  # an ordinary number that starts like a short code
    ("11611", (), False),
    ("116abc", (), False),
    ("", (), False),
    (None, (), False),
])
def test_is_emergency(number: str | None, prefixes: tuple[str, ...], expected: bool) -> None:
    assert is_emergency(number, PATTERNS, prefixes) is expected

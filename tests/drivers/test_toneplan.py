"""The country tone-plan table, and the tones synthesized from it."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.sim import synth
from drivers.toneplan import CID_STANDARDS, TonePlanError, ToneSpec, countries, tone_plan
from tests.drivers.test_synth import on_off_runs, peak_freqs

REQUIRED = ["US", "CA", "UK", "IE", "DE", "FR", "IT", "ES", "PT", "NL", "BE", "LU", "AT", "CH",
            "DK", "SE", "NO", "FI", "PL", "CZ", "HU", "GR", "AU", "IN", "JP", "ZA", "BR", "MX"]
TONES = ("dial", "busy", "ringback", "congestion")


def test_every_required_country_is_present() -> None:
    assert set(REQUIRED) <= set(countries())


@pytest.mark.parametrize("country", REQUIRED)
def test_plan_is_complete_and_sourced(country: str) -> None:
    plan = tone_plan(country)
    assert plan.country == country
    assert plan.source.strip() and plan.cid_source.strip()
    assert plan.cid in CID_STANDARDS
    assert plan.ring_cadence and all(on > 0 and off >= 0 for on, off in plan.ring_cadence)
    for name in TONES:
        spec: ToneSpec = getattr(plan, name)
        assert spec.freqs_hz and all(300 <= f <= 3400 for f in spec.freqs_hz), name
        assert all(on > 0 and off >= 0 for on, off in spec.cadence), name
    assert plan.dial.continuous or country in ("IT", "CZ", "GR")  # the interrupted ones
    assert not plan.busy.continuous and not plan.ringback.continuous


def test_known_values_from_the_sources() -> None:
    us, de, uk = tone_plan("US"), tone_plan("DE"), tone_plan("UK")
    assert us.dial.freqs_hz == (350.0, 440.0)
    assert us.busy.cadence == ((0.5, 0.5),)
    assert us.ringback == ToneSpec((440.0, 480.0), ((2.0, 4.0),))
    assert de.busy == ToneSpec((425.0,), ((0.48, 0.48),))
    assert de.ring_cadence == ((1.0, 4.0),)
    assert uk.ringback == ToneSpec((400.0, 450.0), ((0.4, 0.2), (0.4, 2.0)))
    assert uk.cid == "v23_dtas" and us.cid == "bell202" and tone_plan("NL").cid == "dtmf"
    assert tone_plan("IN").dial.am_hz == 25.0


def test_gb_alias_and_case() -> None:
    assert tone_plan("gb") is tone_plan("UK")
    assert tone_plan(" de ") is tone_plan("DE")


def test_unknown_country_is_a_clear_error() -> None:
    with pytest.raises(TonePlanError, match=r"unknown country 'XX'; known: AT, AU, BE"):
        tone_plan("XX")


@pytest.mark.parametrize("country", REQUIRED)
def test_synthesized_tones_have_the_table_frequencies(country: str) -> None:
    plan = tone_plan(country)
    for name in TONES:
        spec: ToneSpec = getattr(plan, name)
        x = synth.cadenced(spec, (), 2.0, -12.0)  # steady, so cadence lines don't mask AM
        if spec.am_hz:
            carrier = spec.freqs_hz[0]
            expected = [carrier - spec.am_hz, carrier, carrier + spec.am_hz]
        else:
            expected = list(spec.freqs_hz)
        assert peak_freqs(x, len(expected)) == pytest.approx(expected, abs=2.0), name


@pytest.mark.parametrize(("country", "name"), [
    ("DE", "busy"), ("UK", "ringback"), ("IT", "dial"), ("US", "congestion"),
    ("ES", "congestion"), ("CZ", "dial")])
def test_synthesized_tones_have_the_table_cadence(country: str, name: str) -> None:
    spec: ToneSpec = getattr(tone_plan(country), name)
    runs = on_off_runs(synth.cadenced(spec, None, 2 * spec.period_s, -12.0))
    expected = [s for pair in spec.cadence for s in pair] * 2
    measured = [s for _, s in runs][:len(expected) - 1]  # the last pause runs off the end
    assert [on for on, _ in runs][:len(expected) - 1] == [True, False] * len(spec.cadence) \
        + [True, False] * (len(spec.cadence) - 1) + [True]
    assert measured == pytest.approx(expected[:-1], abs=0.01)


def test_ring_period_of_plans() -> None:
    assert tone_plan("UK").ring_period_s == pytest.approx(3.0)
    assert tone_plan("FR").ring_period_s == pytest.approx(5.0)
    assert np.isclose(tone_plan("JP").ring_period_s, 3.0)

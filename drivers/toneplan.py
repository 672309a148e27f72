"""Country tone plans: call-progress tones, ringing cadence and caller-ID standard.

Pure data with two accessors. The simulated line synthesizes these tones and the
detectors recognise them, so both sides read the same table.

Conventions
-----------
* A :class:`ToneSpec` lists its frequencies in Hz; several frequencies are summed
  (Asterisk notation ``f1+f2``). ``am_hz`` marks an amplitude-modulated tone (Asterisk
  notation ``f*m``: carrier ``freqs_hz[0]`` modulated at ``am_hz`` with depth ``am_depth``).
* A cadence is a tuple of ``(on_s, off_s)`` pairs repeated for as long as the tone lasts;
  an empty cadence is a continuous tone.
* ``ring_cadence`` is the cadence of the ringing voltage (what a ring detector sees);
  one repetition of it is one "ring" (a UK ring is the double burst 0.4/0.2/0.4/2.0 s).
* ``cid`` is the default caller-ID standard of the country: ``bell202`` (Telcordia
  GR-30, between first and second ring), ``v23`` (ETSI EN 300 659-1 V.23 FSK after the
  first ring), ``v23_dtas`` (polarity reversal + DT-AS before the first ring, BT SIN227
  style), ``dtmf`` (DTMF digits before the first ring).

Main source: Asterisk ``configs/samples/indications.conf.sample`` (itself built from
ITU-T E.180 Supplement 2 / the ITU "Various tones used in national networks" list and
BT SIN 350), named ``ASTERISK`` below with the section used. Entries taken elsewhere say
so in their ``source``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CidStandard = Literal["bell202", "v23", "v23_dtas", "dtmf"]
CID_STANDARDS: tuple[str, ...] = ("bell202", "v23", "v23_dtas", "dtmf")

Cadence = tuple[tuple[float, float], ...]

ASTERISK = "Asterisk configs/samples/indications.conf.sample"
# Caller-ID defaults: which signalling a country's PSTN uses (shared/NOTES.md "Caller ID",
# Asterisk chan_dahdi cidsignalling values). Where a country is marked "assumed" the
# ETSI default was taken without a national document; override per call in a scenario.
CID_BELL = "Telcordia GR-30-CORE (Bell 202 FSK between first and second ring)"
CID_ETSI = "ETSI EN 300 659-1 (V.23 FSK after the first ring)"
CID_ETSI_ASSUMED = CID_ETSI + "; national practice assumed, not verified"
CID_DTMF = "DTMF caller ID before the first ring (shared/NOTES.md: NL, DK, SE, FI, BE, IN, BR)"


class TonePlanError(LookupError):
    """A country that the table does not know."""


@dataclass(frozen=True, slots=True)
class ToneSpec:
    """One call-progress tone."""

    freqs_hz: tuple[float, ...]
    cadence: Cadence = ()
    am_hz: float | None = None
    am_depth: float = 0.0

    @property
    def continuous(self) -> bool:
        return not self.cadence

    @property
    def period_s(self) -> float:
        """Length of one cadence repetition (0 for a continuous tone)."""
        return sum(on + off for on, off in self.cadence)


@dataclass(frozen=True, slots=True)
class TonePlan:
    """The tones and ringing of one country's analog lines."""

    country: str
    name: str
    dial: ToneSpec
    busy: ToneSpec
    ringback: ToneSpec
    congestion: ToneSpec
    ring_cadence: Cadence
    cid: CidStandard
    source: str
    cid_source: str

    @property
    def ring_period_s(self) -> float:
        return sum(on + off for on, off in self.ring_cadence)


def _t(*freqs: float, cadence: Cadence = (), am_hz: float | None = None) -> ToneSpec:
    # Asterisk: "f1*f2 ... The implicit modulation depth is fixed at 90%".
    return ToneSpec(tuple(float(f) for f in freqs), cadence, am_hz, 0.9 if am_hz else 0.0)


def _etsi_425(ring: Cadence, busy: Cadence, congestion: Cadence,
              dial: Cadence = ()) -> dict[str, object]:
    """The common European 425 Hz plan with the country's cadences."""
    return {"dial": _t(425, cadence=dial), "busy": _t(425, cadence=busy),
            "ringback": _t(425, cadence=ring), "congestion": _t(425, cadence=congestion),
            "ring_cadence": ring}


_US = {"dial": _t(350, 440), "busy": _t(480, 620, cadence=((0.5, 0.5),)),
       "ringback": _t(440, 480, cadence=((2.0, 4.0),)),
       "congestion": _t(480, 620, cadence=((0.25, 0.25),)), "ring_cadence": ((2.0, 4.0),)}
_UK_RING: Cadence = ((0.4, 0.2), (0.4, 2.0))

_PLANS: dict[str, TonePlan] = {
    p.country: p for p in (
        TonePlan("US", "United States", **_US, cid="bell202",
                 source=f"{ASTERISK} [us]", cid_source=CID_BELL),
        TonePlan("CA", "Canada", **_US, cid="bell202",
                 source=f"{ASTERISK} [us] 'United States / North America' (NANP precise tones)",
                 cid_source=CID_BELL),
        TonePlan("UK", "United Kingdom", dial=_t(350, 440),
                 busy=_t(400, cadence=((0.375, 0.375),)),
                 ringback=_t(400, 450, cadence=_UK_RING),
                 congestion=_t(400, cadence=((0.4, 0.35), (0.225, 0.525))),
                 ring_cadence=_UK_RING, cid="v23_dtas",
                 source=f"{ASTERISK} [uk] (BT SIN 350)",
                 cid_source="BT SIN 227 (polarity reversal, DT-AS, V.23 FSK before ringing)"),
        TonePlan("IE", "Ireland", **{**_etsi_425(_UK_RING, ((0.5, 0.5),), ((0.25, 0.25),)),
                                     "ringback": _t(400, 450, cadence=_UK_RING)},
                 cid="v23_dtas",
                 source=("not in Asterisk: ETSI-harmonised 425 Hz dial/busy/congestion with "
                         "the UK ringing tone and cadence (Wikipedia 'Busy signal', "
                         "'Call-progress tone'); verify against the ITU list of national tones"),
                 cid_source="BT SIN 227 style assumed (UK practice), not verified"),
        TonePlan("DE", "Germany", **_etsi_425(((1.0, 4.0),), ((0.48, 0.48),), ((0.24, 0.24),)),
                 cid="v23", source=f"{ASTERISK} [de]",
                 cid_source=CID_ETSI + "; CLIP between first and second ring"),
        TonePlan("FR", "France", dial=_t(440), busy=_t(440, cadence=((0.5, 0.5),)),
                 ringback=_t(440, cadence=((1.5, 3.5),)),
                 congestion=_t(440, cadence=((0.25, 0.25),)), ring_cadence=((1.5, 3.5),),
                 cid="v23", source=f"{ASTERISK} [fr]", cid_source=CID_ETSI_ASSUMED),
        TonePlan("IT", "Italy", **_etsi_425(((1.0, 4.0),), ((0.5, 0.5),), ((0.2, 0.2),),
                                            dial=((0.2, 0.2), (0.6, 1.0))),
                 cid="v23", source=f"{ASTERISK} [it]", cid_source=CID_ETSI_ASSUMED),
        TonePlan("ES", "Spain", **_etsi_425(((1.5, 3.0),), ((0.2, 0.2),),
                                            ((0.2, 0.2), (0.2, 0.2), (0.2, 0.6))),
                 cid="v23", source=f"{ASTERISK} [es]", cid_source=CID_ETSI_ASSUMED),
        TonePlan("PT", "Portugal", **_etsi_425(((1.0, 5.0),), ((0.5, 0.5),), ((0.2, 0.2),)),
                 cid="v23", source=f"{ASTERISK} [pt]", cid_source=CID_ETSI_ASSUMED),
        TonePlan("NL", "Netherlands",
                 **_etsi_425(((1.0, 4.0),), ((0.5, 0.5),), ((0.25, 0.25),)),
                 cid="dtmf", source=f"{ASTERISK} [nl]", cid_source=CID_DTMF),
        TonePlan("BE", "Belgium",
                 **_etsi_425(((1.0, 3.0),), ((0.5, 0.5),), ((0.167, 0.167),)),
                 cid="dtmf", source=f"{ASTERISK} [be]", cid_source=CID_DTMF),
        TonePlan("LU", "Luxembourg",
                 **_etsi_425(((1.0, 4.0),), ((0.5, 0.5),), ((0.25, 0.25),)),
                 cid="v23",
                 source=("not in Asterisk: ETSI-harmonised 425 Hz values (busy 0.5/0.5 s per "
                         "the ETSI recommendation quoted in Wikipedia 'Busy signal'; ringing "
                         "1/4 s and congestion 0.25/0.25 s as the neighbouring plans); "
                         "verify against the ITU list of national tones"),
                 cid_source=CID_ETSI_ASSUMED),
        TonePlan("AT", "Austria", dial=_t(420), busy=_t(420, cadence=((0.4, 0.4),)),
                 ringback=_t(420, cadence=((1.0, 5.0),)),
                 congestion=_t(420, cadence=((0.2, 0.2),)), ring_cadence=((1.0, 5.0),),
                 cid="v23", source=f"{ASTERISK} [at]", cid_source=CID_ETSI_ASSUMED),
        TonePlan("CH", "Switzerland",
                 **_etsi_425(((1.0, 4.0),), ((0.5, 0.5),), ((0.2, 0.2),)),
                 cid="v23", source=f"{ASTERISK} [ch]", cid_source=CID_ETSI_ASSUMED),
        TonePlan("DK", "Denmark", **_etsi_425(((1.0, 4.0),), ((0.5, 0.5),), ((0.2, 0.2),)),
                 cid="dtmf", source=f"{ASTERISK} [dk]", cid_source=CID_DTMF),
        TonePlan("SE", "Sweden", **_etsi_425(((1.0, 5.0),), ((0.25, 0.25),), ((0.25, 0.75),)),
                 cid="dtmf", source=f"{ASTERISK} [se]", cid_source=CID_DTMF),
        TonePlan("NO", "Norway", **_etsi_425(((1.0, 4.0),), ((0.5, 0.5),), ((0.2, 0.2),)),
                 cid="v23", source=f"{ASTERISK} [no]",
                 cid_source=CID_ETSI + " (shared/NOTES.md lists NO)"),
        TonePlan("FI", "Finland", **_etsi_425(((1.0, 4.0),), ((0.3, 0.3),), ((0.2, 0.2),)),
                 cid="dtmf", source=f"{ASTERISK} [fi]", cid_source=CID_DTMF),
        TonePlan("PL", "Poland", **_etsi_425(((1.0, 4.0),), ((0.5, 0.5),), ((0.5, 0.5),)),
                 cid="v23", source=f"{ASTERISK} [pl]", cid_source=CID_ETSI_ASSUMED),
        TonePlan("CZ", "Czech Republic",
                 **_etsi_425(((1.0, 4.0),), ((0.33, 0.33),), ((0.165, 0.165),),
                             dial=((0.33, 0.33), (0.66, 0.66))),
                 cid="v23", source=f"{ASTERISK} [cz]", cid_source=CID_ETSI_ASSUMED),
        TonePlan("HU", "Hungary", **_etsi_425(((1.25, 3.75),), ((0.3, 0.3),), ((0.3, 0.3),)),
                 cid="v23", source=f"{ASTERISK} [hu]", cid_source=CID_ETSI_ASSUMED),
        TonePlan("GR", "Greece",
                 **_etsi_425(((1.0, 4.0),), ((0.3, 0.3),), ((0.2, 0.2),),
                             dial=((0.2, 0.3), (0.7, 0.8))),
                 cid="v23", source=f"{ASTERISK} [gr]", cid_source=CID_ETSI_ASSUMED),
        TonePlan("AU", "Australia", dial=_t(413, 438),
                 busy=_t(425, cadence=((0.375, 0.375),)),
                 ringback=_t(413, 438, cadence=_UK_RING),
                 congestion=_t(425, cadence=((0.375, 0.375),)), ring_cadence=_UK_RING,
                 cid="bell202",
                 source=(f"{ASTERISK} [au] (ACIF S002); 413+438 Hz is the spectrum of 425 Hz "
                         "modulated at 25 Hz; the congestion tone's alternate -10 dB "
                         "420 Hz burst is not modelled"),
                 cid_source="shared/NOTES.md: Bell 202 FSK used in AU"),
        TonePlan("IN", "India", dial=_t(400, am_hz=25),
                 busy=_t(400, cadence=((0.75, 0.75),)),
                 ringback=_t(400, cadence=_UK_RING, am_hz=25),
                 congestion=_t(400, cadence=((0.25, 0.25),)), ring_cadence=_UK_RING,
                 cid="dtmf", source=f"{ASTERISK} [in] (400*25 = 400 Hz AM at 25 Hz)",
                 cid_source=CID_DTMF),
        TonePlan("JP", "Japan", dial=_t(400), busy=_t(400, cadence=((0.5, 0.5),)),
                 ringback=_t(400, cadence=((1.0, 2.0),), am_hz=16),
                 congestion=_t(400, cadence=((0.5, 0.5),)), ring_cadence=((1.0, 2.0),),
                 cid="v23",
                 source=(f"{ASTERISK} [jp]; its ringback '400+15' stands for the NTT ringback "
                         "tone, 400 Hz modulated at about 16 Hz, modelled here as AM"),
                 cid_source=("NTT uses a V.23 variant sent after a polarity reversal and a "
                             "CAR signal; simulated as plain V.23")),
        TonePlan("ZA", "South Africa", dial=_t(400, am_hz=33),
                 busy=_t(400, cadence=((0.5, 0.5),)),
                 ringback=_t(400, cadence=_UK_RING, am_hz=33),
                 congestion=_t(400, cadence=((0.25, 0.25),)), ring_cadence=_UK_RING,
                 cid="v23", source=f"{ASTERISK} [za] (Siemens switches, 400*33)",
                 cid_source=CID_ETSI + " (shared/NOTES.md lists ZA)"),
        TonePlan("BR", "Brazil",
                 **_etsi_425(((1.0, 4.0),), ((0.25, 0.25),), ((0.25, 0.25), (0.75, 0.25))),
                 cid="dtmf", source=f"{ASTERISK} [br]", cid_source=CID_DTMF),
        TonePlan("MX", "Mexico", **{**_etsi_425(((1.0, 4.0),), ((0.25, 0.25),),
                                                ((0.25, 0.25),)),
                                    "ring_cadence": ((2.0, 4.0),)},
                 cid="bell202",
                 source=f"{ASTERISK} [mx] (ringcadence 2/4 s, ringback 1/4 s as listed)",
                 cid_source=CID_BELL + "; national practice assumed, not verified"),
    )
}

ALIASES: dict[str, str] = {"GB": "UK"}


def countries() -> list[str]:
    """Country codes the table knows (aliases excluded)."""
    return sorted(_PLANS)


def tone_plan(country: str) -> TonePlan:
    """The plan of ``country`` (ISO 3166 alpha-2, case-insensitive; "GB" = "UK")."""
    code = country.strip().upper()
    code = ALIASES.get(code, code)
    try:
        return _PLANS[code]
    except KeyError:
        raise TonePlanError(
            f"unknown country {country!r}; known: {', '.join(countries())}") from None

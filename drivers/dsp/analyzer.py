"""One streaming front end for every live detector of a line.

The call engine and ``edge-recorder analyze`` both feed frames here and receive timed
events (sample-accurate start samples on the caller's timeline). DTMF is computed once:
its digits are reported and also assembled into DTMF caller ID.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from drivers.dsp.answer import AnswerDetector
from drivers.dsp.callerid import STANDARDS, CallerIdDetector, DtmfCallerIdAssembler
from drivers.dsp.dtmf import DtmfDetector
from drivers.dsp.events import DetectorEvent, DtmfDigit


class LineAnalyzer:
    """Every live detector of one line: DTMF digits, caller ID (FSK Bell 202 / V.23 and
    DTMF forms), call-progress tones of the line's country, voice activity, and the far
    end's answer of an outbound call (one Answer per call, after :meth:`reset`).
    """

    def __init__(self, country: str = "US", cid_standards: Sequence[str] = STANDARDS) -> None:
        self.country = country
        self._dtmf = DtmfDetector()
        fsk = tuple(s for s in cid_standards if s != "dtmf")
        self._fsk_cid = CallerIdDetector(fsk) if fsk else None
        self._dtmf_cid = DtmfCallerIdAssembler() if "dtmf" in cid_standards else None
        # Runs the tone and voice detectors inside and reports their events too.
        self._progress = AnswerDetector(country, report_inner=True)

    def feed(self, sample: int, pcm: np.ndarray) -> list[DetectorEvent]:
        events: list[DetectorEvent] = list(self._dtmf.feed(sample, pcm))
        if self._dtmf_cid is not None:
            for digit in [e for e in events if isinstance(e, DtmfDigit)]:
                cid = self._dtmf_cid.push(digit)
                if cid is not None:
                    events.append(cid)
        if self._fsk_cid is not None:
            events.extend(self._fsk_cid.feed(sample, pcm))
        events.extend(self._progress.feed(sample, pcm))
        events.sort(key=lambda e: e.sample)
        return events

    def finish(self, sample: int) -> list[DetectorEvent]:
        """End of input (a file): report what is still open."""
        return list(self._progress.flush())

    def reset(self) -> None:
        """A new call starts: forget everything, count the far end's voice from here."""
        self._progress.reset()
        self._dtmf.reset()
        if self._fsk_cid is not None:
            self._fsk_cid.reset()
        if self._dtmf_cid is not None:
            self._dtmf_cid.reset()

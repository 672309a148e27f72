"""One streaming front end for every live detector of a line.

The call engine and ``edge-recorder analyze`` both feed frames here and receive timed
events (sample-accurate start samples on the caller's timeline). DTMF is computed once:
its digits are reported, assembled into DTMF caller ID, and passed to the tone detector
(a dial tone ends at the first digit; its length alone cannot tell it from a ringback
burst). Events come in time order within one ``feed`` call; a tone is reported once its
pattern has stopped, so it may come after the digits that followed it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from drivers.dsp.answer import AnswerDetector
from drivers.dsp.callerid import STANDARDS, CallerIdDetector, DtmfCallerIdAssembler
from drivers.dsp.dtmf import DtmfDetector
from drivers.dsp.events import SAMPLE_RATE, DetectorEvent, DtmfDigit

# Silence fed to the DTMF detector at the end of input: ends a digit still sounding (the
# detector reports a digit ~110 ms after its tone stops).
DTMF_FLUSH_SAMPLES = SAMPLE_RATE // 5
# Batch size for a file: events may come up to a batch late, which a file does not mind,
# and the numpy overhead per batch is paid ~1000 times less often than live. Events do not
# depend on the batch size (the answer is still judged every 400 ms of audio).
FILE_BATCH_SAMPLES = 60 * SAMPLE_RATE


class LineAnalyzer:
    """Every live detector of one line: DTMF digits, caller ID (FSK Bell 202 / V.23 and
    DTMF forms), call-progress tones of the line's country, voice activity, and the far
    end's answer of an outbound call (one Answer per call, after :meth:`reset`).

    A caller that knows the hook state says so with :meth:`hook`: FSK caller ID is only
    sent to an on-hook line, and call progress and answer only matter off-hook, so each
    runs only where it can occur (about half the CPU of a live line). Without that
    knowledge (a file) everything runs.
    """

    def __init__(self, country: str = "US", cid_standards: Sequence[str] = STANDARDS, *,
                 batch_samples: int | None = None) -> None:
        """``batch_samples``: analyse this much audio at a time (default: each detector's
        live default, tens of ms; :data:`FILE_BATCH_SAMPLES` for a file)."""
        self.country = country
        batch = {} if batch_samples is None else {"batch_samples": batch_samples}
        self._dtmf = DtmfDetector(**batch)
        fsk = tuple(s for s in cid_standards if s != "dtmf")
        self._fsk_cid = CallerIdDetector(fsk, **batch) if fsk else None
        self._dtmf_cid = DtmfCallerIdAssembler() if "dtmf" in cid_standards else None
        # Runs the tone and voice detectors inside and reports their events too.
        self._progress = AnswerDetector(country, report_inner=True, **batch)
        self._off_hook: bool | None = None  # unknown: run everything

    def hook(self, off_hook: bool) -> None:
        """The line went off-hook (True) or on-hook (False). Detectors that start running
        again are reset, so they never bridge a stretch of audio they did not see."""
        if off_hook == self._off_hook:
            return
        if off_hook and self._fsk_cid is not None:
            self._fsk_cid.reset()
        if not off_hook:
            self._progress.reset()
        self._off_hook = off_hook

    def feed(self, sample: int, pcm: np.ndarray) -> list[DetectorEvent]:
        events = self._digits(self._dtmf.feed(sample, pcm))
        if self._fsk_cid is not None and self._off_hook is not True:
            events.extend(self._fsk_cid.feed(sample, pcm))
        if self._off_hook is not False:
            events.extend(self._progress.feed(sample, pcm))
        events.sort(key=lambda e: e.sample)
        return events

    def finish(self, sample: int) -> list[DetectorEvent]:
        """End of input (a file) at line ``sample``: report what is still open (a caller
        ID or a digit in the last, partial batch too)."""
        silence = np.zeros(DTMF_FLUSH_SAMPLES, np.int16)
        events = self._digits(self._dtmf.feed(sample, silence) + self._dtmf.flush())
        if self._fsk_cid is not None and self._off_hook is not True:
            events += self._fsk_cid.feed(sample, silence)
            events += self._fsk_cid.flush()
        events += self._progress.flush()
        return sorted(events, key=lambda e: e.sample)

    def _digits(self, dtmf_events: list[DetectorEvent]) -> list[DetectorEvent]:
        """DTMF events, with the caller ID they complete; the tone detector learns of each
        digit (the dial tone ends at the first one)."""
        events = list(dtmf_events)
        for digit in [e for e in dtmf_events if isinstance(e, DtmfDigit)]:
            self._progress.note_dtmf(digit.sample)
            if self._dtmf_cid is not None and (cid := self._dtmf_cid.push(digit)) is not None:
                events.append(cid)
        return events

    def reset(self) -> None:
        """A new call starts: forget everything, count the far end's voice from here."""
        self._progress.reset()
        self._dtmf.reset()
        if self._fsk_cid is not None:
            self._fsk_cid.reset()
        if self._dtmf_cid is not None:
            self._dtmf_cid.reset()

"""Answer detector: when the far end of an outbound call picks up, from the audio alone.

An analog tap sees no answer signal on most lines (polarity reversal is optional), so the
answer is taken as the customer's first sustained speech: ``Answer(sample)`` with
``sample`` the start of that speech (the reference the tests use is the simulator's
``CallTruth.far_speech_sample``, the customer's first word).

State machine, once per call (:meth:`AnswerDetector.reset` or :meth:`AnswerDetector.arm`
start a new one)::

    waiting --(ringback decided)--> ringback --(sustained voice after it stops)--> answered
       \\--------------------(sustained voice, no ringback heard)----------------/

* *Sustained voice*: at least ``MIN_VOICE_S`` of active VAD frames
  (:mod:`drivers.dsp.vad`) within ``WINDOW_S`` of the first one, starting at or after the
  arming sample, the :meth:`~AnswerDetector.dialing_done` hint and the end of the last
  call-progress tone burst, with no tone burst inside the window. A click (< 30 ms), a
  100 ms tone burst, a 150 ms noise burst cannot pass: tones are not voice to the VAD,
  and the others are too short.
* *After ringback*: a candidate that starts in a gap of a decided ringback is held until
  the next ringback burst is overdue or the voice has lasted ``RELEASE_VOICE_S``; if a
  ringback burst comes back instead, the candidate (the dealer talking while it rings)
  is dropped. The answer sample is the voice's start either way; only the report waits
  (at most one ringback gap plus tolerance, 4.4 s in DE).

The detector runs its own :class:`~drivers.dsp.tones.ToneDetector` and
:class:`~drivers.dsp.vad.VoiceDetector`; with ``report_inner=True`` their ``Tone`` and
``Voice`` events are returned too, so a line needs only this one detector for all three.
"""

from __future__ import annotations

import logging
from typing import Final, Literal

import numpy as np

from drivers.dsp.events import SAMPLE_RATE, Answer, DetectorEvent, Tone, Voice
from drivers.dsp.tones import BLOCK_LEN, CallProgressConfigError, ToneDetector
from drivers.dsp.vad import FRAME_LEN, HANGOVER_FRAMES, FrameActivity, VoiceDetector

log = logging.getLogger(__name__)

# "Sustained": this much voice within the window (a 150 ms noise burst gives <= 9 frames).
MIN_VOICE_S = 0.26
WINDOW_S = 0.5
MAX_TONE_FRAMES = 2  # tone frames allowed in the window (a stray tone-like speech frame)
MAX_ONSET_FRAMES = 25  # the answer may lie up to 0.5 s before the confirming frame
# Voice in a ringback gap answers at once when it lasts this long; shorter voice waits
# until the next ringback burst is overdue (a remark by the dealer while it rings).
RELEASE_VOICE_S = 1.0
DEFAULT_BATCH_SAMPLES = 3200  # 400 ms: the inner detectors analyse this much at a time

AnswerState = Literal["waiting", "ringback", "answered"]
WAITING: Final = "waiting"  # armed, nothing heard yet (or dialing)
RINGBACK: Final = "ringback"  # a ringback pattern was recognised
ANSWERED: Final = "answered"  # Answer reported; silent until reset() or arm()


class AnswerDetector:
    """Streaming answer detector for outbound calls (the Detector protocol).

    ``country`` selects the tone plan for the ringback. The call engine may call
    :meth:`arm` when the dealer goes off-hook / starts dialing (otherwise the detector is
    armed at the first sample it is fed after :meth:`reset`) and :meth:`dialing_done`
    once the number is complete; voice before those samples never answers.
    """

    def __init__(self, country: str = "DE", *, report_inner: bool = False,
                 batch_samples: int = DEFAULT_BATCH_SAMPLES) -> None:
        if batch_samples < FRAME_LEN:
            raise CallProgressConfigError(
                f"AnswerDetector: batch_samples {batch_samples} must be >= {FRAME_LEN}")
        self.tones = ToneDetector(country, batch_samples=1)
        self.voice = VoiceDetector(batch_samples=1)
        self.report_inner = report_inner
        self._batch_samples = batch_samples
        self._min_frames = round(MIN_VOICE_S * SAMPLE_RATE / FRAME_LEN)
        self._window_frames = round(WINDOW_S * SAMPLE_RATE / FRAME_LEN)
        self._release_frames = round(RELEASE_VOICE_S * SAMPLE_RATE / FRAME_LEN)
        self.reset()

    # --- call state from the engine ------------------------------------------------------
    def reset(self) -> None:
        """A new call: forget everything; armed from the next sample fed."""
        self.tones.reset()
        self.voice.reset()
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._pending_start = 0
        self._origin = 0  # line sample of the first sample fed since reset()
        self._next_sample: int | None = None
        self._armed_from: int | None = None
        self._arm_hist()
        self.state: AnswerState = WAITING

    def arm(self, sample: int) -> None:
        """Wait for a (new) answer; voice before ``sample`` does not count."""
        self._armed_from = sample
        self.state = WAITING
        self._arm_hist()
        log.debug("answer: armed at %d", sample)

    def note_dtmf(self, sample: int) -> None:
        """A DTMF digit started at ``sample`` (see :meth:`ToneDetector.note_dtmf`): the dial
        tone it cuts off is reported."""
        self.tones.note_dtmf(sample)

    def dialing_done(self, sample: int) -> None:
        """The number is complete at ``sample``: voice before it does not count."""
        self._armed_from = max(self._armed_from or sample, sample)
        self._hist_from = max(self._hist_from, sample)

    # --- streaming -----------------------------------------------------------------------
    def feed(self, sample: int, pcm: np.ndarray) -> list[DetectorEvent]:
        """Consume ``pcm`` (int16, 8 kHz) starting at line sample ``sample``."""
        events: list[DetectorEvent] = []
        if self._next_sample is not None and sample != self._next_sample:
            log.debug("answer: timeline jump %d -> %d: a new call", self._next_sample, sample)
            events += self.flush()
        if self._next_sample is None:
            self._pending_start = self._origin = sample
            if self._armed_from is None:
                self._armed_from = sample
                self._hist_from = sample
        self._next_sample = sample + len(pcm)
        self._pending.append(np.asarray(pcm))
        self._pending_len += len(pcm)
        if self._pending_len >= self._batch_samples:
            events += self._run_batch()
        return events

    def flush(self) -> list[DetectorEvent]:
        """Analyse what is buffered and end the inner detectors' patterns; resets."""
        events = self._run_batch()
        events += self._inner(self.tones.flush() + self.voice.flush())
        if self._candidate is not None and self.state != ANSWERED:
            events.append(Answer(self._candidate))  # held for a ringback that never came
        self.reset()
        return events

    # --- internals -----------------------------------------------------------------------
    def _arm_hist(self) -> None:
        self._hist_start = 0  # line sample of frame 0 of the history
        self._hist_active = np.zeros(0, dtype=bool)
        self._hist_tone = np.zeros(0, dtype=bool)
        self._hist_from = self._armed_from or 0
        self._candidate: int | None = None  # confirmed voice start held during ringback
        self._ringback_due: int | None = None  # next ringback burst due by this sample

    def _run_batch(self) -> list[DetectorEvent]:
        if not self._pending:
            return []
        pcm = np.concatenate(self._pending)
        start = self._pending_start
        self._pending, self._pending_len = [], 0
        self._pending_start = start + len(pcm)
        # the VAD's frames are the tone detector's blocks (both 20 ms from ``start``)
        events = self._inner(self.voice.feed(start, pcm))
        frames = self.voice.last_frames
        self.tones.feed(start, pcm, blocks=self.voice.last_audio, track=False)
        # The answer is judged every DEFAULT_BATCH_SAMPLES of line audio, as live, however
        # long the batch (a file's): the tone state it reads is that at each step's end.
        step = DEFAULT_BATCH_SAMPLES // BLOCK_LEN
        while left := self.tones.untracked_blocks():
            at = self.tones.analysed_to()
            blocks = left if self.state == ANSWERED else min(
                left, step - (at - self._origin) // BLOCK_LEN % step)
            events += self._inner(self.tones.advance(blocks))
            if self.state != ANSWERED and frames is not None:
                # live, a step's frames lag its audio by one (the VAD holds the newest)
                part = _frames_between(frames, at - FRAME_LEN, self.tones.analysed_to() - FRAME_LEN)
                if part is not None:
                    events += self._update(part)
        return sorted(events, key=lambda e: e.sample)

    def _inner(self, inner: list[DetectorEvent]) -> list[DetectorEvent]:
        for event in inner:
            if isinstance(event, Tone) and event.tone == "ringback" and self.state == WAITING:
                self.state = RINGBACK
        return [e for e in inner if isinstance(e, Tone | Voice)] if self.report_inner else []

    def _update(self, frames: FrameActivity) -> list[DetectorEvent]:
        """Add a batch of VAD frames; report the answer once it is certain."""
        self._append(frames)
        due = self.tones.next_burst_due("ringback")
        if due is not None:
            self._ringback_due = due
            if self.state == WAITING:
                self.state = RINGBACK
        last_tone = self.tones.last_tone_end()
        if self._candidate is not None and last_tone is not None and last_tone > self._candidate:
            log.debug("answer: voice at %d dropped, the ringback went on", self._candidate)
            self._candidate = None  # a tone came back after that "voice"
        if self._candidate is None:
            self._candidate = self._scan(last_tone or 0)
        if self._candidate is None or self.tones.tone_on() or self._ringback_may_resume():
            return []
        answer, self._candidate = self._candidate, None
        self.state = ANSWERED
        log.debug("answer: at sample %d", answer)
        return [Answer(answer)]

    def _ringback_may_resume(self) -> bool:
        """The candidate started in a ringback gap whose next burst is not yet overdue,
        and is too short to be the far end for sure."""
        due, start = self._ringback_due, self._candidate
        if due is None or start is None or start >= due or self.tones.analysed_to() >= due:
            return False
        first = max(0, (start - self._hist_start) // FRAME_LEN)
        return int(self._hist_active[first:].sum()) < self._release_frames

    def _append(self, frames: FrameActivity) -> None:
        """Extend the frame history (aligned on the VAD's frames) with a batch."""
        tone = self._tone_mask(frames)
        if len(self._hist_active) == 0:
            self._hist_start = frames.sample
        gap = (frames.sample - self._hist_start) // FRAME_LEN - len(self._hist_active)
        pad = np.zeros(max(gap, 0), dtype=bool)
        self._hist_active = np.concatenate([self._hist_active, pad, frames.active])
        self._hist_tone = np.concatenate([self._hist_tone, pad, tone])

    def _tone_mask(self, frames: FrameActivity) -> np.ndarray:
        """Per VAD frame: a plan tone sounded in it (the tone detector's blocks)."""
        out = np.zeros(len(frames.active), dtype=bool)
        blocks = self.tones.last_blocks
        if blocks is None or blocks.group is None:
            return out
        on = blocks.tone_on()
        offset = (frames.sample - blocks.sample) // FRAME_LEN
        lo, hi = max(offset, 0), min(offset + len(out), len(on))
        if lo < hi:
            out[lo - offset:hi - offset] |= on[lo:hi]
        return out

    def _scan(self, last_tone_end: int) -> int | None:
        """Start of the first sustained voice in the history, else None (keeps what may
        still become one)."""
        active, tone = self._hist_active, self._hist_tone
        n = len(active)
        earliest = max(self._hist_from, last_tone_end)
        first = max(0, -(-(earliest - self._hist_start) // FRAME_LEN))
        cum_a = np.concatenate([[0], np.cumsum(active)])
        cum_t = np.concatenate([[0], np.cumsum(tone)])
        idx = np.flatnonzero(active[first:]) + first
        stop = np.minimum(idx + self._window_frames, n)
        count = cum_a[stop] - cum_a[idx]
        clean = cum_t[stop] - cum_t[idx] <= MAX_TONE_FRAMES
        hit = np.flatnonzero((count >= self._min_frames) & clean)
        if len(hit):
            return self._hist_start + self._onset(idx, int(hit[0])) * FRAME_LEN
        # keep what may still be confirmed, and the run of speech before it
        keep = max(0, n - self._window_frames - MAX_ONSET_FRAMES)
        self._trim(min(n, max(first, keep)))
        return None

    @staticmethod
    def _onset(active_idx: np.ndarray, pos: int) -> int:
        """Walk back from the confirmed frame to the start of its run of speech (active
        frames no further apart than the VAD's hangover): the first syllables may be too
        sparse to confirm on their own."""
        limit = active_idx[pos] - MAX_ONSET_FRAMES
        while (pos > 0 and active_idx[pos] - active_idx[pos - 1] <= HANGOVER_FRAMES + 1
               and active_idx[pos - 1] >= limit):
            pos -= 1
        return int(active_idx[pos])

    def _trim(self, keep: int) -> None:
        """Drop history frames before index ``keep`` (they can no longer answer)."""
        self._hist_active = self._hist_active[keep:]
        self._hist_tone = self._hist_tone[keep:]
        self._hist_start += keep * FRAME_LEN


def _frames_between(frames: FrameActivity, lo: int, hi: int) -> FrameActivity | None:
    """The frames of ``frames`` that start in line samples [lo, hi), None if none."""
    a = max(0, (lo - frames.sample) // FRAME_LEN)
    b = min(len(frames.active), max(0, (hi - frames.sample) // FRAME_LEN))
    if a >= b:
        return None
    if a == 0 and b == len(frames.active):
        return frames
    return FrameActivity(frames.sample + a * FRAME_LEN, frames.active[a:b], frames.tonal[a:b])

"""Turns longer than the model's 8 s window: cut at pauses into pieces of at most 8 s.

The encoder has 400 positions (8 s at 50 frames/s). A caller reading a 12-digit account number in
groups talks for 10-16 s; keeping only the last 8 s lost the first digits (measured on the asterisk
speaker reading 9-14 digits with pauses: 1 of 120 read-outs right). Pieces are cut from the end
backwards, each at the earliest pause that keeps it within 8 s, so the last piece (which gives the
intent, end of turn and caller state) is nearly the last 8 s, starting in a pause rather than mid-word.
Where a caller speaks 8 s without any pause, the cut falls at 8 s.

That last piece still gives the intent, but slots and the transcript are read from `split_even`'s
pieces: as few as fit the window, of about equal length. Cutting from the end left a nearly full 8 s
piece (whose first words sit in the early positions, where training clips, mostly 1-5 s and padded on
the left, almost never had speech) and a short remainder of a few digits. Chosen on validation voices
reading 9-14 digit numbers (`bot engine readouts`, 450 clips): exact read-outs 0.46 -> 0.52.
"""

from __future__ import annotations

import numpy as np

from engine.features import MAX_SECONDS, SR_IN

SR = SR_IN
WINDOW_S = float(MAX_SECONDS)  # the encoder's window: features.prepare_pcm's default cut, the model's 400 positions
FRAME = 160  # 20 ms
MIN_PAUSE_FRAMES = 8  # 160 ms of quiet: a pause between words or digit groups, not a stop consonant


def _quiet_frames(x: np.ndarray) -> np.ndarray:
    """Per 20 ms frame: quieter than the clip's own speech by enough to be a pause (level-independent)."""
    n = len(x) // FRAME
    if n == 0:
        return np.zeros(0, bool)
    f = x[: n * FRAME].astype(np.float64).reshape(n, FRAME)
    # per-frame variance, not mean square: a DC offset on the line would otherwise fill every pause
    db = 10 * np.log10(np.var(f, axis=1) + 1e-12)
    floor, speech = np.percentile(db, 10), np.percentile(db, 95)
    # above the line's noise floor is not enough: a pause must also be well below the speech itself
    return db < min(max(floor + 6.0, speech - 30.0), speech - 15.0)


def pause_centres(x: np.ndarray) -> list[int]:
    """Sample index at the middle of every pause of at least MIN_PAUSE_FRAMES quiet frames."""
    q = _quiet_frames(x)
    out, start = [], None
    for i, quiet in enumerate(np.append(q, False)):
        if quiet and start is None:
            start = i
        elif not quiet and start is not None:
            if i - start >= MIN_PAUSE_FRAMES:
                out.append((start + i) * FRAME // 2)
            start = None
    return out


def split_turn(x: np.ndarray, window_s: float = WINDOW_S, pauses: list[int] | None = None) -> list[np.ndarray]:
    """The turn itself when it fits the window, else consecutive pieces (in order) of at most window_s.
    pauses: pause_centres(x), when the caller has them already."""
    w = int(window_s * SR)
    if len(x) <= w:
        return [x]
    pauses = pause_centres(x) if pauses is None else pauses
    cuts, end = [], len(x)
    while end > w:
        lo = end - w
        inside = [p for p in pauses if lo <= p < end - SR // 2]  # leave the piece at least 0.5 s
        cut = inside[0] if inside else lo
        cuts.append(cut)
        end = cut
    bounds = [0] + cuts[::-1] + [len(x)]
    return [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def split_even(x: np.ndarray, window_s: float = WINDOW_S, reach_s: float = 1.5,
               pauses: list[int] | None = None) -> list[np.ndarray]:
    """The turn itself when it fits the window, else ceil(length / window) pieces of about equal length,
    each cut at the pause nearest its equal share (within reach_s; else exactly at the share). Falls
    back to split_turn if a piece would not fit the window."""
    w = int(window_s * SR)
    if len(x) <= w:
        return [x]
    k = -(-len(x) // w)
    pauses = pause_centres(x) if pauses is None else pauses
    cuts = []
    for j in range(1, k):
        target = j * len(x) / k
        near = [p for p in pauses if abs(p - target) < reach_s * SR]
        cuts.append(min(near, key=lambda p: abs(p - target)) if near else int(target))
    bounds = [0] + cuts + [len(x)]
    if any(not 0 < b - a <= w for a, b in zip(bounds[:-1], bounds[1:])):
        return split_turn(x, window_s, pauses)
    return [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def turn_pieces(x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray | None]:
    """(pieces to read slots and the transcript from, the last ~8 s window for intent / caller state /
    end of turn); the window is None when the turn fits it (then the one piece serves both)."""
    if len(x) <= int(WINDOW_S * SR):
        return [x], None
    pauses = pause_centres(x)
    return split_even(x, pauses=pauses), split_turn(x, pauses=pauses)[-1]

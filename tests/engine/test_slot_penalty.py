"""The slot head's blank penalty: fitted on held-out clips, dropped words come back, few are invented."""

from __future__ import annotations

import numpy as np

from engine.textnorm import SLOT_TOKENS
from engine.training.calibrate import fit_blank_penalty, slot_decode

V = len(SLOT_TOKENS)
FIVE, FIFTY = SLOT_TOKENS.index("five"), SLOT_TOKENS.index("fifty")


def frames(*cols: tuple[int, float]) -> np.ndarray:
    """One frame per (token, margin): the token's logit is `margin` below the blank's (blank = 0)."""
    z = np.full((len(cols) * 3, V), -10.0, np.float32)
    z[:, 0] = 0.0
    for i, (tok, margin) in enumerate(cols):
        z[3 * i + 1, tok] = -margin
    return z


def test_penalty_restores_a_narrowly_lost_word_and_stops_before_inventing_ones() -> None:
    said = [frames((FIFTY, 0.8), (FIVE, -1.0)), frames((FIVE, -2.0))]  # "fifty" loses to blank by 0.8
    targets = [[FIFTY, FIVE], [FIVE]]
    quiet = [frames((FIVE, 2.7))] * 3  # no slot word said; a "five" 2.7 below blank
    pen, table = fit_blank_penalty(said + quiet, targets + [[]] * 3, grid=(0.0, 0.5, 1.0, 2.0, 3.0))
    assert slot_decode(said[0], 0.0) == [FIVE]  # plain greedy decoding drops "fifty"
    assert pen == 1.0  # the smallest penalty that gets both right
    rows = {r["penalty"]: r for r in table}
    assert rows[0.0]["exact"] == 0.5 and rows[1.0]["exact"] == 1.0
    assert rows[2.0]["inserted"] == 0.0 and rows[3.0]["inserted"] == 1.0
    assert slot_decode(said[0], pen) == [FIFTY, FIVE]

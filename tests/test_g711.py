"""G.711 tables against the reference coder's known points and round trips."""

import numpy as np

from telephony import g711


def test_ulaw_reference_points() -> None:
    # ITU-T G.711 mu-law: 0 encodes to 0xFF, full-scale negative to 0x00, full-scale positive to 0x80.
    assert g711.ulaw_encode(np.array([0], np.int16)) == b"\xff"
    assert g711.ulaw_encode(np.array([-32768], np.int16)) == b"\x00"
    assert g711.ulaw_encode(np.array([32767], np.int16)) == b"\x80"
    assert g711.ulaw_decode(b"\xff")[0] == 0
    assert g711.ulaw_decode(b"\x80")[0] == 32124


def test_alaw_reference_points() -> None:
    assert g711.alaw_encode(np.array([0], np.int16)) == b"\xd5"
    assert g711.alaw_decode(b"\xd5")[0] == 8
    assert g711.alaw_decode(b"\x55")[0] == -8


def test_round_trip_error_is_within_quantization() -> None:
    x = (np.sin(np.arange(8000) / 7.0) * 20000).astype(np.int16)
    for enc, dec in ((g711.ulaw_encode, g711.ulaw_decode), (g711.alaw_encode, g711.alaw_decode)):
        y = dec(enc(x)).astype(np.int32)
        err = np.abs(y - x)
        # Logarithmic companding: error grows with magnitude but stays under ~3.2% of the sample.
        assert np.all(err <= np.abs(x.astype(np.int32)) * 0.032 + 16)
        assert len(enc(x)) == len(x)


def test_decode_is_monotonic_over_codes() -> None:
    # Codes 0x00..0x7F are negative (descending magnitude), 0x80..0xFF positive.
    pos = g711.ulaw_decode(bytes(range(0x80, 0x100)))
    assert np.all(np.diff(pos.astype(np.int32)) <= 0)

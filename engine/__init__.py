"""The speech engine: caller speech in, a calibrated Understanding out; text in, 8 kHz speech out.

Never imports bot/, telephony/ or policies/: the training pipeline takes the intent catalog as
plain data (engine.catalog.Catalog).
"""

from engine.types import Understanding, SpeechStyle

__all__ = ["Understanding", "SpeechStyle"]

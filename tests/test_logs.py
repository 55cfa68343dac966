"""Logs never carry raw phone numbers, card-like digit runs or secrets."""

import json

from ops.logs import mask_digits, redact_processor


def test_masks_phone_and_card_numbers() -> None:
    assert mask_digits("caller +1 (415) 555-0134") == "caller *********34"
    assert "4111111111111111" not in mask_digits("card 4111 1111 1111 1111")
    assert mask_digits("turn 3 took 240 ms") == "turn 3 took 240 ms"


def test_processor_redacts_nested_values_and_secrets() -> None:
    event = {
        "event": "call started from +14155550134",
        "call_id": "CA123",
        "params": {"From": "+14155550134", "token": "s3cret"},
        "authorization": "Bearer abc",
    }
    out = json.dumps(redact_processor(None, "info", dict(event)))
    assert "4155550134" not in out
    assert "s3cret" not in out and "Bearer abc" not in out
    assert "CA123" in out

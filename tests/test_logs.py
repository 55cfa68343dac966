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


def test_every_line_is_json_on_stderr() -> None:
    """A module's logger is created at import, often before configure_logging(): its lines must still be
    JSON on stderr (`bot call` prints its summary on stdout), with the module name and bound values; and so
    must the libraries' (uvicorn, pipecat)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("from ops.logs import get_logger, configure_logging\n"
            "log = get_logger('early.module', component='x')\n"
            "configure_logging()\n"
            "log.info('hello', call_id='CA1')\n"
            "log.bind(n=2).warning('bound', caller='+14155550134')\n"
            "import logging\n"
            "logging.getLogger('uvicorn.error').info('Started server process [%d]', 7)\n"
            "logging.getLogger('uvicorn.error').info('connection open')\n"
            "from loguru import logger\n"
            "logger.info('pipecat says hi')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert r.returncode == 0 and r.stdout == ""
    lines = [json.loads(line) for line in r.stderr.splitlines()]
    assert [(e["logger"], e["event"], e["level"]) for e in lines] == [
        ("early.module", "hello", "info"), ("early.module", "bound", "warning"),
        # libraries' stdlib logging and pipecat's loguru as JSON too; uvicorn's per-WebSocket chatter dropped
        ("uvicorn.error", "Started server process [7]", "info"), ("__main__", "pipecat says hi", "info")]
    assert lines[0]["component"] == "x" and lines[0]["call_id"] == "CA1" and lines[1]["n"] == 2
    assert "4155550134" not in r.stderr  # redaction applies to them too

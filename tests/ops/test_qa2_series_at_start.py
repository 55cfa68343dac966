"""A freshly started `bot serve` exports the series its alerts take increase() of at 0, before any call: otherwise
the first call after a deploy creates voicebot_calls_started_total{transport=...} at 1, Prometheus never sees it
rise, and NoCallsInBusinessHours / ErrorRateHigh / the escalation ratio under-count right after every deploy."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops import metrics
from tests.helpers.bot import ACCOUNT_SID, AUTH_TOKEN, open_policy, twilio_env
from tests.helpers.fake_twilio import FakeTwilioApi
from tests.helpers.server import BotServer, isolated_redis_url

pytestmark = pytest.mark.slow


def test_fresh_worker_exports_alerted_series_at_zero(redis_url: str, tmp_path: Path,
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    with FakeTwilioApi(ACCOUNT_SID, AUTH_TOKEN) as api:
        env = twilio_env(api.url, open_policy(tmp_path / "policy.yaml"), tmp_path_factory.getbasetemp())
        with BotServer(isolated_redis_url(redis_url), tmp_path, env) as server:
            text = server.metrics()  # no call placed yet
    lines = set(text.splitlines())
    want = {f'voicebot_calls_started_total{{transport="{t}"}} 0.0' for t in metrics.TRANSPORTS}
    want |= {f'voicebot_calls_total{{outcome="{o}",transport="{t}"}} 0.0'
             for t in metrics.TRANSPORTS for o in metrics.MAIN_OUTCOMES}
    want |= {f'voicebot_errors_total{{component="{c}",kind="{k}"}} 0.0' for c, k in metrics.ALERTED_ERRORS}
    want.add("voicebot_redis_server_changes_total 0.0")
    missing = sorted(want - lines)
    assert not missing, missing

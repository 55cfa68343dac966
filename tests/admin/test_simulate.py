"""Try-it through the real engine (shipped model + the bot's voice) and the real decide()."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI

from tests.admin.conftest import auth

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine() -> Any:
    from bot.app import load_engine

    return load_engine()


@pytest.fixture
async def sim_client(app: FastAPI, engine: Any) -> httpx.AsyncClient:
    app.state.engine = engine
    transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://admin.test", timeout=120) as c:
        yield c


async def test_text_is_spoken_by_the_bot_voice_then_understood(sim_client: httpx.AsyncClient) -> None:
    r = await sim_client.post("/admin/api/simulate", data={"text": "I want to pay my bill"}, headers=auth("editor"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["spoken_by_bot_voice"] is True and body["input"] == "text" and body["policy"] == "v1"
    u, d = body["understanding"], body["decision"]
    assert u["intent"] == "pay_bill", u
    assert u["alternatives"][0][0] == "pay_bill" and abs(u["alternatives"][0][1] - u["confidence"]) < 0.01
    assert isinstance(u["transcript"], str) and isinstance(u["slots"], dict)
    assert d["intent"] == "pay_bill" and d["action"] in ("collect", "confirm") and d["reason"]


async def test_draft_policy_changes_the_decision(sim_client: httpx.AsyncClient, default_yaml: str) -> None:
    doc = yaml.safe_load(default_yaml)
    doc["intents"]["pay_bill"]["action"] = {"type": "transfer", "queue": "repair"}  # open around the clock
    doc["thresholds"]["overrides"]["pay_bill"] = {"accept": 0.0, "confirm": 0.0}
    r = await sim_client.post("/admin/api/simulate", headers=auth("editor"),
                              data={"text": "I want to pay my bill", "yaml": yaml.safe_dump(doc)})
    assert r.status_code == 200, r.text
    d = r.json()["decision"]
    assert r.json()["policy"] == "unsaved draft"
    assert (d["action"], d["intent"], d["reason"], d["target"]) == ("transfer", "pay_bill", "accepted", "repair")


async def test_uploaded_wav_any_rate(sim_client: httpx.AsyncClient, tmp_path: Path) -> None:
    wav = tmp_path / "outage.wav"  # espeak-ng writes 22.05 kHz: the API resamples
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), "my internet is down"], check=True)
    r = await sim_client.post("/admin/api/simulate", headers=auth("editor"),
                              files={"audio": ("outage.wav", wav.read_bytes(), "audio/wav")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["spoken_by_bot_voice"] is False and body["input"] == "audio"
    assert body["understanding"]["intent"] == "report_outage", body["understanding"]
    assert body["decision"]["intent"] == "report_outage" and body["decision"]["reason"]

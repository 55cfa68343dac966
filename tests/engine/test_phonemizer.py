"""The long-lived espeak-ng phonemizer (engine.phonemizer) against one-shot espeak-ng runs of the same text:
the same phonemes, and it recovers when its process dies or hangs."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

import pytest

from engine.phonemizer import Phonemizer
from engine.voice import split_chunks

EXE = shutil.which("espeak-ng") or "espeak-ng"
TEXTS = [
    "That's a payment of 42 dollars, is that right?",
    "Your account number is 12345678, is that right?",
    "Please call us back at (800) 555-0199.",
    "We open tomorrow at 8:30 a.m. Eastern time.",
    "Hello, world. Bye now!",  # two sentences in one line: two output lines, joined
    "Dr. Smith; really? Yes: 100%.",
    "Café déjà vu",  # a language switch marker, as one-shot espeak prints it
    "qxzv qxzv",  # the sentinel itself inside a text
]


def _one_shot(text: str) -> str:
    out = subprocess.run([EXE, "-q", "--ipa", "-v", "en-us", "--", text], capture_output=True, check=True)
    return " ".join(out.stdout.decode().split())


@pytest.fixture
def ph() -> Phonemizer:
    p = Phonemizer(EXE, "en-us", timeout_s=5.0)
    yield p
    p.close()


def test_same_phonemes_as_one_shot_runs(ph: Phonemizer) -> None:
    chunks = [c for t in TEXTS for c in split_chunks(t)] + TEXTS
    for text in chunks:
        assert ph.phonemes(text) == _one_shot(text), text
    assert ph.phonemes("   ") == ""
    assert ph.phonemes("two\nlines") == _one_shot("two lines")  # a newline is not a line of its own


def test_a_dead_or_hung_process_is_replaced(ph: Phonemizer) -> None:
    want = _one_shot("pay my bill")
    assert ph.phonemes("pay my bill") == want
    assert ph._proc is not None
    first = ph._proc.pid
    ph._proc.kill()
    ph._proc.wait()
    assert ph.phonemes("pay my bill") == want  # answered (a fresh process)
    assert ph._proc is not None and ph._proc.pid != first
    # a process that stops answering: the clause is answered by a one-shot run within the timeout
    ph.timeout_s = 0.5
    os.kill(ph._proc.pid, 19)  # SIGSTOP
    hung = ph._proc
    assert ph.phonemes("pay my bill") == want
    assert hung.poll() is not None  # killed, not left behind
    assert ph.phonemes("pay my bill") == want


def test_concurrent_clauses_get_their_own_answers(ph: Phonemizer) -> None:
    texts = ["check my balance", "report an outage", "reset my password", "talk to an agent"]
    want = {t: _one_shot(t) for t in texts}
    bad: list[str] = []

    def worker(t: str) -> None:
        for _ in range(20):
            if ph.phonemes(t) != want[t]:
                bad.append(t)

    threads = [threading.Thread(target=worker, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad

"""Shared test helpers: a `bot serve` subprocess, a local Twilio REST fake, caller audio."""

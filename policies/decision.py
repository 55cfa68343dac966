"""What decide() returns. The action vocabulary every bridge and the conversation understand."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# answer: say prompt, keep listening | confirm: ask yes/no about an intent | clarify: ask which of two
# reprompt: didn't catch that | collect: ask for a slot | transfer: hand to target (a queue)
# dtmf_menu: offer keypad options | hangup: say prompt and end the call
ACTIONS = ("answer", "confirm", "clarify", "reprompt", "collect", "transfer", "dtmf_menu", "hangup")


@dataclass(frozen=True)
class Resume:
    """A question the caller interrupted with another request ("How much would you like to pay?" ->
    "actually, I want to cancel"): the request being collected, its values so far, and whether its values
    were being read back. A "no" to "You'd like to cancel?" goes back to it."""

    intent: str
    slots: dict[str, Any] = field(default_factory=dict)
    read_back: bool = False


@dataclass(frozen=True)
class Decision:
    action: str
    prompt: str  # rendered text the voice will say (may be "")
    target: str | None = None  # queue name for transfer
    reason: str = ""  # reason code: lands in the event stream and metrics labels
    intent: str | None = None  # the intent acted on/confirmed, when any
    slots: dict[str, Any] = field(default_factory=dict)
    style: str = "neutral"  # voice style (calm for frustrated callers)
    options: tuple[str, ...] = ()  # clarify: the two intents offered, in order; dtmf_menu: the digits offered
    resume: Resume | None = None  # confirm/clarify about a new request: the collection it interrupted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

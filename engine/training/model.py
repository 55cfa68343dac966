"""Joint heads over the Whisper-tiny encoder: intent, slot-token CTC, transcript CTC, caller state, end of turn."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from engine.textnorm import CHARS, SLOT_TOKENS
from engine.training.whisper import D_MODEL, N_LAYERS, WhisperEncoder

POOLS = 3  # attention-pooling queries: intent, caller state, end of turn


class Heads(nn.Module):
    def __init__(self, n_intents: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.pool = nn.Linear(D_MODEL, POOLS)
        self.intent = nn.Sequential(nn.Linear(D_MODEL, 256), nn.GELU(), nn.Dropout(dropout), nn.Linear(256, n_intents))
        self.state = nn.Sequential(nn.Linear(D_MODEL, 64), nn.GELU(), nn.Linear(64, 1))
        self.eot = nn.Sequential(nn.Linear(2 * D_MODEL, 128), nn.GELU(), nn.Linear(128, 1))
        self.slot_ctc = nn.Linear(D_MODEL, len(SLOT_TOKENS))
        self.char_ctc = nn.Linear(D_MODEL, len(CHARS))

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        w = torch.softmax(self.pool(h), dim=1)  # (B, T, POOLS) over time
        pooled = torch.einsum("btp,btd->bpd", w, h)
        return {
            "intent": self.intent(pooled[:, 0]),
            "frustration": self.state(pooled[:, 1]).squeeze(-1),
            "eot": self.eot(torch.cat([pooled[:, 2], h[:, -1]], -1)).squeeze(-1),
            "slot": self.slot_ctc(h),
            "char": self.char_ctc(h),
        }


class TopModel(nn.Module):
    """What trains: the encoder's top layers + final norm + heads, over cached lower-layer output."""

    def __init__(self, encoder: WhisperEncoder, n_intents: int, frozen_layers: int) -> None:
        super().__init__()
        self.frozen_layers = frozen_layers
        self.layers = nn.ModuleList(copy.deepcopy(encoder.layers[frozen_layers:]))
        self.layer_norm = copy.deepcopy(encoder.layer_norm)
        self.heads = Heads(n_intents)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for layer in self.layers:
            x = layer(x)
        return self.heads(self.layer_norm(x))


class FullModel(nn.Module):
    """Log-mel in, every head out: what gets exported to ONNX. Intent logits are divided by the
    calibrated temperature inside the graph, so probabilities come out calibrated; the slot head's blank
    logit is lowered by the fitted penalty before the argmax (fewer dropped digits; calibrate.py)."""

    def __init__(self, encoder: WhisperEncoder, top: TopModel, temperature: float = 1.0,
                 slot_blank_penalty: float = 0.0) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(encoder)
        for i, layer in enumerate(top.layers):
            self.encoder.layers[top.frozen_layers + i].load_state_dict(layer.state_dict())
        self.encoder.layer_norm.load_state_dict(top.layer_norm.state_dict())
        self.heads = top.heads
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        blank = torch.zeros(len(SLOT_TOKENS))
        blank[0] = float(slot_blank_penalty)
        self.register_buffer("slot_blank_penalty", blank)

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.heads(self.encoder(mel, upto=N_LAYERS))
        return (
            torch.softmax(out["intent"] / self.temperature, -1),
            torch.sigmoid(out["frustration"]),
            torch.sigmoid(out["eot"]),
            (out["slot"] - self.slot_blank_penalty).argmax(-1),
            out["char"].argmax(-1),
        )


OUTPUT_NAMES = ["intent_probs", "frustration", "end_of_turn", "slot_ids", "char_ids"]


def ctc_loss(logits: torch.Tensor, targets: list[list[int]], mask: torch.Tensor) -> torch.Tensor:
    """Mean CTC loss over the rows where mask is True (truncated clips have no reliable transcript)."""
    idx = [i for i in range(len(targets)) if bool(mask[i])]
    if not idx:
        return logits.sum() * 0.0
    lp = F.log_softmax(logits[idx].float(), -1).transpose(0, 1)  # (T, B, V)
    flat = torch.tensor([t for i in idx for t in targets[i]], dtype=torch.long, device=lp.device)
    tl = torch.tensor([len(targets[i]) for i in idx], dtype=torch.long, device=lp.device)
    il = torch.full((len(idx),), lp.shape[0], dtype=torch.long, device=lp.device)
    # per target token (like reduction='mean'); clips with no slot word have empty targets, whose
    # all-blank loss grows with length, so those are normalised per 0.2 s of frames instead
    per = F.ctc_loss(lp, flat, il, tl, blank=0, zero_infinity=True, reduction="none")
    norm = torch.where(tl > 0, tl.float(), torch.full_like(tl, lp.shape[0], dtype=torch.float) / 10.0)
    return (per / norm).mean()

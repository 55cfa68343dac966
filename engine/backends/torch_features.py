"""engine.features.log_mel for a whole batch, in torch on the model's device.

On a GPU the model runs a 128-clip batch in ~30 ms while numpy features take ~3.5 ms per clip on a CPU
core, so the front end, not the model, would set the pace. This is the same arithmetic, batched:
8 -> 16 kHz half-band interpolation, normalisation over each clip's real audio only, left padding to
the bucket, Whisper's STFT / Slaney mel / log compression. Parity with the numpy front end is tested on
the CPU (tests/engine/test_runtime_backends.py); the features stay on the device for the model.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.features import _HOP, _MEL, _N_FFT, _UP_FIR, _WINDOW, SR_IN


class TorchLogMel:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.fir = torch.from_numpy(_UP_FIR).to(device).view(1, 1, -1)
        self.window = torch.from_numpy(_WINDOW).to(device)
        self.mel = torch.from_numpy(_MEL).to(device)  # (80, 201)

    @torch.inference_mode()
    def __call__(self, xs: list[np.ndarray], seconds: int) -> torch.Tensor:
        """Float 8 kHz clips (each <= seconds long after taking its tail) -> (B, 80, 100*seconds) float32."""
        n = seconds * SR_IN
        tails = [x[-n:] for x in xs]
        lengths = torch.tensor([2 * len(t) for t in tails], device=self.device)  # real samples at 16 kHz
        buf = np.zeros((len(xs), n), np.float32)
        for i, t in enumerate(tails):
            if len(t):
                buf[i, n - len(t):] = t  # left-padded: speech ends at the last frame
        x = torch.from_numpy(buf).to(self.device, non_blocking=True)
        up = torch.zeros((len(xs), 1, 2 * n), device=self.device)
        up[:, 0, ::2] = x
        half = self.fir.shape[-1] // 2
        y = torch.nn.functional.conv1d(up, self.fir, padding=half)[:, 0]  # symmetric FIR: conv == correlation
        # numpy filters the real audio alone, so the filter's spill into the padding is not there
        pos = torch.arange(2 * n, device=self.device)
        real = pos[None, :] >= (2 * n - lengths)[:, None]
        y = torch.where(real, y, 0.0)
        count = lengths.clamp(min=1)[:, None].float()
        mean = y.sum(dim=1, keepdim=True) / count
        var = (torch.where(real, y - mean, 0.0) ** 2).sum(dim=1, keepdim=True) / count
        y = torch.where(real, (y - mean) / torch.sqrt(var + 1e-7), 0.0)
        pad = _N_FFT // 2
        y = torch.nn.functional.pad(y[:, None], (pad, pad), mode="reflect")[:, 0]
        frames = y.unfold(-1, _N_FFT, _HOP)  # (B, frames, 400)
        spec = torch.fft.rfft(frames * self.window, dim=-1)
        power = spec.real**2 + spec.imag**2  # (B, frames, 201)
        mel = torch.clamp(power @ self.mel.T, min=1e-10)
        logm = torch.log10(mel).transpose(1, 2)[:, :, : seconds * 100]
        logm = torch.maximum(logm, logm.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (logm + 4.0) / 4.0

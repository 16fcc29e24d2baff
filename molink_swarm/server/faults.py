"""Testing only: a server that computes wrong outputs on purpose, for the spot checks' tests and benchmark.

``join --debug-fault-noise STD [--debug-fault-rate F]`` (flags hidden from ``--help``) adds Gaussian noise of
``STD`` times each row's RMS to this server's outputs on a fraction ``F`` of its steps (all by default), after
computing them: its caches stay right, the answers it sends (replies, pushes to the next server) are wrong. Which
steps is decided by a seeded generator, so a test sees the same faulty steps on every run.
"""

from __future__ import annotations

import logging
import random

import torch

logger = logging.getLogger(__name__)


class FaultInjection:
    def __init__(self, noise: float, rate: float = 1.0, seed: int = 0):
        if noise <= 0 or not 0 < rate <= 1:
            raise ValueError("--debug-fault-noise needs a positive STD and --debug-fault-rate a fraction in (0, 1]")
        self.noise, self.rate = noise, rate
        self._steps = random.Random(seed)
        self._values = torch.Generator().manual_seed(seed)
        self.faulty_steps = 0
        logger.warning("TESTING ONLY: this server adds noise (%.3g x RMS) to its outputs on %.0f%% of its steps", noise, 100 * rate)

    def apply(self, output: torch.Tensor) -> torch.Tensor:
        """``output``, with noise if this step is one of the faulty ones."""
        if self._steps.random() >= self.rate:
            return output
        self.faulty_steps += 1
        values = output.float()
        rms = values.square().mean(-1, keepdim=True).sqrt()
        noise = torch.randn(values.shape, generator=self._values) * rms * self.noise
        return (values + noise).to(output.dtype)

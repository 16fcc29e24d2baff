"""Many generations at once over one distributed model, as one engine (the web app's).

Each generation has its own inference session, so the servers hold its cache and batch its steps with everyone
else's (see server/scheduler.py). What the client computes itself, the final norm and the LM head (for a small
model, a fifth of all the work), runs once per step for every generation waiting for it: :class:`HeadBatcher`
collects them the way a server's compute queue does, without waiting for a batch to fill.

Everything here runs on the client's event loop (client/loop.py), where the sessions' P2P streams live.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator, Callable, Optional, Sequence

import torch

from molink_swarm.client.session import InferenceSession


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: Optional[int] = None

    def choose(self, logits: torch.Tensor, generator: Optional[torch.Generator]) -> int:
        """The next token from one row of logits."""
        if self.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > self.top_p  # keep the smallest set reaching top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=generator))


class HeadBatcher:
    """Final norm + LM head for the last hidden state of every generation that asks at about the same time: one
    matrix product for all of them. A request that arrives while a batch computes joins the next one."""

    def __init__(self, norm: torch.nn.Module, head: torch.nn.Module, max_batch: int = 64):
        self.norm, self.head, self.max_batch = norm, head, max_batch
        self._waiting: list[tuple[torch.Tensor, asyncio.Future]] = []
        self._draining: Optional[asyncio.Task] = None

    async def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [vocab] for ``hidden`` [hidden_size]."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((hidden, future))
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            try:
                logits = await asyncio.to_thread(self._compute, torch.stack([hidden for hidden, _ in batch]))
            except Exception as e:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), row in zip(batch, logits):
                if not future.done():
                    future.set_result(row)

    @torch.inference_mode()
    def _compute(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))


class BatchedDecoder:
    """Generates for many prompts at once with one distributed causal LM (greedy or sampling)."""

    def __init__(self, model, *, batch_head: bool = True, **session_options):
        self.model = model
        self.session_options = session_options
        self.heads = HeadBatcher(model._final_norm(), model.get_output_embeddings(), max_batch=64 if batch_head else 1)
        eos = model.generation_config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.active: set[InferenceSession] = set()  # one per running generation
        self.failovers = 0  # of the generations that have ended

    async def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        stopped: Callable[[], bool] = lambda: False,
    ) -> AsyncIterator[int]:
        """Yield new token ids until an end-of-sequence token (yielded too), ``max_new_tokens`` or ``stopped()``."""
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator().manual_seed(sampling.seed)
        session = InferenceSession(
            self.model.swarm,
            max_length=len(prompt_ids) + max_new_tokens,
            model_name=self.model.source.name,
            wait_for_blocks_s=self.model.wait_for_blocks_s,
            **self.session_options,
        )
        self.active.add(session)
        try:
            inputs = torch.tensor([list(prompt_ids)], dtype=torch.long)
            for _ in range(max_new_tokens):
                with torch.inference_mode():
                    hidden = await session.astep(self.model.embed_inputs(inputs))
                token = sampling.choose(await self.heads.logits(hidden[0, -1]), generator)
                yield token
                if token in self.eos_ids or stopped():
                    return
                inputs = torch.tensor([[token]], dtype=torch.long)
        finally:
            self.active.discard(session)
            self.failovers += session.failovers
            await session.aclose()

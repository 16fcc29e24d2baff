"""Many generations at once over one distributed model, as one engine (the web app's).

Each generation has its own inference session (the servers hold its cache), but generations step in
*micro-batches*: the members of a group that share a chain send their decode steps as one *group step*, one message
per hop (client/group_step.py), so the steps reach each server together and run there in one pass (see
server/scheduler.py), and the client's own final norm and LM head (for a small model, a fifth of all the work) run
once for the whole group. Free-running generations would reach the servers and the head one at a time and batch
poorly.

Several groups are in flight at once, each on a different stage of the chain (MoLink's overlap of compute and
transfer): while one group's steps compute on the second server, another's are on the first, a third's at the
head. How many groups: first as many as fit in one trip around the chain (the trip time over the time of its
slowest stage), then whatever count gives the most tokens/s as measured (:class:`GroupCount`); groups merge or split
between steps to follow it. A new generation computes its prompt on its own (a long one must not hold up
a group), then joins the smallest group; a lone generation is a group of one and pays nothing for any of this.
New prompts go first, briefly: a group about to step lets the prompts then in flight finish, for at most
:data:`PROMPT_FIRST_S` from each one's start (:class:`PromptsInFlight`), so that a burst of new chats gets its
first tokens sooner and joins the groups at once instead of computing beside them.

Log-probabilities (for scoring, as OpenAI's ``logprobs``) are those of the model's own distribution: log_softmax of the
raw logits in float32, before temperature or top-p, so a token scores the same whatever the sampling settings. A
prompt's tokens are scored from the prompt pass itself: the servers return the last block's output at every position
of a prompt, and the client runs its head over all of them (in slices, to bound memory) instead of only the last.

Everything here runs on the client's event loop (client/loop.py), where the sessions' P2P streams live.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from typing import AsyncIterator, Callable, Iterator, Optional, Sequence

import torch

from molink_swarm.client.group_step import step_together
from molink_swarm.client.session import InferenceSession

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: Optional[int] = None

    def choose(self, logits: torch.Tensor, generator: Optional[torch.Generator]) -> int:
        """The next token from one row of logits."""
        if self.temperature < 1e-5:  # below this, softmax of logits / temperature overflows: it is greedy anyway
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > self.top_p  # keep the smallest set reaching top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=generator))


@dataclasses.dataclass(frozen=True)
class ScoredToken:
    """A token and its log-probability under the model; ``top``: the most likely tokens at its position, best first."""

    id: int
    logprob: Optional[float]  # None: not scored (or a prompt's first token, which nothing predicts)
    top: tuple[tuple[int, float], ...] = ()
    prompt: bool = False  # a token of the prompt, not a generated one


def score_tokens(logits: torch.Tensor, tokens: torch.Tensor, top: int, prompt: bool = False) -> list[ScoredToken]:
    """Score ``tokens[i]`` under ``logits[i]`` ([n, vocab], raw model logits) with the ``top`` likeliest tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None].to(logprobs.device))[:, 0].tolist()
    if top > 0:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen)
    return [ScoredToken(t, lp, tp, prompt) for t, lp, tp in zip(tokens.tolist(), chosen, tops)]


# Prompt positions per run of the LM head when scoring a prompt: a slice's logits take rows * vocab floats.
PROMPT_SCORING_ROWS = 128


class GroupCount:
    """How many micro-batches to keep in flight, from measured figures, never a constant.

    The first guess is MoLink's rule: one trip of a group around the chain (its steps on every server, the
    transfers, the head) over the time of the trip's slowest stage. With fewer groups some stage idles; with more,
    groups queue at the slowest stage and only get smaller. The rule assumes stages that run on hardware of their
    own; where they share it (servers on one machine, or the client's head on a server's cores), groups in flight
    overlap less than it says and smaller batches cost more. So the count is then tuned on measured throughput:
    tokens/s with the current count and with each neighbour in turn, keeping the best (hill climbing), or rather the
    fewest groups that measure within ``margin`` of the best: each group costs every server a pass, and rates a few
    percent apart are within the noise of a window. What was
    measured is forgotten when the number of generations changes by more than a quarter, and the neighbours are
    measured again every ``remeasure_every`` windows, since both the load and the swarm change.
    """

    def __init__(
        self,
        max_groups: int = 8,
        *,
        smoothing: float = 0.2,
        window_s: float = 1.0,
        remeasure_every: int = 30,
        margin: float = 0.05,
    ):
        self.smoothing, self.max_groups = smoothing, max_groups
        self.margin = margin  # more groups are kept only if they measure this much more tokens/s than fewer
        self.window_s, self.remeasure_every = window_s, remeasure_every
        self.trip_s: Optional[float] = None
        self.stage_s: Optional[float] = None
        self.rates: dict[int, float] = {}  # tokens/s measured with that many groups, for the current population
        self._current: Optional[int] = None  # the count being used (None: the rule's guess)
        self._population = 0
        self._window_start: Optional[float] = None
        self._window_tokens = 0
        self._settling = True  # the window after a change of count is not measured: groups were re-forming
        self._windows = 0

    def record(self, trip_s: float, stage_s: float) -> None:
        """One group's trip and the time of its slowest stage (for the first guess)."""
        if self.trip_s is None:
            self.trip_s, self.stage_s = trip_s, stage_s
        else:
            self.trip_s += self.smoothing * (trip_s - self.trip_s)
            self.stage_s += self.smoothing * (stage_s - self.stage_s)

    def guess(self) -> int:
        if self.trip_s is None or not self.stage_s:
            return 1
        return max(1, min(self.max_groups, math.floor(self.trip_s / self.stage_s)))

    def target(self) -> int:
        return self.guess() if self._current is None else self._current

    def record_tokens(self, tokens: int, population: int, now: float) -> None:
        """``tokens`` generated by a group's trip that ended at ``now``, with ``population`` generations in groups."""
        if self._window_start is None or population <= 1:
            self._window_start, self._window_tokens = now, 0
            return
        self._window_tokens += tokens
        elapsed = now - self._window_start
        if elapsed < max(self.window_s, 3 * (self.trip_s or 0.0)):
            return
        current = self.target()
        if abs(population - self._population) > 0.25 * max(self._population, 1):
            self.rates.clear()  # another load: what was best for it says little now
            self._population, self._settling = population, True
        if not self._settling:
            rate = self._window_tokens / elapsed
            previous = self.rates.get(current)
            self.rates[current] = rate if previous is None else previous + 0.5 * (rate - previous)
        self._settling = False
        self._windows += 1
        if self._windows % self.remeasure_every == 0:
            self.rates = {current: self.rates[current]} if current in self.rates else {}
        if current in self.rates:
            neighbours = [g for g in (current - 1, current + 1) if 1 <= g <= min(self.max_groups, population)]
            measured = [g for g in (current, *neighbours) if g in self.rates]
            top = max(self.rates[g] for g in measured)
            # The fewest groups that measure within the margin of the best: each group costs every server a pass.
            best = min(g for g in measured if self.rates[g] >= (1.0 - self.margin) * top)
            if best == current:  # the best known: try a neighbour not measured yet, if any
                best = next((g for g in neighbours if g not in self.rates), current)
            self._current, self._settling = best, best != current
        self._window_start, self._window_tokens = now, 0


# How long a new generation's prompt may hold up the steps of the groups already decoding, from its start (seconds).
PROMPT_FIRST_S = 1.0


class PromptsInFlight:
    """The prompts of new generations being computed, which groups about to step let go first.

    A group's step costs the servers about a full read of their weights however few its members are, and takes
    their compute from the prompts: while a burst of new chats computes its prompts, the chats already decoding
    would step in small, costly passes beside them, and every new chat's first token would wait. So a group about
    to step first waits for the prompts in flight when it got there (:meth:`wait`): they finish sooner, their
    generations join the groups, and the next steps serve them all at once (SGLang and vLLM's schedulers also run
    waiting prompts before the next decode step). The wait has bounds: a prompt holds no group for longer than
    ``hold_s`` from its own start, and a prompt that starts while a group waits does not prolong that wait. A long
    prompt thus stalls decoding once and briefly, then computes in the time decode steps leave it (their priority
    on the servers, see server/scheduler.py), and a stream of new chats cannot stop the others.
    """

    def __init__(self, hold_s: float = PROMPT_FIRST_S):
        self.hold_s = hold_s
        self._running: dict[asyncio.Future, float] = {}  # one per prompt in flight: done when it ends -> its start
        self.waits = 0  # group steps that waited for prompts (for tests and metrics)

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        """While a new generation's prompt computes."""
        done = asyncio.get_running_loop().create_future()
        self._running[done] = time.monotonic()
        try:
            yield
        finally:
            del self._running[done]
            done.set_result(None)

    async def wait(self) -> None:
        """Until each prompt in flight now is done or has held the groups for ``hold_s`` since its start."""
        waiting, waited = dict(self._running), False
        while True:
            now = time.monotonic()
            waiting = {done: started for done, started in waiting.items() if not done.done() and started + self.hold_s > now}
            if not waiting:
                return
            if not waited:
                self.waits, waited = self.waits + 1, True
            expires = min(waiting.values()) + self.hold_s
            await asyncio.wait(list(waiting), timeout=expires - now, return_when=asyncio.FIRST_COMPLETED)


class SharedHead:
    """The client's final norm and LM head, shared by every generation of an engine, batched as the servers batch.

    Rows handed in while the head computes go together in its next run: the prompts of a burst of new chats that end
    at about the same time, and groups that reach the head together, pay one read of its weights (for a small model,
    a fifth of all the work) instead of one each. Nothing waits for a batch to fill: a lone generation's row runs at
    once, as before.
    """

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor]):
        self._run = run  # [rows, hidden] -> [rows, vocab], on a worker thread
        self._waiting: list[tuple[torch.Tensor, asyncio.Future]] = []
        self._running: Optional[asyncio.Task] = None
        self.batches: list[int] = []  # rows of its last runs (a window, for tests and metrics)

    async def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """The logits of ``rows`` ([rows, hidden]), computed in the head's next run."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((rows, future))
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            self.batches = [*self.batches[-99:], sum(len(rows) for rows, _ in batch)]
            try:
                logits = await asyncio.to_thread(self._run, torch.cat([rows for rows, _ in batch]))
            except Exception as e:  # every row of the run gets the error (their generations end with it)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            except BaseException:  # cancelled: the engine is going away, and so are the rows' generations
                for _, future in batch:
                    future.cancel()
                raise
            for (rows, future), part in zip(batch, logits.split([len(rows) for rows, _ in batch])):
                if not future.done():  # not cancelled meanwhile
                    future.set_result(part)


@dataclasses.dataclass(eq=False)
class _Generation:
    session: InferenceSession
    inputs: torch.Tensor  # token ids of its next step, [1, tokens]
    max_new_tokens: int
    sampling: Sampling
    stopped: Callable[[], bool]
    generator: Optional[torch.Generator]
    tokens: asyncio.Queue  # ScoredTokens (the prompt's first, if scored), then None (done) or the error
    logprobs: Optional[int] = None  # score each token, with this many likeliest alternatives; None: no scoring
    score_prompt: bool = False
    produced: int = 0
    done: bool = False


class BatchedDecoder:
    """Generates for many prompts at once with one distributed causal LM (greedy or sampling)."""

    def __init__(
        self,
        model,
        *,
        micro_batches: bool = True,
        max_groups: int = 8,
        group_steps: bool = True,
        prompt_first_s: float = PROMPT_FIRST_S,
        **session_options,
    ):
        """``prompt_first_s``: how long a new prompt may hold up the groups' steps (:class:`PromptsInFlight`; 0: never)."""
        self.model = model
        self.session_options = session_options
        self.micro_batches = micro_batches  # False: every generation steps on its own (for comparisons)
        self.group_steps = group_steps  # False: a group's members send their steps one by one (for comparisons)
        eos = model.generation_config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.groups: list[list[_Generation]] = []
        self.group_count = GroupCount(max_groups=max_groups)
        self.prompts = PromptsInFlight(prompt_first_s)
        self.active: set[InferenceSession] = set()  # one per running generation
        self.failovers = 0  # of the generations that have ended
        self.regroups = 0  # merges and splits of groups to follow the group count
        self.head = SharedHead(self._logits)
        self._tasks: set[asyncio.Task] = set()

    async def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        stopped: Callable[[], bool] = lambda: False,
    ) -> AsyncIterator[int]:
        """Yield new token ids until an end-of-sequence token (yielded too), ``max_new_tokens`` or ``stopped()``."""
        async with contextlib.aclosing(self.generate_scored(prompt_ids, max_new_tokens, sampling, stopped)) as tokens:
            async for token in tokens:
                yield token.id

    async def generate_scored(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        stopped: Callable[[], bool] = lambda: False,
        *,
        logprobs: Optional[int] = None,
        score_prompt: bool = False,
    ) -> AsyncIterator[ScoredToken]:
        """Like :meth:`generate`, as :class:`ScoredToken`: with ``logprobs`` (a number of alternatives, 0 or more) each
        token is scored, and with ``score_prompt`` too the prompt's tokens come first, scored (the first one with
        ``logprob=None``). ``max_new_tokens=0`` only runs (and scores) the prompt."""
        if not prompt_ids:
            raise ValueError("The prompt needs at least one token")
        session = InferenceSession(
            self.model.swarm,
            max_length=len(prompt_ids) + max_new_tokens,
            model_name=self.model.source.name,
            wait_for_blocks_s=self.model.wait_for_blocks_s,
            **self.session_options,
        )
        generation = _Generation(
            session=session,
            inputs=torch.tensor([list(prompt_ids)], dtype=torch.long),
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stopped=stopped,
            generator=None if sampling.seed is None else torch.Generator().manual_seed(sampling.seed),
            tokens=asyncio.Queue(),
            logprobs=logprobs,
            score_prompt=score_prompt and logprobs is not None,
        )
        self.active.add(session)
        self._start(generation)
        try:
            while True:
                item = await generation.tokens.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            generation.done = True  # the consumer may stop early: its group drops it at the next step

    def _start(self, generation: _Generation) -> None:
        """A new generation's prompt goes on its own (a long one would hold up a whole group), then it joins one."""
        self._spawn(self._run_prompt(generation))

    async def _run_prompt(self, generation: _Generation) -> None:
        with self.prompts.computing():  # until it has joined a group (or ended)
            await self._run_group([generation], alone=True)

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _join(self, generation: _Generation) -> None:
        target = self.group_count.target() if self.micro_batches else math.inf
        if len(self.groups) < target:
            group: list[_Generation] = []
            self.groups.append(group)
            self._spawn(self._run_group(group))
        else:
            group = min(self.groups, key=len)
        group.append(generation)

    def _drop(self, group: list[_Generation]) -> None:
        self.groups = [g for g in self.groups if g is not group]  # by identity: two groups may hold equal lists

    def _rebalance(self, group: list[_Generation]) -> bool:
        """Between two of its steps, bring the number of groups towards the target: the smallest group hands its
        members to the others (False: it is gone), or the largest splits in two."""
        target = self.group_count.target() if self.micro_batches else math.inf
        if len(self.groups) > target and group is min(self.groups, key=len):
            self._drop(group)
            for member in group:
                min(self.groups, key=len).append(member)  # joins at that group's next step
            group.clear()
            self.regroups += 1
            return False
        if len(self.groups) < target and len(group) >= 2 and group is max(self.groups, key=len):
            half = group[len(group) // 2 :]
            del group[len(group) // 2 :]
            self.groups.append(half)
            self._spawn(self._run_group(half))
            self.regroups += 1
        return True

    async def _run_group(self, group: list[_Generation], alone: bool = False) -> None:
        """Step ``group`` until its members are done; ``alone``: a new generation's prompt, after which it joins a
        group of the engine."""
        error: BaseException = RuntimeError("The generation engine stopped")
        try:
            while group:
                if not alone:
                    await self.prompts.wait()  # new generations' prompts first (they may join this group meanwhile)
                    if not self._rebalance(group):
                        return  # its members went to other groups
                members = list(group)
                started = time.perf_counter()
                steps = await self._steps(members)
                trip_s = time.perf_counter() - started
                alive = []
                for member, hidden in zip(members, steps):
                    if isinstance(hidden, BaseException):
                        self._finish(group, member, hidden)
                    elif member.done:
                        self._finish(group, member, None)
                    else:
                        alive.append((member, hidden))
                if alone:  # the prompt pass: score the prompt if asked; a pure scoring ends here
                    alive = [(member, hidden) for member, hidden in alive if await self._prompt_done(group, member, hidden)]
                if not alive:
                    continue
                started = time.perf_counter()
                logits = await self.head.logits(torch.stack([hidden[0, -1] for _, hidden in alive]))
                head_s = time.perf_counter() - started
                for (member, _), row in zip(alive, logits):
                    try:
                        token = member.sampling.choose(row, member.generator)
                        if member.logprobs is None:
                            scored = ScoredToken(token, None)
                        else:
                            (scored,) = score_tokens(row[None], torch.tensor([token]), member.logprobs)
                        self._advance(group, member, scored)
                    except Exception as e:  # this generation's own sampling or stop check: the others go on
                        self._finish(group, member, e)
                if alone:
                    for member in list(group):
                        group.remove(member)
                        self._join(member)
                    return
                slowest_hop = max(alive[0][0].session.hop_compute_s, default=0.0)
                self.group_count.record(trip_s + head_s, max(head_s, slowest_hop))
                population = sum(len(g) for g in self.groups)
                self.group_count.record_tokens(len(alive), population, time.perf_counter())
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            logger.exception("A group of generations failed")
            error = e
            raise
        finally:
            for member in list(group):
                self._finish(group, member, error)
            self._drop(group)

    async def _steps(self, members: list[_Generation]) -> list[torch.Tensor | BaseException]:
        """The next step of each member: decode steps on a shared chain as group steps (client/group_step.py)."""
        with torch.inference_mode():
            embeddings = [self.model.embed_inputs(member.inputs, member.session.position) for member in members]
        sessions = [member.session for member in members]
        if self.group_steps:
            return await step_together(sessions, embeddings)
        return await asyncio.gather(*(s.astep(e) for s, e in zip(sessions, embeddings)), return_exceptions=True)

    @property
    def head_batches(self) -> list[int]:
        """Rows of the last LM head runs (a window, for tests and metrics)."""
        return self.head.batches

    @torch.inference_mode()
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.head_logits(hidden)

    async def _prompt_done(self, group: list[_Generation], member: _Generation, hidden: torch.Tensor) -> bool:
        """After ``member``'s prompt pass (``hidden``: the last block's output at every prompt position): hand out its
        scored prompt if asked; False if it is done (nothing to generate, or its scoring failed)."""
        if member.score_prompt and not member.done:
            try:
                scored = await asyncio.to_thread(self._score_prompt, member.inputs[0], hidden[0], member.logprobs)
            except Exception as e:  # its own failure (e.g. out of memory): the others go on
                self._finish(group, member, e)
                return False
            for token in scored:
                member.tokens.put_nowait(token)
        if member.max_new_tokens == 0 or member.done:
            self._finish(group, member, None)
            return False
        return True

    @torch.inference_mode()
    def _score_prompt(self, ids: torch.Tensor, hidden: torch.Tensor, top: int) -> list[ScoredToken]:
        """Each prompt token scored by the logits at the position before it (the first has none)."""
        scored = [ScoredToken(int(ids[0]), None, prompt=True)]
        for start in range(0, len(ids) - 1, PROMPT_SCORING_ROWS):
            end = min(start + PROMPT_SCORING_ROWS, len(ids) - 1)
            logits = self.model.head_logits(hidden[start:end])
            scored += score_tokens(logits, ids[start + 1 : end + 1], top, prompt=True)
        return scored

    def _advance(self, group: list[_Generation], member: _Generation, token: ScoredToken) -> None:
        member.tokens.put_nowait(token)
        member.produced += 1
        if token.id in self.eos_ids or member.produced >= member.max_new_tokens or member.stopped() or member.done:
            self._finish(group, member, None)
        else:
            member.inputs = torch.tensor([[token.id]], dtype=torch.long)

    def _finish(self, group: list[_Generation], member: _Generation, outcome: Optional[BaseException]) -> None:
        if member not in group:
            return
        group.remove(member)
        member.tokens.put_nowait(outcome)
        self.active.discard(member.session)
        self.failovers += member.session.failovers
        self._spawn(member.session.aclose())

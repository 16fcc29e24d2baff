"""A server answers bad requests with a clear error and keeps serving everyone else."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch
from hivemind.p2p import P2PHandlerError
from hivemind.proto import runtime_pb2

from molink_swarm.client.loop import run_sync
from molink_swarm.client.session import call_forward
from molink_swarm.client.swarm import SwarmClient
from molink_swarm.models import load_config, resolve_model
from molink_swarm.protocol import messages
from molink_swarm.protocol.tensors import deserialize_tensor, serialize_tensor

HIDDEN = 64


@pytest.fixture(scope="module")
def local(module_swarm, tiny_llama_path):
    return module_swarm(tiny_llama_path, ["0:6"], "--cache-tokens", "4096", "--max-sessions", "4")


def connect(local, tiny_llama_path) -> SwarmClient:
    """A client with its own peer identity."""
    source = resolve_model(tiny_llama_path)
    return SwarmClient(local.initial_peers, source.model_id, source.fingerprint, load_config(source).num_hidden_layers)


@pytest.fixture(scope="module")
def client(local, tiny_llama_path):
    swarm = connect(local, tiny_llama_path)
    yield swarm
    swarm.shutdown()


@pytest.fixture(scope="module")
def stranger(local, tiny_llama_path):
    """Another peer: a second client, or someone who learned a session id (every upstream server and relay does)."""
    swarm = connect(local, tiny_llama_path)
    yield swarm
    swarm.shutdown()


def server_of(client):
    [server] = run_sync(client.servers(refresh=True))
    return server.peer_id


def spec(**overrides) -> messages.SessionSpec:
    fields = dict(session_id="test-session-0001", start=0, end=6, max_length=64, batch_size=1)
    return messages.SessionSpec(**{**fields, **overrides})


def inference(client, *requests: runtime_pb2.ExpertRequest, between=None) -> list[runtime_pb2.ExpertResponse]:
    """Send the requests on one inference stream and collect the replies (raises the server's error).
    ``between(i)``, if given, is awaited before request ``i`` is sent."""

    stub = client.stub(server_of(client))

    async def run():
        done = asyncio.Event()

        async def it():  # like a real client: the stream stays open until the replies are in
            for i, r in enumerate(requests):
                if between is not None:
                    await between(i)
                yield r
            await done.wait()

        replies = []
        try:
            async for reply in await stub.rpc_inference(it()):
                replies.append(reply)
                if len(replies) == len(requests):
                    break
        finally:
            done.set()
        return replies

    return run_sync(asyncio.wait_for(run(), 60))


def step(position: int, hidden: torch.Tensor, open_spec=None) -> runtime_pb2.ExpertRequest:
    return messages.request(messages.InferenceStep(open=open_spec, position=position), hidden)


BAD_STEPS = {
    "wrong hidden size": ([step(0, torch.randn(1, 3, HIDDEN + 1), spec())], "Hidden states must be"),
    "NaN values": ([step(0, torch.full((1, 2, HIDDEN), float("nan")), spec())], "NaN"),
    "blocks not held": ([step(0, torch.randn(1, 2, HIDDEN), spec(end=9))], "this server holds 0:6"),
    "max_length over the limit": ([step(0, torch.randn(1, 2, HIDDEN), spec(max_length=10**6))], "max_length"),
    "cache budget exceeded": ([step(0, torch.randn(16, 2, HIDDEN), spec(batch_size=16, max_length=500))], "not enough cache"),
    "no session opened": ([step(0, torch.randn(1, 2, HIDDEN))], "must open a session"),
    "step skips ahead": (
        [step(0, torch.randn(1, 2, HIDDEN), spec()), step(5, torch.randn(1, 1, HIDDEN))],
        "holds 2 tokens",
    ),
    "batch size changes": (
        [step(0, torch.randn(1, 2, HIDDEN), spec()), step(2, torch.randn(2, 1, HIDDEN))],
        "Batch size",
    ),
    "past max_length": ([step(0, torch.randn(1, 70, HIDDEN), spec())], "max_length"),
    "batch of zero": ([step(0, torch.randn(0, 2, HIDDEN), spec())], "empty"),
    "zero tokens": ([step(0, torch.randn(1, 0, HIDDEN), spec())], "empty"),
    "5-D tensor": ([step(0, torch.randn(1, 1, 1, 2, HIDDEN), spec())], "rank 5"),
    "bfloat16 sent with 16-bit compression": (
        [
            runtime_pb2.ExpertRequest(
                metadata=messages.encode_metadata(messages.InferenceStep(open=spec(), position=0)),
                tensors=[runtime_pb2.Tensor(buffer=b"\0" * 2 * 2 * HIDDEN, size=[1, 2, HIDDEN], dtype="bfloat16", compression=runtime_pb2.CompressionType.FLOAT16)],
            )
        ],
        "16-bit compression applies to float32",
    ),
    "pushed step carrying a tensor": (
        [messages.request(messages.InferenceStep(open=spec(), position=0, expect_push=True), torch.randn(1, 2, HIDDEN))],
        "must not carry a tensor",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_STEPS))
def test_bad_inference_steps_get_clear_errors(client, case):
    requests, message = BAD_STEPS[case]
    with pytest.raises(P2PHandlerError, match=message):
        inference(client, *requests)
    assert_still_serving(client)


def test_junk_metadata_and_tensors_are_refused(client):
    junk_metadata = runtime_pb2.ExpertRequest(metadata=b"\x00not json", tensors=[serialize_tensor(torch.randn(1, 1, HIDDEN))])
    with pytest.raises(P2PHandlerError, match="Invalid InferenceStep"):
        inference(client, junk_metadata)
    bad_buffer = runtime_pb2.ExpertRequest(
        metadata=messages.encode_metadata(messages.InferenceStep(open=spec(), position=0)),
        tensors=[runtime_pb2.Tensor(buffer=b"\x01" * 7, size=[1, 1, HIDDEN], dtype="float32")],
    )
    with pytest.raises(P2PHandlerError, match="buffer"):
        inference(client, bad_buffer)
    pickle_dtype = runtime_pb2.ExpertRequest(
        metadata=messages.encode_metadata(messages.InferenceStep(open=spec(), position=0)),
        tensors=[runtime_pb2.Tensor(buffer=b"cos\nsystem\n", size=[1], dtype="object")],
    )
    with pytest.raises(P2PHandlerError, match="Unsupported tensor dtype"):
        inference(client, pickle_dtype)
    assert_still_serving(client)


def test_bad_forward_requests_get_clear_errors(client):
    peer = server_of(client)
    request = messages.request(messages.ForwardRequest(start=2, end=1), torch.randn(1, 2, HIDDEN))
    with pytest.raises(P2PHandlerError, match="this server holds"):
        run_sync(call_forward(client, peer, request))
    too_many_tokens = messages.request(messages.ForwardRequest(start=0, end=6), torch.randn(4, 512, HIDDEN))
    with pytest.raises(P2PHandlerError, match="too large"):
        run_sync(call_forward(client, peer, too_many_tokens))
    huge = messages.request(messages.ForwardRequest(start=0, end=6), torch.randn(64, 512, HIDDEN))
    with pytest.raises(P2PHandlerError, match="exceeds the .* byte limit"):  # refused before it is read into memory
        run_sync(call_forward(client, peer, huge))
    assert_still_serving(client)


def test_a_push_that_arrives_before_its_session_opens_is_used(client):
    """The previous server of a chain can outrun the stream that opens the session here."""
    stub = client.stub(server_of(client))
    hidden = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
    push = runtime_pb2.ExpertRequest(
        metadata=messages.encode_metadata(messages.PushStep(session_id="early-push-session", position=0)),
        tensors=[serialize_tensor(hidden)],
    )
    run_sync(stub.rpc_push(push, timeout=30))
    expecting = messages.InferenceStep(open=spec(session_id="early-push-session"), position=0, expect_push=True)
    [pushed] = inference(client, messages.request(expecting))
    [direct] = inference(client, step(0, hidden, spec(session_id="direct-session")))
    assert torch.equal(deserialize_tensor(pushed.tensors[0]), deserialize_tensor(direct.tensors[0]))


def test_junk_pushes_are_refused(client):
    stub = client.stub(server_of(client))
    wrong_size = runtime_pb2.ExpertRequest(
        metadata=messages.encode_metadata(messages.PushStep(session_id="no-such-session", position=0)),
        tensors=[serialize_tensor(torch.randn(1, 1, HIDDEN + 3))],
    )
    with pytest.raises(P2PHandlerError, match="Hidden states must be"):
        run_sync(stub.rpc_push(wrong_size, timeout=30))
    with pytest.raises(P2PHandlerError, match="Invalid PushStep"):
        run_sync(stub.rpc_push(runtime_pb2.ExpertRequest(metadata=b"{}"), timeout=30))
    assert_still_serving(client)


def test_rollback_to_an_earlier_position_recomputes_identically(client):
    hidden = torch.randn(1, 6, HIDDEN, generator=torch.Generator().manual_seed(0))
    first, again = inference(
        client, step(0, hidden, spec(session_id="rollback-session")), step(2, hidden[:, 2:])
    )
    a = deserialize_tensor(first.tensors[0])
    b = deserialize_tensor(again.tensors[0])
    assert torch.allclose(a[:, 2:], b, atol=1e-5)


def assert_still_serving(client):
    hidden = torch.randn(1, 3, HIDDEN)
    [reply] = inference(client, step(0, hidden, spec(session_id="healthy-session")))
    assert messages.decode_metadata(reply.metadata, messages.StepResult).position == 3


def pushed_step(session_id: str, position: int, push_from=None) -> runtime_pb2.ExpertRequest:
    return messages.request(
        messages.InferenceStep(
            open=spec(session_id=session_id) if position == 0 else None,
            position=position,
            expect_push=True,
            push_from=push_from,
        )
    )


async def push(swarm, peer, session_id: str, position: int, hidden: torch.Tensor) -> None:
    request = messages.request(messages.PushStep(session_id=session_id, position=position), hidden)
    await swarm.stub(peer).rpc_push(request, timeout=30)


def output_of_pushed_step(client, session_id: str, pushes, push_from=None) -> torch.Tensor:
    """Open ``session_id`` with a step whose input is pushed, run ``pushes()`` once it waits, return its output."""

    peer = server_of(client)

    async def run():
        done = asyncio.Event()

        async def requests():
            yield pushed_step(session_id, 0, push_from)
            await asyncio.sleep(0.5)  # the session is open and waits for its input
            await pushes()
            await done.wait()

        try:
            async for reply in await client.stub(peer).rpc_inference(requests()):
                return deserialize_tensor(reply.tensors[0])
        finally:
            done.set()

    return run_sync(asyncio.wait_for(run(), 60))


def test_pushes_from_a_peer_the_owner_did_not_name_never_reach_the_session(client, stranger):
    """A stranger who learned a session id pushes forged inputs, before the session opens and while it waits;
    the session computes on its owner's input."""
    peer = server_of(client)
    genuine, forged = torch.randn(1, 3, HIDDEN), torch.randn(1, 3, HIDDEN)
    [expected] = inference(client, step(0, genuine, spec(session_id="reference-session")))
    run_sync(push(stranger, peer, "hijacked-session", 0, forged))  # before the session opens

    async def pushes():
        await push(stranger, peer, "hijacked-session", 0, forged)
        await push(client, peer, "hijacked-session", 0, genuine)

    got = output_of_pushed_step(client, "hijacked-session", pushes)
    assert torch.equal(got, deserialize_tensor(expected.tensors[0]))


def test_the_upstream_server_the_owner_names_may_push(client, stranger):
    peer = server_of(client)
    upstream_output = torch.randn(1, 3, HIDDEN)
    [expected] = inference(client, step(0, upstream_output, spec(session_id="reference-session-2")))

    async def pushes():
        await push(stranger, peer, "forwarded-session", 0, upstream_output)

    got = output_of_pushed_step(client, "forwarded-session", pushes, push_from=stranger.p2p.peer_id.to_base58())
    assert torch.equal(got, deserialize_tensor(expected.tensors[0]))


def test_one_peer_cannot_fill_the_server_with_sessions(client, stranger):
    """The server takes 4 sessions; one peer gets 3 of them, and the last slot stays for others."""
    peer = server_of(client)

    async def run():
        release = asyncio.Event()
        held = []

        async def hold(swarm, session_id: str):
            async def requests():
                yield step(0, torch.randn(1, 2, HIDDEN), spec(session_id=session_id))
                await release.wait()

            replies = await swarm.stub(peer).rpc_inference(requests())
            held.append(replies)
            await anext(replies)  # the session is open (or the server's refusal is raised)

        try:
            for i in range(3):
                await hold(client, f"flood-session-{i}")
            with pytest.raises(P2PHandlerError, match="the most one peer may"):
                await hold(client, "flood-session-3")
            await hold(stranger, "other-peer-session")
        finally:
            release.set()
            for replies in held:
                with contextlib.suppress(StopAsyncIteration, P2PHandlerError):
                    await anext(replies)

    run_sync(asyncio.wait_for(run(), 60))
    assert_still_serving(client)


def test_an_honest_client_keeps_generating_while_another_peer_floods_the_server(
    local, client, stranger, tiny_llama_path, tiny_llama_local
):
    """The stranger holds every session it may and dozens of streams that never say anything (slow loris);
    the honest client's generation is still identical to local transformers, with no failover."""
    from molink_swarm import AutoDistributedModelForCausalLM

    peer = server_of(client)
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_path, initial_peers=local.initial_peers)
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(11))
    expected = tiny_llama_local.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24)

    async def flood(release: asyncio.Event) -> list:
        streams = []

        async def silent():
            await release.wait()
            return
            yield

        for i in range(3):  # every session one peer may hold (3 of 4)
            async def requests(i=i):
                yield step(0, torch.randn(1, 2, HIDDEN), spec(session_id=f"flood-held-{i}", max_length=128))
                await release.wait()

            replies = await stranger.stub(peer).rpc_inference(requests())
            await anext(replies)
            streams.append(replies)
        for _ in range(40):  # streams opened and left silent
            streams.append(await stranger.stub(peer).rpc_inference(silent()))
        return streams

    release = asyncio.Event()
    streams = run_sync(flood(release))
    try:
        with model.inference_session(max_length=64) as session:
            got = model.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24)
            assert session.failovers == 0
    finally:
        run_sync(_set(release))
        model.shutdown()
    assert torch.equal(got, expected)
    del streams


async def _set(event: asyncio.Event) -> None:
    event.set()


def test_refusals_leave_one_short_line_each_in_the_server_log(local, client):
    """Run last in this module: every refusal above is in the log at most once a period, with no traceback."""
    lines = local.servers[0].lines
    assert any("Refused" in line for line in lines)
    assert not [line for line in lines if "Traceback" in line or "Handler failed" in line]
    # Over twenty refused calls above; at most one line per peer every 10 s (two peers, a module of ~30 s).
    assert len([line for line in lines if "Refused" in line]) <= 6


# ---- group steps (client/group_step.py): several sessions' decode steps in one message


class OpenSessions:
    """Sessions opened on their own inference streams (each with a prompt), kept open until the block ends; their
    streams take more steps with ``step``."""

    def __init__(self, swarm, peer, prompts: dict[str, torch.Tensor]):
        self.swarm, self.peer, self.prompts = swarm, peer, prompts
        self._queues: dict[str, asyncio.Queue] = {}
        self._replies: dict[str, object] = {}

    async def __aenter__(self) -> "OpenSessions":
        for session_id, hidden in self.prompts.items():
            queue = self._queues[session_id] = asyncio.Queue()
            queue.put_nowait(step(0, hidden, spec(session_id=session_id)))
            self._replies[session_id] = await self.swarm.stub(self.peer).rpc_inference(_queued(queue))
            await anext(self._replies[session_id])
        return self

    async def step(self, session_id: str, position: int, hidden: torch.Tensor) -> torch.Tensor:
        self._queues[session_id].put_nowait(step(position, hidden))
        return deserialize_tensor((await anext(self._replies[session_id])).tensors[0])

    async def __aexit__(self, *exc) -> None:
        for queue in self._queues.values():
            queue.put_nowait(None)


async def _queued(queue: asyncio.Queue):
    while (item := await queue.get()) is not None:
        yield item


def group_step(members: list[tuple[str, int]], hidden: torch.Tensor | None = None, **fields) -> runtime_pb2.ExpertRequest:
    """A GroupStep request, built without the sender's checks (so that the server's are the ones tested)."""
    members_ = [messages.GroupMember(session_id=s, position=p) for s, p in members]
    message = messages.GroupStep.model_construct(**{"expect_push": False, "push_from": None, "push_to": None, **fields, "members": members_})
    return messages.request(message, *([] if hidden is None else [hidden]))


async def group_steps(swarm, peer, *requests: runtime_pb2.ExpertRequest) -> list[runtime_pb2.ExpertResponse]:
    queue: asyncio.Queue = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    replies = await swarm.stub(peer).rpc_group_step(_queued(queue))
    try:
        return [await anext(replies) for _ in requests]
    finally:
        queue.put_nowait(None)


def test_a_group_step_computes_what_each_sessions_own_step_does(client):
    peer = server_of(client)
    gen = torch.Generator().manual_seed(5)
    prompts = {f"grouped-{i}-session": torch.randn(1, 3 + i, HIDDEN, generator=gen) for i in range(3)}
    steps = torch.randn(3, 1, HIDDEN, generator=gen)

    async def run():
        async with OpenSessions(client, peer, prompts) as alone:  # each on its own stream
            expected = [await alone.step(s, 3 + i, steps[i : i + 1]) for i, s in enumerate(prompts)]
        grouped = {f"together-{i}-session": hidden for i, hidden in enumerate(prompts.values())}
        async with OpenSessions(client, peer, grouped):
            [reply] = await group_steps(client, peer, group_step([(s, 3 + i) for i, s in enumerate(grouped)], steps))
        return expected, reply

    expected, reply = run_sync(asyncio.wait_for(run(), 60))
    results = messages.decode_metadata(reply.metadata, messages.GroupResult).results
    assert [r.position for r in results] == [4, 5, 6]
    assert torch.allclose(deserialize_tensor(reply.tensors[0]), torch.cat(expected), atol=1e-5)


BAD_GROUP_STEPS = {
    "a session twice": (lambda ids: group_step([(ids[0], 3), (ids[0], 3)], torch.randn(2, 1, HIDDEN)), "appears twice"),
    "a session not open": (lambda ids: group_step([(ids[0], 3), ("nobody-s-session", 0)], torch.randn(2, 1, HIDDEN)), "not open here"),
    "rows and members differ": (lambda ids: group_step([(ids[0], 3), (ids[1], 3)], torch.randn(3, 1, HIDDEN)), "Batch size 3"),
    "a prompt, not a decode step": (lambda ids: group_step([(ids[0], 3), (ids[1], 3)], torch.randn(2, 9, HIDDEN)), "decode steps"),
    "a step past the cache": (lambda ids: group_step([(ids[0], 3), (ids[1], 7)], torch.randn(2, 1, HIDDEN)), "holds 3 tokens"),
    "next sessions missing": (
        lambda ids: group_step(
            [(ids[0], 3), (ids[1], 3)],
            torch.randn(2, 1, HIDDEN),
            push_to=messages.GroupPushTarget(peer_id="QmU85KjhsTd6KwtGYDJAMVzQEPH5ukNzUibaQvvcRRvHM4", session_ids=["next-session-1"]),
        ),
        "one next session per member",
    ),
    "junk metadata": (lambda ids: runtime_pb2.ExpertRequest(metadata=b'{"members": []}'), "Invalid GroupStep"),
}


@pytest.mark.parametrize("case", sorted(BAD_GROUP_STEPS))
def test_bad_group_steps_get_clear_errors_and_the_sessions_go_on(client, case):
    peer = server_of(client)
    make, message = BAD_GROUP_STEPS[case]
    ids = ["bad-group-a-session", "bad-group-b-session"]
    prompts = {session_id: torch.randn(1, 3, HIDDEN) for session_id in ids}

    async def run():
        async with OpenSessions(client, peer, prompts) as sessions:
            with pytest.raises(P2PHandlerError, match=message):
                await group_steps(client, peer, make(ids))
            return await sessions.step(ids[0], 3, torch.randn(1, 1, HIDDEN))  # its own stream still serves it

    assert run_sync(asyncio.wait_for(run(), 60)).shape == (1, 1, HIDDEN)
    assert_still_serving(client)


def test_no_peer_can_step_anothers_sessions_in_a_group(client, stranger):
    peer = server_of(client)

    async def run():
        async with OpenSessions(client, peer, {"owned-group-session": torch.randn(1, 3, HIDDEN)}):
            with pytest.raises(P2PHandlerError, match="not open here for your peer"):
                await group_steps(stranger, peer, group_step([("owned-group-session", 3)], torch.randn(1, 1, HIDDEN)))

    run_sync(asyncio.wait_for(run(), 60))


def test_a_group_step_given_up_frees_its_sessions_at_once(client):
    """A group step waits for a push that never comes (the previous server died); the client closes the stream
    and steps the session on its own stream: the server lets it, without waiting for the push's timeout."""
    peer = server_of(client)

    async def run():
        async with OpenSessions(client, peer, {"given-up-session": torch.randn(1, 3, HIDDEN)}) as sessions:
            queue: asyncio.Queue = asyncio.Queue()
            queue.put_nowait(group_step([("given-up-session", 3)], expect_push=True))
            replies = await client.stub(peer).rpc_group_step(_queued(queue))
            waiting = asyncio.ensure_future(anext(replies, None))
            await asyncio.sleep(0.5)  # the step waits for its input
            queue.put_nowait(None)  # given up
            # Were the group step still waiting (30 s, for its push), this step would be refused after 5 s.
            output = await sessions.step("given-up-session", 3, torch.randn(1, 1, HIDDEN))
            waiting.cancel()
            return output

    assert run_sync(asyncio.wait_for(run(), 60)).shape == (1, 1, HIDDEN)


def test_the_input_a_given_up_group_step_waited_for_goes_to_the_step_sent_instead(client):
    """The client gives a group step up while it waits for its pushed input and sends the same step on the
    session's own stream, expecting the push too: the push, when it comes, is used there."""
    peer = server_of(client)
    hidden = torch.randn(1, 1, HIDDEN, generator=torch.Generator().manual_seed(8))
    prompt = torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(9))

    async def run():
        async with OpenSessions(client, peer, {"reference-push-session": prompt}) as reference:
            expected = await reference.step("reference-push-session", 3, hidden)
        async with OpenSessions(client, peer, {"regrouped-session": prompt}) as sessions:
            queue: asyncio.Queue = asyncio.Queue()
            queue.put_nowait(group_step([("regrouped-session", 3)], expect_push=True))
            await client.stub(peer).rpc_group_step(_queued(queue))
            await asyncio.sleep(0.5)  # the group step waits for its input
            queue.put_nowait(None)  # given up
            sessions._queues["regrouped-session"].put_nowait(messages.request(messages.InferenceStep(position=3, expect_push=True)))
            await asyncio.sleep(0.2)
            await push(client, peer, "regrouped-session", 3, hidden)
            return deserialize_tensor((await anext(sessions._replies["regrouped-session"])).tensors[0]), expected

    got, expected = run_sync(asyncio.wait_for(run(), 60))
    assert torch.equal(got, expected)

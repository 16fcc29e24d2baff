"""What a peer accepts off the wire: tensors are checked before decoding, metadata is parsed strictly."""

from __future__ import annotations

import json

import pytest
import torch
from hivemind.proto import runtime_pb2
from pydantic import ValidationError

from molink_swarm.protocol import messages
from molink_swarm.protocol.messages import InferenceStep, ProtocolError, SessionSpec, decode_metadata, encode_metadata
from molink_swarm.protocol.tensors import deserialize_tensor, serialize_tensor


def proto(size, dtype="float32", buffer=None, **fields) -> runtime_pb2.Tensor:
    """A hand-made tensor message; by default its buffer is exactly as long as a float32 tensor of ``size``."""
    if buffer is None:
        numel = 1
        for dim in size:
            numel *= dim
        buffer = b"\0" * (4 * numel)
    return runtime_pb2.Tensor(buffer=buffer, size=size, dtype=dtype, **fields)


# --- tensors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_activations_round_trip_exactly(dtype):
    tensor = torch.randn(2, 3, 8).to(dtype)

    received = deserialize_tensor(serialize_tensor(tensor))

    assert received.dtype == dtype
    assert torch.equal(received, tensor)


def test_bfloat16_activations_round_trip_exactly():
    tensor = torch.randn(2, 3, 8).to(torch.bfloat16)

    received = deserialize_tensor(serialize_tensor(tensor))

    assert received.dtype == torch.bfloat16
    assert torch.equal(received, tensor)


def test_float16_compression_sends_half_precision_and_restores_the_dtype():
    tensor = torch.randn(4, 8)

    message = serialize_tensor(tensor, "float16")
    received = deserialize_tensor(message)

    assert len(message.buffer) == 2 * tensor.numel()
    assert received.dtype == torch.float32
    assert torch.equal(received, tensor.half().float())


# Wire dtypes (--wire-dtype): bytes of a [2, 3, 64] float32 tensor on the wire. int8: per row of 64, a bfloat16
# scale and 4 outliers (uint16 index, float32 value).
WIRE_SIZES = {"float32": 4 * 384, "float16": 2 * 384, "bfloat16": 2 * 384, "int8": 384 + 6 * (2 + 4 * 6)}


def hidden_states(seed: int = 0) -> torch.Tensor:
    """Like a residual stream: mostly unit-sized values, a few outliers, rows of very different scales."""
    gen = torch.Generator().manual_seed(seed)
    tensor = torch.randn(2, 3, 64, generator=gen) * torch.logspace(-3, 3, 6).reshape(2, 3, 1)
    tensor[0, 0, 5] = 40.0
    return tensor


@pytest.mark.parametrize("wire", sorted(WIRE_SIZES))
def test_each_wire_dtype_has_its_exact_size(wire):
    message = serialize_tensor(hidden_states(), wire)

    assert len(message.buffer) == WIRE_SIZES[wire]
    assert deserialize_tensor(message).shape == (2, 3, 64)


def test_float32_and_auto_round_trip_a_float32_tensor_exactly():
    tensor = hidden_states()

    for wire in ("float32", "auto"):
        assert torch.equal(deserialize_tensor(serialize_tensor(tensor, wire)), tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_auto_sends_the_compute_dtype_as_is(dtype):
    tensor = torch.randn(2, 3, 8).to(dtype)

    message = serialize_tensor(tensor, "auto")

    assert len(message.buffer) == tensor.numel() * tensor.element_size()  # bfloat16 too: 2 bytes, not hivemind's 4
    assert torch.equal(deserialize_tensor(message, dtype=dtype), tensor)


@pytest.mark.parametrize("wire,dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_16_bit_wire_dtypes_round_like_a_cast(wire, dtype):
    tensor = hidden_states()

    received = deserialize_tensor(serialize_tensor(tensor, wire), dtype=torch.float32)

    assert torch.equal(received, tensor.to(dtype).float())  # error: half a unit in the last place, 2^-11 or 2^-8


def test_float16_wire_clamps_an_overflow_instead_of_sending_inf():
    received = deserialize_tensor(serialize_tensor(torch.tensor([[1e6, -1e6, 1.0]]), "float16"))

    assert received.tolist() == [[65504.0, -65504.0, 1.0]]


def test_int8_sends_each_rows_4_largest_values_exactly_and_the_rest_within_half_a_step():
    tensor = hidden_states()

    received = deserialize_tensor(serialize_tensor(tensor, "int8"))

    largest = tensor.abs().topk(5, dim=-1)
    outliers = largest.indices[..., :4]
    assert torch.equal(received.gather(-1, outliers), tensor.gather(-1, outliers))
    # A step is absmax(rest) / 127 (the rest: all but the 4 largest), with a bfloat16 scale rounded to the nearest
    # (relative error <= 2^-8).
    rest_absmax = largest.values[..., 4:]
    assert ((received - tensor).abs() <= rest_absmax / 254 * (1 + 2**-8)).all()
    assert (received - tensor).abs().max() > 0  # it is lossy: the bound is what is tested


def test_int8_rows_narrower_than_4_values_travel_exactly():
    tensor = torch.randn(3, 2)

    assert torch.equal(deserialize_tensor(serialize_tensor(tensor, "int8")), tensor)


def test_an_int8_outlier_index_beyond_the_row_is_refused():
    message = serialize_tensor(hidden_states(), "int8")
    indices_at = 384 + 2 * 6  # after the int8 values and the scales
    message.buffer = message.buffer[:indices_at] + (64).to_bytes(2, "little") + message.buffer[indices_at + 2 :]

    with pytest.raises(ProtocolError, match="outlier"):
        deserialize_tensor(message)


def test_int8_re_encodes_a_decoded_tensor_to_the_same_bytes():
    """What makes a replay (or a copy the client passes on) carry what the first hop carried."""
    message = serialize_tensor(hidden_states(), "int8")

    again = serialize_tensor(deserialize_tensor(message), "int8")

    assert again.buffer == message.buffer


def test_int8_keeps_zero_rows_zero_and_non_finite_rows_non_finite():
    tensor = torch.randn(3, 8)
    tensor[1] = 0.0
    tensor[2, 3] = float("inf")
    tensor[0, :5] = float("nan")  # more than the 4 outliers

    received = deserialize_tensor(serialize_tensor(tensor, "int8"))

    assert torch.equal(received[1], torch.zeros(8))
    # The receiving server refuses these, as it would refuse them in float32.
    assert received[0].isnan().all() and received[2, 3] == float("inf")


@pytest.mark.parametrize("wire", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("receiver", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_the_receiver_gets_its_own_compute_dtype(wire, receiver):
    tensor = hidden_states()

    received = deserialize_tensor(serialize_tensor(tensor, wire), dtype=receiver)

    assert received.dtype == receiver
    assert ((received.float() - tensor).abs() <= tensor.abs().amax(dim=-1, keepdim=True) / 100).all()


def test_an_unknown_wire_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="int4"):
        serialize_tensor(torch.zeros(2, 2), "int4")


@pytest.mark.parametrize("wire", sorted(WIRE_SIZES))
@pytest.mark.parametrize("change", [-2, -1, 1, 2])
def test_a_buffer_a_few_bytes_off_is_refused_for_every_wire_dtype(wire, change):
    message = serialize_tensor(hidden_states(), wire)
    message.buffer = message.buffer[:change] if change < 0 else message.buffer + b"\0" * change

    with pytest.raises(ProtocolError, match="buffer holds"):
        deserialize_tensor(message)


@pytest.mark.parametrize(
    "case,buffer_bytes",
    [
        ("int8 without scales or outliers", 384),
        ("int8 without outliers", 384 + 2 * 6),
        ("int8 with float32 scales", 384 + 6 * (4 + 4 * 6)),
        ("int8 with one scale per tensor", 384 + 2 + 6 * 4 * 6),
        ("bfloat16 as hivemind's legacy float32", 4 * 384),
        ("float16 as float32", 4 * 384),
    ],
)
def test_a_buffer_laid_out_for_another_codec_is_refused(case, buffer_bytes):
    dtype = case.split()[0]

    with pytest.raises(ProtocolError, match="buffer holds"):
        deserialize_tensor(proto([2, 3, 64], dtype=dtype, buffer=b"\0" * buffer_bytes))


def test_int8_rows_wider_than_a_uint16_index_are_refused():
    with pytest.raises(ProtocolError, match="at most 65536"):
        deserialize_tensor(proto([1, 2**16 + 1], dtype="int8", buffer=b"\0" * (2**16 + 1 + 2 + 24)))


@pytest.mark.parametrize("dtype", ["int8", "float16", "bfloat16"])
def test_16_bit_compression_of_anything_but_float32_is_refused(dtype):
    message = proto([2, 8], dtype=dtype, buffer=b"\0" * 32, compression=runtime_pb2.CompressionType.FLOAT16)

    with pytest.raises(ProtocolError, match="16-bit compression applies to float32"):
        deserialize_tensor(message)


@pytest.mark.parametrize("dtype", ["int64", "object", "float64", ""])
def test_an_unsupported_dtype_is_refused(dtype):
    with pytest.raises(ProtocolError, match="dtype"):
        deserialize_tensor(proto([2, 2], dtype=dtype, buffer=b"\0" * 32))


def test_an_unknown_compression_is_refused():
    message = proto([2, 2], compression=runtime_pb2.CompressionType.MEANSTD_16BIT)

    with pytest.raises(ProtocolError, match="compression"):
        deserialize_tensor(message)


@pytest.mark.parametrize("length", [0, 20, 25, 28])
def test_a_buffer_that_does_not_match_the_shape_is_refused(length):
    with pytest.raises(ProtocolError, match="buffer holds"):
        deserialize_tensor(proto([2, 3], buffer=b"\0" * length))


@pytest.mark.parametrize("size", [[], [1, 1, 1, 1, 1]])
def test_rank_0_and_rank_5_are_refused(size):
    with pytest.raises(ProtocolError, match="rank"):
        deserialize_tensor(proto(size, buffer=b"\0" * 4))


def test_ranks_1_to_4_are_accepted():
    for size in ([3], [3, 2], [3, 2, 1], [3, 2, 1, 2]):
        assert list(deserialize_tensor(proto(size)).shape) == size


def test_requires_grad_is_refused():
    with pytest.raises(ProtocolError, match="requires_grad"):
        deserialize_tensor(proto([2, 2], requires_grad=True))


def test_a_tensor_over_max_bytes_is_refused():
    message = serialize_tensor(torch.zeros(4, 4))  # 64 bytes

    assert deserialize_tensor(message, max_bytes=64).shape == (4, 4)
    with pytest.raises(ProtocolError, match="limit"):
        deserialize_tensor(message, max_bytes=63)


def test_a_huge_declared_shape_is_refused_before_looking_at_the_buffer():
    with pytest.raises(ProtocolError, match="limit"):
        deserialize_tensor(proto([2**20, 2**20, 2**20], buffer=b""))


# --- metadata ------------------------------------------------------------------------------------------------

SPEC = {"session_id": "session-0001", "start": 0, "end": 4, "max_length": 128}


def json_bytes(fields: dict) -> bytes:
    return json.dumps(fields).encode()


def test_metadata_round_trips():
    spec = SessionSpec(**SPEC)

    assert decode_metadata(encode_metadata(spec), SessionSpec) == spec


def test_junk_bytes_are_a_protocol_error():
    with pytest.raises(ProtocolError) as error:
        decode_metadata(b"\xff\xfe\x00not json", SessionSpec)
    assert str(error.value).startswith("Invalid SessionSpec: ")
    assert "\n" not in str(error.value)


def test_a_field_of_the_wrong_type_is_named():
    with pytest.raises(ProtocolError) as error:
        decode_metadata(json_bytes({**SPEC, "start": "zero"}), SessionSpec)
    assert str(error.value).startswith("Invalid SessionSpec: start: ")
    assert "\n" not in str(error.value)


def test_a_missing_field_is_named():
    fields = dict(SPEC)
    del fields["max_length"]

    with pytest.raises(ProtocolError, match=r"^Invalid SessionSpec: max_length: "):
        decode_metadata(json_bytes(fields), SessionSpec)


def test_an_extra_field_is_named():
    with pytest.raises(ProtocolError) as error:
        decode_metadata(json_bytes({**SPEC, "debug_dump_path": "/tmp/x"}), SessionSpec)
    assert str(error.value).startswith("Invalid SessionSpec: debug_dump_path: ")
    assert "\n" not in str(error.value)


def test_a_bad_field_inside_a_nested_message_is_named_with_its_path():
    step = {"position": 0, "open": {**SPEC, "end": 0}}

    with pytest.raises(ProtocolError, match=r"^Invalid InferenceStep: open\.end: "):
        decode_metadata(json_bytes(step), InferenceStep)


@pytest.mark.parametrize(
    "session_id", ["../../etc/passwd", "has space in it", "semi;colon-id", "ünïcode-id", "short", "x" * 65]
)
def test_a_session_id_with_odd_characters_is_rejected(session_id):
    with pytest.raises(ValidationError):
        SessionSpec(**{**SPEC, "session_id": session_id})


def test_a_plain_session_id_is_accepted():
    assert SessionSpec(**{**SPEC, "session_id": "Abc_123-xyz"}).session_id == "Abc_123-xyz"



def test_only_a_trusted_relay_may_say_whom_it_relays_for():
    from hivemind.p2p import PeerID

    relay = PeerID.from_base58("QmQGqBmKTewr82mRxoiWoKQUXSnBLdeK543cMGnzE3L4zz")
    stranger = PeerID.from_base58("QmW24XWpVCqc3QoBuBPdfa7hwNieDqT3aMRZSEWv4RVqT2")
    claim = messages.RELAYED_FROM + "QmarQV8Bs4YqZS4djHqtCT1wSYzV5YXHFqwimyzHpUbnba"
    assert messages.origin(claim, relay, {relay}) == "QmarQV8Bs4YqZS4djHqtCT1wSYzV5YXHFqwimyzHpUbnba"
    assert messages.origin(claim, stranger, {relay}) == stranger.to_base58()  # anyone else: the peer itself
    assert messages.origin("", relay, {relay}) == relay.to_base58()

"""``AutoDistributedModelForCausalLM``: a Hugging Face causal LM whose transformer blocks run in the swarm.

The client model is the family's own ``*ForCausalLM`` class built with zero layers, so it holds only the
embeddings, final norm and LM head, and ``generate()`` (greedy, sampling, streamers, ...) is transformers'
own. Its forward sends hidden states through the chain of servers. Inside ``inference_session()`` the
servers keep the attention caches across ``generate()`` calls, so a chat continues where it left off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, Iterator, Optional, Sequence

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig, PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from molink_swarm.client.loop import run_sync
from molink_swarm.client.session import InferenceSession, SwarmError, forward_through_chain
from molink_swarm.client.spot_check import spot_check_rate
from molink_swarm.client.swarm import SwarmClient
from molink_swarm.models import ModelSource, fetch_tensors, load_config, read_tensors, resolve_model, tensor_names
from molink_swarm.models.families import Family, UnsupportedModelError, family_for
from molink_swarm.models.family import FamilyAdapter, adapter_for
from molink_swarm.protocol.tensors import WIRE_DTYPES, WireDtype
from molink_swarm.swarm_key import SwarmKey, load_swarm_key

logger = logging.getLogger(__name__)


class _RemoteLayer(CacheLayerMixin):
    """One block's cache, held by a server: generate() only asks how many positions it holds."""

    is_sliding = False
    supports_early_init = False  # nothing to allocate here

    def __init__(self, session: InferenceSession):
        super().__init__()
        self.session = session

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise SwarmError("The servers hold this cache; blocks never run on the client")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise SwarmError("The servers hold this cache; blocks never run on the client")

    def get_seq_length(self) -> int:
        return self.session.position

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.session.position + query_length, 0

    def get_max_length(self) -> int:
        return self.session.max_length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise SwarmError("A distributed session cannot roll its cache back (assisted decoding is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise SwarmError("Beam search is not supported by distributed sessions; use greedy decoding or sampling")

    batch_repeat_interleave = batch_select_indices = reorder_cache


class RemoteCache(Cache):
    """Stands for the caches held by the servers, one attention layer per block: generate() reads the session's
    length from it (and so feeds only the tokens the servers have not seen)."""

    def __init__(self, session: InferenceSession, num_blocks: int):
        super().__init__(layers=[_RemoteLayer(session) for _ in range(num_blocks)])
        self.session = session


class DistributedCausalLMMixin:
    """Mixed into a family's ``*ForCausalLM`` class (built with no layers).

    The active inference session is per thread: several threads can generate with one model at once (the web
    app does), each in its own session.
    """

    swarm: SwarmClient
    source: ModelSource

    def _setup_swarm(self, swarm: SwarmClient, source: ModelSource, full_config: PretrainedConfig, wait_s: float):
        self.swarm, self.source, self.full_config = swarm, source, full_config
        self.num_blocks = full_config.num_hidden_layers
        self.wait_for_blocks_s = wait_s
        self._thread_state = threading.local()

    @property
    def family(self) -> Family:
        """What this model's family runs around the blocks (families.py)."""
        return family_for(self.config)

    @property
    def _active_session(self) -> Optional[InferenceSession]:
        return getattr(self._thread_state, "session", None)

    @_active_session.setter
    def _active_session(self, session: Optional[InferenceSession]) -> None:
        self._thread_state.session = session

    @contextlib.contextmanager
    def inference_session(self, max_length: int = 2048, **kwargs) -> Iterator[InferenceSession]:
        """Within this block, generate() calls continue one conversation and the cache stays on the servers."""
        if self._active_session is not None:
            raise SwarmError("An inference session is already active on this model")
        session = self._open_session(max_length, **kwargs)
        self._active_session = session
        try:
            yield session
        finally:
            self._active_session = None
            session.close()

    def _open_session(self, max_length: int, **kwargs) -> InferenceSession:
        return InferenceSession(
            self.swarm, max_length=max_length, model_name=self.source.name, wait_for_blocks_s=self.wait_for_blocks_s, **kwargs
        )

    def generate(self, inputs: Optional[torch.Tensor] = None, *args, **kwargs):
        session = self._active_session
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise SwarmError("Padded batches (attention_mask with zeros) are not supported yet; generate each prompt alone")
        if session is None:
            # A one-off session sized for this call.
            max_new = kwargs.get("max_new_tokens") or self.generation_config.max_new_tokens or 20
            length = (inputs.shape[1] if inputs is not None else 1) + max_new
            with self.inference_session(max_length=length):
                return self.generate(inputs, *args, **kwargs)
        if session.history is not None and inputs is not None:
            if inputs.shape[0] != session.history.shape[0]:
                raise SwarmError("The batch size of a session cannot change between generate() calls")
            inputs = torch.cat([session.history, inputs.to(session.history.device)], dim=1)
        if inputs is not None:
            # Unpadded (checked above): saying so spares transformers a guess and its warning about the guess.
            kwargs["attention_mask"] = torch.ones_like(inputs)
        kwargs["cache"] = RemoteCache(session, self.num_blocks)
        kwargs.setdefault("use_cache", True)
        output = super().generate(inputs, *args, **kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        session.history = sequences
        return output

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Any = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        session = cache.session if isinstance(cache, RemoteCache) else self._active_session
        if session is not None and cache is not None and position_ids is not None:
            if int(position_ids.reshape(-1)[0]) != session.position:
                raise SwarmError(
                    f"generate() asked for position {int(position_ids.reshape(-1)[0])}, "
                    f"the session holds {session.position} tokens"
                )
        hidden = self.embed_inputs(input_ids, 0 if session is None else session.position, inputs_embeds=inputs_embeds)
        if session is not None:
            hidden = session.step(hidden)
        else:
            hidden = run_sync(forward_through_chain(self.swarm, hidden, self.source.name, self.wait_for_blocks_s))
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.head_logits(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def embed_inputs(
        self, input_ids: Optional[torch.Tensor], position: int = 0, *, inputs_embeds: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """What the first block takes for these tokens (or token embeddings), the first at ``position`` (the number of
        tokens the servers already hold): the family's embeddings, scales and learned positions (families.py)."""
        return self.family.embed_inputs(self, input_ids, position, inputs_embeds=inputs_embeds)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for the last block's output, as the family's own forward() computes them: the final norm, the LM
        head, then the family's last touches (Gemma's soft cap, Cohere's and Granite's scales; none of them changes
        the greedy token, all of them change probabilities)."""
        return self.family.logits(self, hidden)

    def shutdown(self) -> None:
        """Stop the client's DHT peer (also happens at interpreter exit)."""
        self.swarm.shutdown()


_CLASSES: dict[type, type] = {}


def _distributed_class(causal_lm_class: type) -> type:
    if causal_lm_class not in _CLASSES:
        _CLASSES[causal_lm_class] = type(
            f"Distributed{causal_lm_class.__name__}", (DistributedCausalLMMixin, causal_lm_class), {}
        )
    return _CLASSES[causal_lm_class]


class AutoDistributedModelForCausalLM:
    """Entry point, like transformers' ``AutoModelForCausalLM``: picks the right class for the model family."""

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        initial_peers: Sequence[str],
        *,
        dtype: Optional[torch.dtype | str] = None,
        torch_dtype: Optional[torch.dtype | str] = None,
        wait_for_blocks_s: float = 30.0,
        hole_punching: bool = True,
        wire_dtype: WireDtype = "auto",
        swarm_key: Optional[str | os.PathLike | SwarmKey] = None,
        spot_check: bool | float = False,
        **kwargs,
    ):
        """``dtype`` (default float32; ``torch_dtype`` is its old name) is the precision of this client's layers,
        and only servers announcing the same one are chained, so the output equals a local run in that dtype.
        ``hole_punching=False`` keeps servers behind NATs on their relays (no direct connection attempts).
        ``wire_dtype`` is how this client sends hidden states to servers: ``auto`` (its dtype, exact), ``float16``,
        ``bfloat16`` or ``int8`` (per-row absmax, about a quarter of float32's bytes); servers choose theirs with
        ``join --wire-dtype``, and every peer decodes whatever arrives. ``swarm_key`` (the path of a key file, as
        ``--swarm-key``) joins a private swarm. ``spot_check`` re-runs a fraction of the steps (``True``: 5%, plus
        the first step on each server) on a second server holding the same blocks, and bans a server whose outputs
        are wrong (client/spot_check.py)."""
        key = load_swarm_key(swarm_key)  # a bad key file fails before anything loads
        try:
            spot_check_fraction = spot_check_rate(spot_check)
        except ValueError as e:
            raise SwarmError(str(e)) from None
        if not initial_peers:
            raise SwarmError("Pass initial_peers=[...]: the multiaddrs printed by `molink-swarm dht`")
        if wire_dtype not in WIRE_DTYPES:
            raise SwarmError(f"wire_dtype={wire_dtype!r} is not supported; pass one of {', '.join(WIRE_DTYPES)}")
        dtype = _client_dtype(dtype if dtype is not None else torch_dtype)
        source = resolve_model(model, progress=True)  # bars (stderr) while a hub download or GGUF conversion runs
        config = load_config(source)
        adapter = adapter_for(config)  # fails early, in one line, for families we cannot serve
        client_model = load_client_model(source, adapter, dtype, progress=True, **kwargs)
        swarm = SwarmClient(
            initial_peers,
            source.model_id,
            source.fingerprint,
            adapter.num_blocks,
            torch_dtype=_DTYPE_NAMES[dtype],
            wire_dtype=wire_dtype,
            hole_punching=hole_punching,
            swarm_key=key,
            spot_check=spot_check_fraction,
        )
        client_model._setup_swarm(swarm, source, config, wait_for_blocks_s)
        return client_model.eval()


def load_client_model(
    source: ModelSource, adapter: FamilyAdapter, dtype: torch.dtype, *, progress: bool = False, **kwargs
) -> DistributedCausalLMMixin:
    """The family's ``*ForCausalLM`` without layers, with this checkpoint's embeddings, final norm and LM head (its
    swarm is set up by the caller)."""
    try:
        causal_lm_class = AutoModelForCausalLM._model_mapping[type(adapter.config)]
    except KeyError:
        raise UnsupportedModelError(f"{adapter.config.model_type!r} is not a causal LM family transformers knows") from None
    state_dict = _client_tensors(source, adapter, progress=progress)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "weights not used": e.g. buffers older checkpoints saved
    try:
        # Loaded by the family's own class: transformers applies its checkpoint conversions (GPT-NeoX's embed_out is
        # its lm_head) to its own classes only, not to subclasses defined elsewhere.
        model = causal_lm_class.from_pretrained(
            None, config=adapter.client_config(), state_dict=state_dict, dtype=dtype, **kwargs
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    model.__class__ = _distributed_class(causal_lm_class)
    if (source.path / GENERATION_CONFIG).is_file():
        model.generation_config = GenerationConfig.from_pretrained(source.path)
    return model


GENERATION_CONFIG = "generation_config.json"


def _client_tensors(source: ModelSource, adapter: FamilyAdapter, *, progress: bool = False) -> dict[str, torch.Tensor]:
    """What the client holds (embeddings, final norm, LM head: every tensor outside the layer list), fetched from
    the hub if needed and memory-mapped; the blocks' shards are never read nor downloaded (nor extra layers' such
    as multi-token prediction heads, which the client has no use for)."""
    wanted = [name for name in tensor_names(source) if not adapter.is_layer_tensor(name)]
    fetch_tensors(source, wanted, progress=progress)
    return read_tensors(source, wanted)


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}  # as servers announce


def _client_dtype(dtype: Optional[torch.dtype | str]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        dtype = next((d for d, name in _DTYPE_NAMES.items() if name == dtype.removeprefix("torch.")), dtype)
    if dtype not in _DTYPE_NAMES:
        raise SwarmError(f"dtype={dtype!r} is not supported; pass torch.float32, torch.float16 or torch.bfloat16")
    return dtype

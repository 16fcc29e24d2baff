"""Multi-turn chat over the swarm: the servers keep the conversation's cache between turns."""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from molink_swarm.client.session import InferenceSession

logger = logging.getLogger(__name__)


class ChatSession:
    """Turns a list of chat messages into generate() calls that send only what the servers have not seen.

    Each turn the whole conversation is rendered with the model's chat template; if what the servers hold is a
    prefix of it, only the new tokens are sent. Otherwise (an edited history, a template that re-tokenizes
    differently) the session restarts from scratch, which is slower but never wrong.
    """

    def __init__(self, model, tokenizer, *, max_length: int = 2048):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self._context = None
        self._session: Optional[InferenceSession] = None

    def _open(self) -> InferenceSession:
        self.close()
        self._context = self.model.inference_session(max_length=self.max_length)
        self._session = self._context.__enter__()
        return self._session

    def close(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
        self._context = self._session = None

    def reply(self, messages: Sequence[dict[str, Any]], *, max_new_tokens: int = 256, streamer=None, **sampling) -> str:
        ids = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, return_tensors="pt", return_dict=False
        )
        if ids.shape[1] + max_new_tokens > self.max_length:
            raise ValueError(f"The conversation is too long ({ids.shape[1]} tokens); start a new chat")
        session = self._session
        if session is None or session.history is None or not _is_prefix(session.history, ids):
            session = self._open()
            new_ids = ids
        else:
            new_ids = ids[:, session.history.shape[1] :]
            if new_ids.shape[1] == 0:
                session = self._open()
                new_ids = ids
        do_sample = sampling.pop("temperature", 0.0) or 0.0
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, streamer=streamer)
        if do_sample > 0:
            kwargs.update(do_sample=True, temperature=do_sample, top_p=sampling.pop("top_p", 1.0))
        else:
            kwargs.update(do_sample=False)
        output = self.model.generate(
            new_ids,
            attention_mask=torch.ones_like(new_ids),
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            **kwargs,
        )
        return self.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


def _is_prefix(prefix: torch.Tensor, full: torch.Tensor) -> bool:
    return prefix.shape[1] <= full.shape[1] and torch.equal(prefix, full[:, : prefix.shape[1]])


def load_chat_model(model: str, initial_peers: Sequence[str], wire_dtype: str = "auto", swarm_key=None, spot_check: float = 0.0):
    """The distributed model and its tokenizer."""
    from transformers import AutoTokenizer

    from molink_swarm.client.model import AutoDistributedModelForCausalLM

    distributed = AutoDistributedModelForCausalLM.from_pretrained(
        model, initial_peers=initial_peers, wire_dtype=wire_dtype, swarm_key=swarm_key, spot_check=spot_check
    )
    tokenizer = AutoTokenizer.from_pretrained(distributed.source.path)
    return distributed, tokenizer


def run_terminal_chat(
    model: str, initial_peers: Sequence[str], *, max_new_tokens: int = 256, temperature: float = 0.0, wire_dtype: str = "auto",
    swarm_key=None, spot_check: float = 0.0,
) -> None:
    from rich.console import Console
    from transformers import TextStreamer

    console = Console()
    with console.status(f"Connecting to the swarm and loading {model}…"):
        distributed, tokenizer = load_chat_model(model, initial_peers, wire_dtype, swarm_key, spot_check)
    chat = ChatSession(distributed, tokenizer)
    messages: list[dict[str, str]] = []
    console.print("Chat with the swarm. Empty line or Ctrl-D to quit, /new for a new conversation.")
    try:
        while True:
            try:
                text = console.input("[bold green]You:[/] ").strip()
            except EOFError:
                break
            if not text:
                break
            if text == "/new":
                messages.clear()
                chat.close()
                continue
            messages.append({"role": "user", "content": text})
            console.print("[bold blue]Swarm:[/] ", end="")
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            answer = chat.reply(messages, max_new_tokens=max_new_tokens, streamer=streamer, temperature=temperature)
            messages.append({"role": "assistant", "content": answer})
    finally:
        chat.close()
        distributed.shutdown()

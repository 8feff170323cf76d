"""Checks of a session's opened requests (GenerateBody, EmbedBody) against the replica's limits.

Runs inside the TEE on plaintext request bodies; every refusal is a :class:`Rejected` whose reason goes
back *sealed* (:mod:`bifrost.tee.replica`), so the counts and sizes in it never leave the channel.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.tokenizer import chat_ids
from ..proto import serving_pb2
from ..proto.replica import Status
from .scheduler import Sampling

MAX_STOP_SEQUENCES = 4  # per request
MAX_STOP_CHARS = 64     # per stop sequence
MAX_TEMPERATURE = 2.0
MAX_EMBED_TEXTS = 64    # per request
CHAT_ROLES = ("system", "user", "assistant")


class Rejected(Exception):
    """A request turned down after its record was opened: ``status`` and the exact ``reason``, which may name
    counts and sizes of the plaintext, so it only ever leaves *sealed* (the replica's cleartext refusal is then
    the generic :data:`~bifrost.proto.wire.SEALED_REFUSAL`). There is deliberately no cleartext form."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Limits:
    """What a replica accepts: its model's ``task`` and ``context`` (tokens a turn may fill: the model's,
    capped by ``serve.max_context_tokens``; 0: unknown), the vocabulary
    size (0: unknown), the serving limits, and the ``generation:`` config's defaults."""

    model: str
    task: str
    context: int
    vocab: int
    max_new_tokens: int       # the serving limit per turn
    default_new_tokens: int   # a turn that names none
    max_prompt_tokens: int
    sampling: Sampling        # the config's sampling, under each request's parameters


@dataclass(frozen=True)
class GenerateTurn:
    """A checked Generate request: the ids to prefill, tokens to make, sampling and stop sequences;
    ``chat``: it came as messages (the session's history was not prepended and is not changed)."""

    ids: list[int]
    n_new: int
    sampling: Sampling
    stop: list[str]
    chat: bool
    sample_seed: int | None


def check_generate(body: serving_pb2.GenerateBody, history: list[int], tokenizer, limits: Limits) -> GenerateTurn:
    """The turn ``body`` asks for after ``history`` (the session's conversation so far); :class:`Rejected`
    for a bad parameter or a request over a limit."""
    if limits.task != "causal-lm":
        raise Rejected(Status.FAILED_PRECONDITION, f"{limits.model} is an encoder model; use Embed")
    n_new = body.max_new_tokens or min(limits.default_new_tokens, limits.max_new_tokens)
    if n_new > limits.max_new_tokens:
        raise Rejected(Status.INVALID_ARGUMENT, f"max_new_tokens {n_new} is over the limit of {limits.max_new_tokens}")
    sampling = check_sampling(body, limits)
    stop = list(body.stop)
    if len(stop) > MAX_STOP_SEQUENCES or any(not 1 <= len(x) <= MAX_STOP_CHARS for x in stop):
        raise Rejected(Status.INVALID_ARGUMENT, f"stop: up to {MAX_STOP_SEQUENCES} stop sequences of "
                                                f"1..{MAX_STOP_CHARS} characters each")
    chat = len(body.messages) > 0
    if chat:
        prompt_ids = check_chat(body, tokenizer)
    else:
        prompt_ids = tokenizer.encode(body.prompt)
        if not prompt_ids:
            raise Rejected(Status.INVALID_ARGUMENT, "the prompt is empty")
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise Rejected(Status.INVALID_ARGUMENT, f"prompt has {len(prompt_ids)} tokens; the limit is "
                                                f"max_prompt_tokens={limits.max_prompt_tokens}")
    ids = prompt_ids if chat else history + prompt_ids  # messages are the whole conversation
    if limits.context and len(ids) + n_new > limits.context:
        raise Rejected(Status.INVALID_ARGUMENT, f"conversation ({len(ids)} tokens) + {n_new} new tokens exceeds "
                                                f"the context of {limits.context} tokens (the model's, or "
                                                "max_context_tokens); reset the history")
    return GenerateTurn(ids, n_new, sampling, stop, chat, body.sample_seed if body.has_sample_seed else None)


def check_chat(body: serving_pb2.GenerateBody, tokenizer) -> list[int]:
    """The ids of ``body.messages`` in the model's chat template (else the documented plain fallback)."""
    if body.prompt:
        raise Rejected(Status.INVALID_ARGUMENT, "give a prompt or messages, not both")
    for m in body.messages:
        if m.role not in CHAT_ROLES:
            raise Rejected(Status.INVALID_ARGUMENT, f"message role {m.role[:32]!r}: use one of {', '.join(CHAT_ROLES)}")
    try:
        ids = chat_ids(tokenizer, [{"role": m.role, "content": m.content} for m in body.messages])
    except Exception as exc:  # noqa: BLE001 - a template that rejects this conversation (e.g. role order)
        raise Rejected(Status.INVALID_ARGUMENT, f"the chat template refused these messages: "
                                                f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not ids:
        raise Rejected(Status.INVALID_ARGUMENT, "the chat template rendered the messages as no tokens")
    return ids


def check_sampling(body: serving_pb2.GenerateBody, limits: Limits) -> Sampling:
    """The turn's sampling: the body's parameters over the config's; temperature 0: greedy."""
    base = limits.sampling
    if body.HasField("temperature") and not 0.0 <= body.temperature <= MAX_TEMPERATURE:
        raise Rejected(Status.INVALID_ARGUMENT, f"temperature must be 0..{MAX_TEMPERATURE:g} (0: greedy)")
    if body.HasField("top_p") and not 0.0 < body.top_p <= 1.0:
        raise Rejected(Status.INVALID_ARGUMENT, "top_p must be in (0, 1]")
    if body.HasField("top_k") and limits.vocab and body.top_k > limits.vocab:
        raise Rejected(Status.INVALID_ARGUMENT, f"top_k must be 0 (off) .. the vocabulary size {limits.vocab}")
    temperature = body.temperature if body.HasField("temperature") else base.temperature
    do_sample = temperature > 0 if body.HasField("temperature") else base.do_sample
    if not do_sample:
        return Sampling(False, base.temperature, base.top_k, base.top_p)
    return Sampling(True, float(temperature), int(body.top_k) if body.HasField("top_k") else base.top_k,
                    float(body.top_p) if body.HasField("top_p") else base.top_p)


def check_embed(body: serving_pb2.EmbedBody, tokenizer, limits: Limits) -> list[str]:
    """The texts to embed; :class:`Rejected` for a decoder model, no or too many texts, or a text with no
    tokens or over ``max_prompt_tokens``."""
    if limits.task != "encoder":
        raise Rejected(Status.FAILED_PRECONDITION, f"{limits.model} is not an encoder model; use Generate")
    if not body.texts or len(body.texts) > MAX_EMBED_TEXTS:
        raise Rejected(Status.INVALID_ARGUMENT, f"send 1..{MAX_EMBED_TEXTS} texts")
    for t in body.texts:
        n = len(tokenizer.encode(t))
        if n == 0 or n > limits.max_prompt_tokens:
            raise Rejected(Status.INVALID_ARGUMENT,
                           f"each text needs 1..max_prompt_tokens={limits.max_prompt_tokens} tokens")
    return list(body.texts)

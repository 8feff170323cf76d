"""Tokenizers. A checkpoint directory's own tokenizer is used when it has one; otherwise the
byte-level fallback below, clearly labelled as such.

``ByteTokenizer`` maps each UTF-8 byte to the id GPT-2's byte-level BPE gives that single byte (the
first 256 vocabulary entries, in ``bytes_to_unicode`` order), without merges: any text round-trips,
and ids are valid for GPT-2-sized vocabularies. Ids >= 256 (random-weight models produce them) decode
as ``<id>``.
"""

from __future__ import annotations

from pathlib import Path


def plain_chat_text(messages: list[dict]) -> str:
    """The documented fallback for a model without a chat template: one ``role: content`` line per message,
    then ``assistant:`` (the reply follows). E.g. ``system: Be brief.\nuser: Hi\nassistant:``."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """``messages`` as prompt ids: the tokenizer's own chat template when it has one, else
    :func:`plain_chat_text` (documented in the README)."""
    if tokenizer.has_chat_template:
        return tokenizer.apply_chat_template(messages)
    return tokenizer.encode(plain_chat_text(messages))


def _gpt2_byte_order() -> list[int]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    return printable + [b for b in range(256) if b not in printable]


class ByteTokenizer:
    name = "byte-level fallback (GPT-2 byte ids, no merges)"
    eos_token_id: int | None = None  # no end-of-sequence token: generation runs to its length or a stop sequence
    has_chat_template = False

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        raise ValueError("this model's tokenizer (the byte-level fallback) has no chat template")

    def __init__(self) -> None:
        order = _gpt2_byte_order()
        self._id_of_byte = {b: i for i, b in enumerate(order)}
        self._byte_of_id = {i: b for i, b in enumerate(order)}

    def encode(self, text: str) -> list[int]:
        return [self._id_of_byte[b] for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i in self._byte_of_id:
                buf.append(self._byte_of_id[i])
            else:
                if buf:
                    out.append(buf.decode("utf-8", errors="replace"))
                    buf = bytearray()
                out.append(f"<{i}>")
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def batch(self, texts: list[str]):
        """Encoder input for ``texts``: ``input_ids`` right-padded with id 0 and the ``attention_mask``."""
        import torch

        rows = [self.encode(t) for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


def chat_prompt(tokenizer, text: str) -> str:
    """``text`` wrapped in ``tokenizer``'s chat template when it has one, else ``text`` unchanged."""
    wrap = getattr(tokenizer, "chat_prompt", None)
    wrapped = wrap(text) if wrap is not None else None
    return text if wrapped is None else wrapped


class HFTokenizer:
    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.name = f"{type(self._tok).__name__} from {path}"

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        text = self._tok.decode(ids)
        if not isinstance(text, str):  # one list of ids decodes to one string
            raise TypeError(f"the tokenizer decoded one sequence to {type(text).__name__}")
        return text

    @property
    def eos_token_id(self) -> int | None:
        eos = self._tok.eos_token_id
        return eos if isinstance(eos, int) else None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """The ids of ``messages`` ({"role", "content"} each) rendered by the checkpoint's chat template, ending
        with the prompt of the assistant's reply; ValueError when the tokenizer has no chat template."""
        if not self.has_chat_template:
            raise ValueError(f"this model's tokenizer ({type(self._tok).__name__}) has no chat template")
        text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def batch(self, texts: list[str]):
        return self._tok(texts, padding=True, return_tensors="pt")

    def chat_prompt(self, text: str) -> str | None:
        """``text`` as a user message in the checkpoint's chat template, ready for the assistant's reply
        (``add_generation_prompt``); None when the tokenizer has no chat template."""
        if not getattr(self._tok, "chat_template", None):
            return None
        prompt = self._tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True)
        if not isinstance(prompt, str):  # tokenize=False renders a string
            raise TypeError(f"the chat template rendered {type(prompt).__name__}, not a string")
        return prompt


def load_tokenizer(path: str | None):
    if path and any((Path(path) / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")):
        return HFTokenizer(path)
    return ByteTokenizer()

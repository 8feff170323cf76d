"""Generation parameters in the sealed GenerateBody (issue 16): per-request sampling (temperature, top_p,
top_k), stop sequences, finish reasons, the end-of-sequence token and chat messages rendered by the model's
chat template; the client SDK and ``bifrost chat`` carry them."""

from __future__ import annotations

import pytest

from bifrost.model.tokenizer import ByteTokenizer

from .conftest import MODEL, connect, plaintext_greedy

PROMPT = "The enclave"


def _greedy(cfg, prompt: str, n: int) -> list[int]:
    return plaintext_greedy(MODEL, cfg.seed, ByteTokenizer().encode(prompt), n)


def test_temperature_zero_and_top_k_one_equal_greedy_plaintext(client_factory, serve_run_config):
    c = client_factory()
    want = _greedy(serve_run_config, PROMPT, 6)
    r = c.chat(PROMPT, 6, reset_history=True, temperature=0.0)
    assert r.tokens == want and r.finish_reason == "length" and r.prompt_tokens == len(PROMPT)
    assert c.chat(PROMPT, 6, reset_history=True, temperature=1.0, top_k=1).tokens == want
    assert c.chat(PROMPT, 6, reset_history=True, temperature=1.5, top_k=1, sample_seed=3).tokens == want


def test_a_pinned_seed_reproduces_and_different_seeds_differ(client_factory):
    c = client_factory()
    runs = {seed: [c.chat(PROMPT, 12, reset_history=True, temperature=1.0, sample_seed=seed).tokens
                   for _ in range(2)] for seed in (1, 2)}
    assert runs[1][0] == runs[1][1] and runs[2][0] == runs[2][1]
    assert runs[1][0] != runs[2][0]
    # top_p: a pinned seed still reproduces; sampling without a seed uses fresh noise (CSPRNG)
    a = c.chat(PROMPT, 12, reset_history=True, temperature=1.0, top_p=0.9, sample_seed=5).tokens
    assert a == c.chat(PROMPT, 12, reset_history=True, temperature=1.0, top_p=0.9, sample_seed=5).tokens
    unseeded = {tuple(c.chat(PROMPT, 12, reset_history=True, temperature=2.0).tokens) for _ in range(3)}
    assert len(unseeded) > 1


def _first_change(tokens: list[int]) -> int:
    k = next(i for i in range(1, len(tokens)) if tokens[i] != tokens[i - 1])
    return k


def test_a_stop_sequence_ends_the_stream_and_is_not_streamed(client_factory, serve_run_config, local_app):
    c = client_factory()
    bt = ByteTokenizer()
    want = _greedy(serve_run_config, PROMPT, 24)
    full = bt.decode(want)
    k = _first_change(want)
    stop = bt.decode(want[k - 1:k + 1])  # where the (random-weight) reply changes: it first occurs there
    cut = full.find(stop)
    n = next(m for m in range(1, 25) if stop in bt.decode(want[:m]))  # tokens made until it appears
    assert n < 24
    events = list(c.generate(PROMPT, 24, reset_history=True, stop=[stop, "never-in-this-text"]))
    text = "".join(e.text for e in events)
    assert text == full[:cut] and stop not in text
    assert [e.finish_reason for e in events[:-1]] == [""] * (len(events) - 1)
    assert events[-1].finish_reason == "stop" and events[-1].token_ids and events[0].prompt_tokens == len(PROMPT)
    assert [t for e in events for t in e.token_ids] == want[:n]  # ended at the stop sequence, not at max tokens
    # the turn's engine was released: the session serves its next turn, which continues the history
    nxt = c.chat("!", 3)
    ids = bt.encode(PROMPT) + want[:n] + bt.encode("!")
    assert nxt.tokens == plaintext_greedy(MODEL, serve_run_config.seed, ids, 3)
    replica = local_app.replicas[local_app.service.sessions.get(c.session_id).replica].obj
    assert not replica.loop.busy()


def test_text_that_may_start_a_stop_sequence_is_held_back_then_released(client_factory, serve_run_config):
    c = client_factory()
    want = _greedy(serve_run_config, PROMPT, 10)
    full = ByteTokenizer().decode(want)
    first = ByteTokenizer().decode(want[:1])
    stop = first + "\x00never"  # its start is the reply's first token; the whole never appears
    events = list(c.generate(PROMPT, 10, reset_history=True, stop=[stop]))
    assert events[0].text == ""  # held back while it could begin the stop sequence
    assert "".join(e.text for e in events) == full and events[-1].finish_reason == "length"
    assert len(events) == 10


def test_the_end_of_sequence_token_ends_with_stop_and_is_not_text(client_factory, serve_run_config, local_app,
                                                                   monkeypatch):
    c = client_factory()
    want = _greedy(serve_run_config, PROMPT, 24)
    k = _first_change(want)
    replica = local_app.replicas[local_app.service.sessions.get(c.session_id).replica].obj
    monkeypatch.setattr(replica.runtime.tokenizer, "eos_token_id", want[k])  # (the byte tokenizer has none)
    events = list(c.generate(PROMPT, 24, reset_history=True))
    assert [t for e in events for t in e.token_ids] == want[:k]
    assert events[-1].finish_reason == "stop" and events[-1].token_ids == [] and events[-1].text == ""
    assert "".join(e.text for e in events) == ByteTokenizer().decode(want[:k])
    assert not replica.loop.busy()


def _tiny_chat_checkpoint(folder) -> str:
    """A random 2-layer GPT-2 with a byte-level BPE tokenizer (no merges) and a ChatML-like chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                               eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id)).save_pretrained(folder)
    return str(folder)


def test_hf_tokenizer_applies_its_chat_template(tmp_path):
    from bifrost.model.tokenizer import load_tokenizer

    tok = load_tokenizer(_tiny_chat_checkpoint(tmp_path))
    assert tok.has_chat_template and tok.eos_token_id is not None
    ids = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert tok.decode(ids) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" \
                              "<|im_start|>assistant\n"
    assert ids.count(tok.eos_token_id) == 2
    assert not ByteTokenizer().has_chat_template and ByteTokenizer().eos_token_id is None
    with pytest.raises(ValueError, match="no chat template"):
        ByteTokenizer().apply_chat_template([{"role": "user", "content": "Hi"}])


def test_chat_messages_are_served_through_the_template_without_the_history(serve_run_config, serve_config, tmp_path):
    from bifrost.model.catalog import load_model, resolve
    from bifrost.model.tokenizer import load_tokenizer
    from bifrost.serve.client import ServingError
    from bifrost.tee.deploy import ServeApp
    from bifrost.tee.runtime import plaintext_greedy_tokens

    path = _tiny_chat_checkpoint(tmp_path / "chat-gpt2")
    cfg = serve_run_config.replace(model=path, policy="tee-only")  # no worker needed
    app = ServeApp(cfg, serve_config.replace(workers=(), worker_certs=())).start()
    try:
        c = connect(app)
        tok, model = load_tokenizer(path), load_model(resolve(path), cfg.seed)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        ids = tok.apply_chat_template(messages)
        c.chat("abc", 2)  # some history, which a messages request neither sees nor changes
        r = c.chat(messages=messages, max_new_tokens=5, temperature=0)
        want = plaintext_greedy_tokens(model, ids, 5)
        if tok.eos_token_id in want:
            want = want[:want.index(tok.eos_token_id)]
        assert r.tokens == want and r.prompt_tokens == len(ids) and r.finish_reason in ("length", "stop")
        nxt = c.chat("d", 1)  # continues "abc" + its 2 tokens, not the chat
        assert nxt.prompt_tokens == len(tok.encode("abc")) + 2 + len(tok.encode("d"))
        for bad, words in (([], "the prompt is empty"), ([{"role": "robot", "content": "x"}], "message role")):
            with pytest.raises(ServingError) as e:
                c.chat(messages=bad, max_new_tokens=1)
            assert e.value.sealed and e.value.code.name == "INVALID_ARGUMENT" and words in e.value.details
    finally:
        app.stop()

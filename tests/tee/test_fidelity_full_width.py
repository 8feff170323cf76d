"""Fidelity at real layer widths (the issue's acceptance figures), on the default (native) backend.

- 2-layer GPT-2 (768 wide) and Qwen3 (1024 wide, GQA, q/k norms): 32 greedy steps, prompt included,
  identical to plaintext PyTorch; the max |logit error| is printed.
- all-MiniLM-L6-v2 with its real pretrained weights, every linear layer delegated: cosine >= 0.999.

``benchmarks/fidelity.py`` reports the same figures for any backend as JSON and a table.
"""

import pytest

from bifrost.tee.runtime import TrustedRuntime, plaintext_embeddings

SENTENCES = [
    "The prompt never leaves the trusted execution environment.",
    "Homomorphic encryption lets a server compute on data it cannot read.",
    "A cat sat on the mat.",
    "Quarterly revenue grew by twelve percent.",
]


@pytest.mark.parametrize("model", ["gpt2-2l", "qwen3-2l"])
def test_two_layer_full_width_greedy_tokens_equal_plaintext(worker_factory, run_config, model):
    _, _, address = worker_factory(model)
    runtime = TrustedRuntime(run_config.replace(model=model), address, reference=True)
    result = runtime.generate("Private LLM", 32, mode="bifrost")
    runtime.close()
    f = result.fidelity
    print(f"\n{model}/{run_config.backend}: tokens identical {result.tokens == f.plaintext_tokens} "
          f"({f.agreeing_steps}/32), max |logit error| {f.max_abs_logit_error:.2e}, min margin {f.min_top1_margin:.2e}")
    assert result.tokens == f.plaintext_tokens
    assert f.max_abs_logit_error < f.min_top1_margin / 2  # no near-tie could have flipped


def test_pretrained_minilm_embeddings_match_plaintext(worker_factory, run_config):
    _, _, address = worker_factory("minilm")
    runtime = TrustedRuntime(run_config.replace(model="minilm"), address)
    emb = runtime.embed(SENTENCES)
    calls = runtime.engine.stats.calls
    runtime.close()
    ref = plaintext_embeddings("minilm", run_config.seed, SENTENCES)
    cosines = [float(a @ b) for a, b in zip(emb, ref)]
    print(f"\nminilm/{run_config.backend}: cosine to plaintext {[round(c, 6) for c in cosines]}")
    assert calls == len(SENTENCES) * 6 * 4  # 6 layers x (qkv fused, attn out, intermediate, output)
    assert min(cosines) >= 0.999

"""The core issue's decode fidelity holds with the native backend (greedy tokens equal plaintext)."""

import pytest

from bifrost.config import CKKSConfig
from bifrost.tee.runtime import TrustedRuntime


@pytest.mark.parametrize("model", ["gpt2-mini", "qwen3-mini"])
def test_greedy_tokens_equal_plaintext_with_native_backend(worker_factory, run_config, model):
    _, _, address = worker_factory(model)
    config = run_config.replace(model=model, backend="native",
                                ckks=CKKSConfig(poly_modulus_degree=2048, coeff_mod_bit_sizes=(30, 24), scale_bits=35))
    runtime = TrustedRuntime(config, address, reference=True)
    result = runtime.generate("Private LLM", 16)
    runtime.close()
    f = result.fidelity
    print(f"{model}/native: agree {f.agreeing_steps}/16, max|logit err| {f.max_abs_logit_error:.2e}, "
          f"min margin {f.min_top1_margin:.2e}")
    assert result.tokens == f.plaintext_tokens
    assert f.agreeing_steps == 16
    assert f.max_abs_logit_error < 1e-3

"""Any Hugging Face decoder or encoder from a local checkpoint, without code changes: tiny random checkpoints
of architectures Bifrost has no code for run through a real worker, every linear of their transformer blocks
delegated (and nothing else), and give plaintext's greedy tokens / embeddings."""

import numpy as np
import pytest

from bifrost.tee.runtime import TrustedRuntime, plaintext_embeddings
from tests.checkpoints import ARCHITECTURES, ENCODERS, block_linears, build_checkpoint

# architecture -> linear modules per block (all delegated) and worker calls per forward pass (fused siblings
# share one call: q/k/v, gate/up; Phi-3 qkv_proj/gate_up_proj, GPT-NeoX query_key_value are one module)
DECODERS = {"mistral": (7, 4), "phi3": (4, 4), "gpt_neox": (4, 4), "gemma2": (7, 4), "opt": (6, 4)}
STEPS = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: str(build_checkpoint(name, root)) for name in [*DECODERS, "distilbert"]}


@pytest.mark.parametrize("arch", DECODERS)
def test_decoder_checkpoint_delegates_every_block_linear_and_matches_plaintext(checkpoints, worker_factory,
                                                                                run_config, arch):
    path = checkpoints[arch]
    service, _, endpoint = worker_factory(path)
    runtime = TrustedRuntime(run_config.replace(model=path), endpoint, reference=True)
    try:
        result = runtime.generate("Private LLM", STEPS)
    finally:
        runtime.close()
    assert (runtime.spec.family, runtime.spec.task) == (ARCHITECTURES[arch][0], "causal-lm")
    per_block, calls_per_block = DECODERS[arch]
    block = block_linears(runtime.reference)  # from the plain model's structure, not from the policy
    assert len(block) == 2 * per_block
    assert [s.name for s in runtime.sites] == block
    assert sorted(service.layers) == sorted(block)  # the worker serves exactly those
    assert len(runtime.groups) == 2 * calls_per_block
    assert [t.calls for t in result.timings] == [len(runtime.groups)] * STEPS  # every layer reached the worker
    f = result.fidelity
    print(f"{arch}: agree {f.agreeing_steps}/{STEPS}, max|logit err| {f.max_abs_logit_error:.2e}, "
          f"min margin {f.min_top1_margin:.2e}")
    assert result.tokens == f.plaintext_tokens
    assert f.agreeing_steps == STEPS
    assert f.max_abs_logit_error < 1e-3


def test_encoder_checkpoint_embeds_like_plaintext(checkpoints, worker_factory, run_config):
    path = checkpoints["distilbert"]
    _, _, endpoint = worker_factory(path)
    runtime = TrustedRuntime(run_config.replace(model=path), endpoint, reference=True)
    try:
        emb = runtime.embed(["Private LLM"])
    finally:
        runtime.close()
    assert (runtime.spec.family, runtime.spec.task) == (ENCODERS["distilbert"][0], "encoder")
    assert [s.name for s in runtime.sites] == block_linears(runtime.reference)
    assert len(runtime.sites) == 2 * 6  # q_lin, k_lin, v_lin, out_lin, lin1, lin2
    assert runtime.engine.stats.calls == len(runtime.groups) == 2 * 4  # q/k/v_lin fused
    ref = plaintext_embeddings(path, run_config.seed, ["Private LLM"])
    assert float(emb[0] @ ref[0]) > 1 - 1e-6
    assert np.abs(emb - ref).max() < 1e-3

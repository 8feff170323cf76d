"""The client SDK and `bifrost chat` refuse a token stream that lost its end.

A relay between client and server (what a network attacker or a broken proxy can do) forwards
every call unchanged but cuts each Generate stream before its last message: every record it passes
on is authentic and in order, only the final ``done`` chunk is missing."""

from __future__ import annotations


import pytest
import yaml

from bifrost.errors import BifrostError
from tests.netfault import GrpcRelay


class TruncatingRelay(GrpcRelay):
    """Forwards every call unchanged, but each Generate stream without its last message."""

    def generate(self, method: str, request: bytes, meta, context):
        replies = list(self.channel().unary_stream(method)(request, metadata=meta, timeout=120))
        yield from replies[:-1]


@pytest.fixture()
def relay(local_app):
    r = TruncatingRelay(f"127.0.0.1:{local_app.port}")
    yield r
    r.stop()


def test_sdk_refuses_a_stream_without_its_final_chunk(relay, policy, local_app):
    from bifrost.serve.client import BifrostClient

    with BifrostClient(f"127.0.0.1:{relay.port}", policy, timeout_s=120) as c:
        c.attest()
        with pytest.raises(BifrostError, match="truncated"):
            c.chat("cut short", 3)
    with BifrostClient(f"127.0.0.1:{local_app.port}", policy, timeout_s=120) as direct:  # the full stream is fine
        direct.attest()
        assert len(direct.chat("whole", 3).tokens) == 3


def test_chat_cli_exits_non_zero_on_a_truncated_stream(relay, local_app, tmp_path, capsys):
    from bifrost.cli import main

    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump({"allow_simulated": True,
                                           "model_digests": [local_app.service.info.model_digest.hex()]}))
    code = main(["chat", "--address", f"127.0.0.1:{relay.port}", "--policy", str(policy_file),
                 "--prompt", "cut short", "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert code != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("bifrost: error:") and "truncated" in last and "Traceback" not in err


def test_chat_cli_sends_sampling_and_stop_parameters(local_app, tmp_path, capsys, serve_run_config):
    from bifrost.cli import main
    from bifrost.model.tokenizer import ByteTokenizer

    from .conftest import MODEL, plaintext_greedy

    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump({"allow_simulated": True,
                                           "model_digests": [local_app.service.info.model_digest.hex()]}))
    args = ["chat", "--address", f"127.0.0.1:{local_app.port}", "--policy", str(policy_file),
            "--prompt", "The enclave", "--max-new-tokens", "6", "--temperature", "0", "--top-k", "3"]
    assert main(args) == 0
    out = capsys.readouterr()
    want = ByteTokenizer().decode(plaintext_greedy(MODEL, serve_run_config.seed, ByteTokenizer().encode("The enclave"), 6))
    assert out.out.rstrip("\n") == want and "finished: length" in out.err
    assert main(args + ["--stop", want[2:4]]) == 0  # the stop sequence ends the reply and is not printed
    out = capsys.readouterr()
    assert out.out.rstrip("\n") == want[:want.find(want[2:4])] and "finished: stop" in out.err
    # gpt2-mini (byte tokenizer) has no chat template: the messages go in the documented plain rendering
    assert main(args + ["--system", "Be brief."]) == 0
    from bifrost.model.tokenizer import plain_chat_text

    rendered = plain_chat_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The enclave"}])
    want = ByteTokenizer().decode(plaintext_greedy(MODEL, serve_run_config.seed, ByteTokenizer().encode(rendered), 6))
    assert capsys.readouterr().out.rstrip("\n") == want

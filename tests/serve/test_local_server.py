"""The serving front end with in-process replicas: attested chat equals plaintext inference."""

from __future__ import annotations

from bifrost.model.tokenizer import ByteTokenizer

from .conftest import MODEL, plaintext_greedy


def test_attested_chat_equals_plaintext_and_history_is_kept(client_factory, serve_run_config):
    c = client_factory()
    assert c.verdict.simulated
    first = c.chat("The enclave", 6)
    ids = ByteTokenizer().encode("The enclave")
    assert first.tokens == plaintext_greedy(MODEL, serve_run_config.seed, ids, 6)
    assert first.ttft_s > 0 and first.tpot_s > 0
    second = c.chat(" again", 4)  # the second turn continues this session's own history
    ids2 = ids + first.tokens + ByteTokenizer().encode(" again")
    assert second.tokens == plaintext_greedy(MODEL, serve_run_config.seed, ids2, 4)
    third = c.chat("The enclave", 6, reset_history=True)
    assert third.tokens == first.tokens


def test_list_models_health_and_reflection(local_app, client_factory):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    c = client_factory(attest=False)
    reply = c.list_models()
    assert reply.models[0].name == MODEL and reply.models[0].max_prompt_tokens == 64
    assert reply.evidence_type == "simulated"
    with grpc.insecure_channel(f"127.0.0.1:{local_app.port}") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="bifrost.serving.v1.BifrostServing"), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                   timeout=10))
        names = {s.name for s in responses[0].list_services_response.service}
        assert "bifrost.serving.v1.BifrostServing" in names and "grpc.health.v1.Health" in names

"""Attested serving: the public gRPC API, ``bifrost serve`` and ``bifrost chat``.

API: ``bifrost/proto/serving.proto`` (service ``bifrost.serving.v1.BifrostServing``: Attest,
Generate [server-streaming], Embed, CloseSession, ListModels; plus grpc.health.v1 and server
reflection). Stubs are committed next to it and regenerated with ``python -m bifrost.proto.generate``.

Layout: :mod:`.server` (front end: tokens, limits, routing of *sealed* records; never holds channel
keys), :mod:`.sessions` (the front end's session table), :mod:`.client` (SDK), :mod:`.replicas` (how the
front end reaches a replica, in-process or Ray; bounded waits), :mod:`.cli` (``bifrost chat``),
:mod:`.config` (``configs/serve.yaml``). Nothing here imports the trusted runtime: the replica that owns
channel keys, CKKS keys and history is :mod:`bifrost.tee.replica`, and the deployment that builds the
replicas and hands them to the front end (``bifrost serve``) is :mod:`bifrost.tee.deploy`. Replica ↔
front end messages: :mod:`bifrost.proto.replica`; wire constants: :mod:`bifrost.proto.wire`.

Run::

    bifrost serve --model gpt2-mini                        # Ray + one local CKKS worker, 127.0.0.1:50061
    bifrost serve --model gpt2-mini --print-digests        # what a client policy pins
    bifrost chat --policy my-policy.yaml --prompt "Hello"  # policy: allow_simulated + model_digests

On a Ray cluster, from one of its nodes (bifrost and the model installed on every node; CKKS workers
given by address and pinned certificate, since local workers listen on 127.0.0.1 only; each worker trusts
the deployment's ``tee.identity`` certificate; Ray Client ``ray://`` is refused)::

    bifrost serve --model gpt2 --ray-address auto --workers w1:50051,w2:50051 \
        --worker-certs w1.pem,w2.pem --config deploy.yaml --replicas 4    # deploy.yaml: tee.identity: /etc/bifrost/tee

Wire privacy: sealed records are padded to size buckets; refusals after a record was opened travel
sealed (the cleartext status says only "request refused"); a forged or replayed record, CloseSession
included, changes nothing; ``tls_cert_file``/``tls_key_file`` (``--tls-cert``/``--tls-key``; client
``tls_ca_file``, ``bifrost chat --tls-ca``) add TLS, which hides bearer tokens and metadata. See the
README's "What the network sees".

Robustness: a dead replica gets no new sessions (health NOT_SERVING when none is left); a client that
hangs up stops its turn at the next token; idle sessions are dropped, never one with a request in
progress; every replica answer is bounded by ``replica_timeout_s``, startup by ``startup_timeout_s``.
"""

"""Write a commented client attestation policy (YAML) that pins a server's model and serving-config digests.

Used by ``bifrost attest init-policy --address HOST:PORT`` (digests read from the server's unauthenticated
ListModels) and ``bifrost serve --print-digests --policy-out FILE`` (digests computed by the operator).
The file loads with :func:`bifrost.attest.policy.load_policy`; ``allow_simulated: true`` is written only
when the evidence type is ``simulated``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import RefusedError, UnavailableError, UserError


@dataclass(frozen=True)
class ServedModel:
    name: str
    model_digest: bytes
    serving_config_digest: bytes


def render_policy(models: list[ServedModel], evidence_type: str, source: str) -> str:
    """The policy YAML text, every key explained. ``source``: where the digests came from (one comment line
    or more, without the leading ``#``)."""
    if not models:
        raise UserError("no models to pin")
    lines = [
        "# Bifrost client attestation policy (bifrost chat --policy FILE, bifrost proxy --policy FILE,",
        "# BifrostClient(address, load_policy(FILE))). Every key is optional; unknown keys are an error.",
        "#",
        *(f"# {line}" for line in source.splitlines()),
        "#",
    ]
    if evidence_type == "simulated":
        lines += [
            "# !!! DEVELOPMENT ONLY: this server's evidence is SIMULATED (signed by a local software key, no TEE).",
            "# !!! allow_simulated: true accepts it: prompts get NO hardware confidentiality. Never use this",
            "# !!! policy for a real deployment: set it to false and fill in the snp: or tdx: section below.",
            "allow_simulated: true",
        ]
    else:
        lines += [
            f"# Evidence type reported by the server: {evidence_type or 'unknown'}. Simulated evidence is refused.",
            "allow_simulated: false",
        ]
    lines += [
        "",
        "# Accept debug guests (their memory is readable by the host): keep false.",
        "allow_debug: false",
        "",
        "# SHA-256 digests of the model weights the server must serve (mandatory: a client refuses to send",
        "# prompts when none is pinned). Bound into the evidence's report_data at every attestation.",
        "model_digests:",
        *(f"  - \"{m.model_digest.hex()}\"  # {m.name}" for m in models),
        "",
        "# SHA-256 digests of the serving configuration (placement policy, adapter, limits, workers' trust",
        "# setup). Remove this list to accept any configuration of the pinned model.",
        "serving_config_digests:",
        *(f"  - \"{m.serving_config_digest.hex()}\"  # {m.name}" for m in models),
        "",
        "# Real hardware: pin the confidential VM's launch measurement and a minimum TCB, otherwise any",
        "# genuine SEV-SNP / TDX guest (running any code) with the pinned digests is accepted. Empty lists",
        "# mean \"not pinned\" (the check is skipped and listed as not checked in the verdict).",
        "snp:",
        "  allowed_vmpls: [0]",
        "  measurements: []      # 48-byte launch MEASUREMENTs (96 hex), e.g. from your image build (snpguest / sev-snp-measure)",
        "  host_data: []         # 32-byte HOST_DATA values (64 hex) set at launch, if your deployment uses them",
        "  min_tcb: {}           # e.g. {bootloader: 9, tee: 0, snp: 23, microcode: 72}: refuse older firmware",
        "  allow_masked_chip_id: false",
        "tdx:",
        "  allowed_tcb_statuses: [UpToDate]",
        "  mrtd: []              # 48-byte MRTDs (96 hex) of the TD image",
        "  rtmr0: []             # likewise rtmr1, rtmr2, rtmr3: runtime measurements (firmware, kernel, command line)",
        "",
    ]
    return "\n".join(lines)


def write_policy(path: str | Path, text: str, force: bool = False) -> None:
    """Write ``text`` to ``path``; an existing file is kept unless ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def fetch_served_models(address: str, tls_ca: str | None = None, timeout_s: float = 10.0) -> tuple[list[ServedModel], str]:
    """(models, evidence type) from the server's ListModels: unauthenticated, so not yet trustworthy. (A plain
    gRPC call: this module sits below the client SDK, ``bifrost/serve``, and does not import it.)"""
    import grpc

    from ..proto import serving_pb2, serving_pb2_grpc
    from ..proto.wire import serving_options

    try:
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            channel = grpc.secure_channel(address, creds, options=serving_options())
        else:
            channel = grpc.insecure_channel(address, options=serving_options())
    except (OSError, ValueError) as exc:
        raise UnavailableError(f"cannot list the models of {address}: {exc}") from None
    try:
        with channel:
            reply = serving_pb2_grpc.BifrostServingStub(channel).ListModels(serving_pb2.ListModelsRequest(),
                                                                            timeout=timeout_s)
    except grpc.RpcError as exc:
        detail = " ".join((exc.details() or "").split())[:200]
        raise UnavailableError(f"cannot list the models of {address}: {exc.code().name}: {detail}") from None
    models = [ServedModel(m.name, bytes(m.model_digest), bytes(m.serving_config_digest)) for m in reply.models]
    if not models:
        raise UserError(f"{address} serves no models")
    for m in models:
        if len(m.model_digest) != 32 or len(m.serving_config_digest) != 32:
            raise RefusedError(f"{address}: malformed digests for model {m.name!r}")
    return models, reply.evidence_type


def remote_source(address: str) -> str:
    return (f"Digests read from {address} by `bifrost attest init-policy` over its UNAUTHENTICATED ListModels:\n"
            "anyone between you and the server could have changed them. Before trusting this file, compare\n"
            "them with what the operator's `bifrost serve --print-digests` (same model and configs) prints.")


def local_source() -> str:
    return ("Digests computed by `bifrost serve --print-digests` from the model and the run/serve configs on\n"
            "this machine (the server's attestation binds the same values).")

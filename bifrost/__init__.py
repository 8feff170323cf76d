"""Bifrost: private transformer inference.

Trust domains, one folder each (imports point inward; untrusted code never imports trusted code):

- ``bifrost.tee``     trusted runtime (inside the CPU TEE): secret key, prompts, activations, KV cache.
- ``bifrost.worker``  untrusted CKKS worker: sees only ciphertexts, public parameters and public weights.
- ``bifrost.ckks``    CKKS backends (Protocol + registry); ``bifrost_kernels`` holds native kernels.
- ``bifrost.model``   public model plumbing shared by both sides (loading, delegation policy, digests).
- ``bifrost.attest``  attestation evidence, verification and the attested channel.
- ``bifrost.serve``   public serving endpoint.
"""

__version__ = "0.1.0"

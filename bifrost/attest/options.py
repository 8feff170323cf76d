"""What a verifier trusts and what time it is: one options object for every verifier.

:class:`VerifyOptions` carries the clock and the trust roots of both the SEV-SNP verifier (the AMD
ASK/ASVK + ARK chains used when no ``cert_chain`` endorsement is supplied, and the pins of the ARK
keys accepted at the top of any chain) and the TDX verifier (the Intel SGX Root CA every PCK and
collateral chain must end at). The defaults are the bundled roots (:mod:`.roots`) and the system
clock (UTC); only tests with self-made chains, and callers verifying at a pinned time, change them.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Mapping

from .roots import AMD_VCEK_CHAINS_PEM, AMD_VLEK_CHAINS_PEM, INTEL_SGX_ROOT_CA_PEM


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _read_only(table: Mapping[str, str]) -> Callable[[], Mapping[str, str]]:
    return lambda: types.MappingProxyType(dict(table))


@dataclass(frozen=True)
class VerifyOptions:
    """Verification clock and trust roots.

    ``now``: the clock, called once per verification when no explicit ``at`` is given.
    ``amd_vcek_chains`` / ``amd_vlek_chains``: product line ("Milan", ...) -> PEM of ASK (or ASVK)
    then ARK. ``amd_ark_pins``: SHA-256 of each trusted ARK SubjectPublicKeyInfo -> label; ``None``
    trusts exactly the ARKs of the two chain tables. ``intel_root_pem``: the Intel SGX Root CA
    (chains must end at this very certificate, byte for byte).
    """

    now: Callable[[], datetime] = utc_now
    amd_vcek_chains: Mapping[str, str] = field(default_factory=_read_only(AMD_VCEK_CHAINS_PEM))
    amd_vlek_chains: Mapping[str, str] = field(default_factory=_read_only(AMD_VLEK_CHAINS_PEM))
    amd_ark_pins: Mapping[bytes, str] | None = None
    intel_root_pem: str = INTEL_SGX_ROOT_CA_PEM

    def time(self, at: datetime | None = None) -> datetime:
        """The verification time: ``at`` if given, else ``now()``; a naive time is taken as UTC."""
        when = self.now() if at is None else at
        return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)

    def amd_chains(self, kind: str) -> Mapping[str, str]:
        """The AMD chain table for ``kind`` (``"vcek"`` or ``"vlek"``)."""
        return self.amd_vcek_chains if kind == "vcek" else self.amd_vlek_chains


DEFAULT_OPTIONS = VerifyOptions()

"""Worker traffic of one delegated layer group: one type for what the trusted engine measures
(``DelegationEngine.stats.groups``) and what the estimator predicts (``bifrost_estimator.model.forward_traffic``).

It lives here, beside :class:`~bifrost.ckks.GroupShape`, because the estimator must never import ``bifrost.tee``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class GroupTraffic:
    """Calls, rows sent (padding included), ciphertexts and wire bytes each way of one layer group.

    Mutable: the engine keeps one per group and increments it in place; :meth:`copy` and :meth:`minus` give
    a period's share. ``exact_bytes`` is False only where the bytes are an estimate (the estimator, for a
    backend without exact ciphertext sizes); measured traffic is always exact.
    """

    calls: int = 0
    rows: int = 0  # rows sent, padding included
    cts_in: int = 0
    cts_out: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    exact_bytes: bool = True

    def copy(self) -> GroupTraffic:
        return dataclasses.replace(self)

    def minus(self, other: GroupTraffic) -> GroupTraffic:
        """The counts since ``other`` (an earlier copy of the same accumulator); exact iff both are."""
        return GroupTraffic(**{f: getattr(self, f) - getattr(other, f) for f in TRAFFIC_FIELDS},
                            exact_bytes=self.exact_bytes and other.exact_bytes)


# the counts (everything but ``exact_bytes``): what predicted and measured traffic are compared on
TRAFFIC_FIELDS = tuple(f.name for f in dataclasses.fields(GroupTraffic) if f.name != "exact_bytes")

"""Secure group averaging (``--secure-group K``): instead of pairwise exchanges, a node averages its model
with K-1 peers at a time, and no one, the round's initiator included, learns more than the group's sum: the
pairwise masks of Bonawitz et al. 2017 (``security/masking.py``). The initiator's side is groupround.py, a
member's groupmember.py, their messages groupwire.py; see docs/privacy.md and SECURITY.md.

A node with ``--secure-group`` neither starts nor accepts pairwise exchanges (its model would travel in the
clear to one partner): it answers them 409 (``GROUP_ONLY``), and advertises its mode so that pairwise nodes
ignore it and it ignores them (``discovery/identity.py``)."""

from __future__ import annotations

from typing import Any

from gossipfl.protocol.groupcore import GROUP_ONLY, GroupStats, check_options
from gossipfl.protocol.groupmember import GroupMember
from gossipfl.protocol.groupround import GroupInitiator, RoundFailed
from gossipfl.security import masking

__all__ = ["GROUP_ONLY", "GroupStats", "RoundFailed", "SecureGroup", "check_options"]


class SecureGroup(GroupInitiator, GroupMember):
    """Both roles for one node (keyword arguments: ``core``, the node's Gossiper; ``size``, K; ``interval``,
    ``rng``)."""

    def describe(self) -> dict[str, Any]:
        """For ``/v1/status``: K, the fixed point in use, and the counters."""
        return {
            **self.stats.as_dict(),
            "scale_bits": masking.SCALE_BITS,
            "range": masking.RANGE,
            "bound_keys": self.binder is not None,  # mutual TLS: keys signed by their members' certificates
            "in_round": self.round_id is not None,
            "waiting": len(self.rounds),  # rounds joined as a member and not decided yet
        }

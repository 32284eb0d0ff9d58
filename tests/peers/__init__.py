"""Kubelet peers for the agent's tests: the grpcio emulator and the kubelet's own device manager (Go).

`KubeletPeer` (real.py) drives tests/kubeletpeer; `find_or_build` (build.py) finds or builds its binary.
"""

from .build import PeerBuildError, PeerUnavailable, cached_binary, find_or_build, source_hash
from .real import EndpointInfo, KubeletPeer, NodeStatus, PeerError, PeerResource, TopologyHint

__all__ = [
    "EndpointInfo",
    "KubeletPeer",
    "NodeStatus",
    "PeerBuildError",
    "PeerError",
    "PeerResource",
    "PeerUnavailable",
    "TopologyHint",
    "cached_binary",
    "find_or_build",
    "source_hash",
]

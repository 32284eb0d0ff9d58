"""The runtime side: the agent as an NRI plugin that sets every container's cpuset at creation.

wire (hand-read protobuf and ttrpc messages) -> transport (ttrpc over NRI's multiplexer) -> plugin (the
Plugin service, registration, reconnection), deciding through policy (pure) from allocations (the kubelet's
PodResources record) and a PoolView of the plan (view: the adapter over the supervisor).
"""

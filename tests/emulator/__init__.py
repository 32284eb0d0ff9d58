"""Kubelet emulator (grpcio): an independent implementation of the kubelet's side of the device plugin API.

Typical use::

    async with KubeletEmulator(plugin_dir, pod_resources_socket=sock) as emu:
        await emu.wait_registered("example.com/cpu")
        result = await emu.allocate("example.com/cpu", 2)
"""

from .kubelet import KUBELET_SOCKET, SUPPORTED_VERSION, KubeletEmulator, check_preferred, remove_sockets
from .model import (
    HEALTHY,
    AllocationError,
    AllocationResult,
    ContainerAllocation,
    ContractViolation,
    DeviceInfo,
    DeviceSpec,
    EmulatorError,
    ListAndWatchRecord,
    Mount,
    NodeStatus,
    NotRegisteredError,
    PluginCallError,
    PluginOptions,
    RegistrationRecord,
    ResourceSnapshot,
    StreamEndRecord,
)
from .podresources import device_ids_by_resource
from .podresources import query as query_pod_resources
from .protos import DEVICEPLUGIN, PODRESOURCES
from .validation import extended_resource_name_problem

__all__ = [
    "DEVICEPLUGIN",
    "HEALTHY",
    "KUBELET_SOCKET",
    "PODRESOURCES",
    "SUPPORTED_VERSION",
    "AllocationError",
    "AllocationResult",
    "ContainerAllocation",
    "ContractViolation",
    "DeviceInfo",
    "DeviceSpec",
    "EmulatorError",
    "KubeletEmulator",
    "ListAndWatchRecord",
    "Mount",
    "NodeStatus",
    "NotRegisteredError",
    "PluginCallError",
    "PluginOptions",
    "RegistrationRecord",
    "ResourceSnapshot",
    "StreamEndRecord",
    "check_preferred",
    "device_ids_by_resource",
    "extended_resource_name_problem",
    "query_pod_resources",
    "remove_sockets",
]

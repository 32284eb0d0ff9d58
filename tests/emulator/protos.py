"""grpcio stubs for the kubelet protos, generated when this module is imported.

The agent speaks grpclib + betterproto2; the emulator deliberately uses Google's grpcio and protobuf runtime
compiled from the same .proto files, so a wire-format mistake on either side shows up as a failing test.
Nothing generated is committed: protoc (from grpcio-tools) writes into a cache directory under the system
temp dir, keyed by the protos' content and the tool versions, and the modules are loaded from there.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"

# Flat, prefixed module names: the upstream paths contain "k8s.io", which cannot be a Python package, and both
# files are called api.proto. The proto *package* (v1beta1, v1) is untouched, so method paths on the wire stay
# "/v1beta1.Registration/Register" and so on.
_SOURCES = {
    "deviceplugin_v1beta1": "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1/api.proto",
    "podresources_v1": "k8s.io/kubelet/pkg/apis/podresources/v1/api.proto",
}
_MODULE_PREFIX = "cpupool_emulator_"


class ProtoGenerationError(RuntimeError):
    """protoc could not compile the kubelet protos; the message carries protoc's exit status."""


@dataclass(frozen=True)
class Stubs:
    """Message classes (`pb2`) and service stubs/servicer helpers (`grpc`) of one proto file."""

    pb2: ModuleType
    grpc: ModuleType


def _tool_versions() -> str:
    # Generated code checks the runtime version it was generated for, so a tool upgrade must miss the cache.
    return ";".join(f"{name}={importlib.metadata.version(name)}" for name in ("grpcio-tools", "protobuf"))


def cache_dir() -> Path:
    """Directory holding the generated modules for the current protos and tool versions."""
    digest = hashlib.sha256(_tool_versions().encode())
    for key in sorted(_SOURCES):
        digest.update(key.encode())
        digest.update((PROTO_ROOT / _SOURCES[key]).read_bytes())
    return Path(tempfile.gettempdir()) / "cpupool-emulator-protos" / digest.hexdigest()[:16]


def _generate(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=target.parent))
    try:
        src = staging / "src"
        out = staging / "out"
        src.mkdir()
        out.mkdir()
        files = []
        for key, rel in _SOURCES.items():
            name = f"{_MODULE_PREFIX}{key}.proto"
            shutil.copyfile(PROTO_ROOT / rel, src / name)
            files.append(name)
        status = protoc.main(
            ["grpc_tools.protoc", f"-I{src}", f"--python_out={out}", f"--grpc_python_out={out}", *files]
        )
        if status != 0:
            raise ProtoGenerationError(
                f"protoc exited with status {status} compiling {sorted(_SOURCES.values())}"
            )
        try:
            # Atomic publish: concurrent test processes may race; the loser simply uses the winner's copy.
            os.rename(out, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_module(directory: Path, name: str) -> ModuleType:
    existing = sys.modules.get(name)
    if existing is not None:
        return existing
    spec = importlib.util.spec_from_file_location(name, directory / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ProtoGenerationError(f"cannot load generated module {name} from {directory}")
    module = importlib.util.module_from_spec(spec)
    # Registered before executing: the *_pb2_grpc module imports its *_pb2 sibling by this bare name.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _load(key: str) -> Stubs:
    directory = cache_dir()
    if not directory.is_dir():
        _generate(directory)
    base = f"{_MODULE_PREFIX}{key}"
    pb2 = _load_module(directory, f"{base}_pb2")
    grpc_module = _load_module(directory, f"{base}_pb2_grpc")
    return Stubs(pb2=pb2, grpc=grpc_module)


DEVICEPLUGIN: Stubs = _load("deviceplugin_v1beta1")
"""v1beta1: Registration (served by the kubelet) and DevicePlugin (served by plugins)."""

PODRESOURCES: Stubs = _load("podresources_v1")
"""v1: PodResourcesLister (served by the kubelet)."""

"""What the webhook, the agent and the process-starter agree on: paths, environment names, reserved names.

Kept free of heavy imports: the starter bundles this module, the webhook imports it too, so both read
one definition. The per-pool variable rule is the agent's (`agent.config.pool_env_name`); a test checks
that the two agree.
"""

from __future__ import annotations

import re

# The starter bundle, laid out once per node by the agent's DaemonSet (an init container), mounted
# read-only into wrapped containers at the same path. The executable's ELF interpreter and library
# path point inside this directory, so it runs in an empty root and never unpacks itself.
STARTER_DIR = "/opt/cpupool/process-starter"
STARTER_PATH = f"{STARTER_DIR}/process-starter"
PODINFO_DIR = "/opt/cpupool/podinfo"
ANNOTATIONS_FILE = f"{PODINFO_DIR}/annotations"

# Set by the webhook on every wrapped container.
ENV_CONTAINER_NAME = "CONTAINER_NAME"
ENV_POOLS = "CPUPOOL_POOLS"
ENV_ANNOTATION = "CPUPOOL_ANNOTATION"
ENV_ANNOTATIONS_FILE = "CPUPOOL_ANNOTATIONS_FILE"

# Set by the agent's Allocate (never by a pod: the webhook refuses pods that set them).
ENV_EXCLUSIVE = "EXCLUSIVE_CPUS"
ENV_SHARED = "SHARED_CPUS"
_POOL_ENV = re.compile(r"^CPUPOOL_[A-Z0-9_]+_CPUS$")

# Read by the starter only; a pod may set them.
ENV_GRACE = "CPUPOOL_STOP_GRACE_SECONDS"
ENV_LOG_LEVEL = "CPUPOOL_LOG_LEVEL"
# Where sysfs is mounted (tests point it at a fake tree); default "/".
ENV_SYS_ROOT = "CPUPOOL_SYS_ROOT"

DEFAULT_RESOURCE_BASE_NAME = "cpupool.io"
ANNOTATION_SUFFIX = "cpus"


def pool_env_name(pool: str) -> str:
    """The per-pool variable the agent's Allocate sets: ``CPUPOOL_<POOL>_CPUS``."""
    return "CPUPOOL_" + re.sub(r"[^A-Z0-9]", "_", pool.upper()) + "_CPUS"


def is_reserved_env(name: str) -> bool:
    """True for a name that only the agent's Allocate may set: a pod setting it forges a CPU claim."""
    return name in (ENV_EXCLUSIVE, ENV_SHARED) or _POOL_ENV.match(name) is not None


def annotation_key(resource_base_name: str) -> str:
    return f"{resource_base_name}/{ANNOTATION_SUFFIX}"

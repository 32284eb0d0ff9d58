"""What `cpupool agent` keeps out of its start: OpenSSL until it needs TLS, importlib.metadata, the GC.

Imported first by agent.cli, for its effect on an agent process (`cpupool agent ...`, the command first) that
has not imported asyncio yet; other commands (the webhook serves TLS) and processes that did are left alone.
Both are measured in docs/benchmarks.md, "RSS, start and idle: where they go".

OpenSSL. The agent speaks gRPC on unix sockets and plain HTTP on its health port, and signs its claims with
HMAC-SHA256, which CPython also implements without OpenSSL. Yet asyncio and grpclib import `ssl` whenever it
can be imported, and hashlib prefers OpenSSL's `_hashlib`: together they map libssl and libcrypto and build
OpenSSL's tables, 4.5 MiB of the agent's RSS (14 % of its 32 MiB budget) and 10-20 ms of its start. Both are
marked as not importable (None in sys.modules: Python's documented way to make an import fail), so asyncio and
grpclib take their no-TLS path and hashlib its built-in hashes; each is written to handle that ImportError.
The one part that needs TLS, the API client for node labels (lightkube, through httpx and anyio), calls
`allow_tls()` before it loads; its TLS runs on memory BIOs of its own, not on asyncio's transports, so
asyncio having seen no `ssl` does not matter.

The cyclic garbage collector. Over the imports alone it runs 70 times, each time walking what was
allocated so far, and frees 484 objects in all (a few cycles made by class creation): start-up's garbage is
freed by reference counting. It is off from here until the kubelet has every resource's first list
(`started()`, from agent.cli), then on as usual: 8-10 ms less of the agent's imports, and the first plan
(12,000 or 200,000 devices) is built without collections either.

importlib.metadata. betterproto2 reads its own version through it at import, for the generated code's
compiler-version check; that loads email, csv, zipfile and 30 more modules: 1.6 MiB and about 15 ms. The
version is the one in the name of betterproto2's dist-info directory, which is read here instead, and
`betterproto2._version` is provided with the same two names and the same check. When the directory is not
found (another kind of install), betterproto2 is left to read it itself.
"""

from __future__ import annotations

import gc
import importlib.util
import sys
import types
from collections.abc import Iterable
from pathlib import Path

# The modules that load OpenSSL: the TLS module and hashlib's OpenSSL backend.
OPENSSL_MODULES = ("ssl", "_hashlib")
BETTERPROTO_VERSION_MODULE = "betterproto2._version"


def is_agent_process(argv: list[str]) -> bool:
    """`cpupool agent ...` that has imported nothing of what this module keeps out yet."""
    if len(argv) < 2 or argv[1] != "agent":
        return False
    return "asyncio" not in sys.modules and not any(name in sys.modules for name in OPENSSL_MODULES)


def keep_tls_out() -> None:
    for name in OPENSSL_MODULES:
        sys.modules[name] = None  # type: ignore[assignment]


def tls_kept_out() -> bool:
    return sys.modules.get("ssl", sys) is None


def allow_tls() -> None:
    """Let TLS in again (before a client that needs it is imported)."""
    for name in OPENSSL_MODULES:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


_collector_paused = False


def started() -> None:
    """The agent has served its first plan: the garbage collector runs again (if lean_start paused it).

    What the start made (modules, classes, the first plan) lives as long as the process: one collection now,
    then `gc.freeze()` moves the survivors out of the collector's generations, so no later full collection
    walks them again. A full collection is one pause of the event loop, as long as what it walks is large
    (docs/benchmarks.md, the replan's loop gap)."""
    global _collector_paused  # noqa: PLW0603
    if _collector_paused:
        _collector_paused = False
        gc.collect()
        gc.freeze()
        gc.enable()


def dist_info_version(distribution: str, where: Iterable[str] | None = None) -> str | None:
    """An installed distribution's version from the name of its dist-info directory in `where` (default:
    every directory on sys.path), what `importlib.metadata.version` reads for a wheel install, without
    importing anything. None unless exactly one is found: none, or stale ones beside the real one, and the
    caller lets importlib.metadata answer."""
    found = [
        entry.name
        for directory in (sys.path if where is None else where)
        if Path(directory or ".").is_dir()
        for entry in Path(directory or ".").glob(f"{distribution}-*.dist-info")
    ]
    if len(found) != 1:
        return None
    return found[0].removeprefix(f"{distribution}-").removesuffix(".dist-info")


def betterproto_version() -> str | None:
    """betterproto2's installed version, looked up only beside the package (the agent's start path: the
    standard library's directories on sys.path are large)."""
    spec = importlib.util.find_spec("betterproto2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return dist_info_version("betterproto2", [str(Path(next(iter(spec.submodule_search_locations))).parent)])


def provide_betterproto_version(version: str) -> None:
    """`betterproto2._version` as betterproto2 0.10 has it: `__version__` and `check_compiler_version`."""
    module = types.ModuleType(BETTERPROTO_VERSION_MODULE, "betterproto2's version, read by agent.leanstart")

    def check_compiler_version(compiler_version: str) -> None:
        # The rule of betterproto2's own check: code from compiler a.b.c runs on library x.y.z iff a.b == x.y.
        ours = tuple(int(x) for x in version.split(".")[:2])
        theirs = tuple(int(x) for x in compiler_version.split(".")[:2])
        if ours != theirs:
            raise ImportError(
                f"the generated code needs betterproto2 {theirs[0]}.{theirs[1]}.x (compiled by "
                f"betterproto2_compiler {compiler_version}); betterproto2 {version} is installed"
            )

    module.__dict__.update(__version__=version, check_compiler_version=check_compiler_version)
    sys.modules[BETTERPROTO_VERSION_MODULE] = module


def lean_start(argv: list[str]) -> bool:
    """For an agent process: keep OpenSSL and importlib.metadata out, the collector off. True when it did."""
    if not is_agent_process(argv):
        return False
    global _collector_paused  # noqa: PLW0603 - one process-wide switch, set once here
    _collector_paused = gc.isenabled()
    gc.disable()
    keep_tls_out()
    if BETTERPROTO_VERSION_MODULE not in sys.modules:
        version = betterproto_version()
        if version is not None:
            provide_betterproto_version(version)
    return True


lean_start(sys.argv)

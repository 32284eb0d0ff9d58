"""`cpupool agent` keeps OpenSSL out of its process until it needs TLS.

The agent speaks gRPC on unix sockets and plain HTTP on its health port, and signs its claims with
HMAC-SHA256, which CPython also implements without OpenSSL. Yet asyncio and grpclib import `ssl` whenever it
can be imported, and hashlib prefers OpenSSL's `_hashlib`: together they map libssl and libcrypto into the
agent and build OpenSSL's tables, 4.5 MiB of its RSS (14 % of the 32 MiB budget) and 10-20 ms of its start
(docs/benchmarks.md, "RSS, start and idle: where they go").

Imported first by agent.cli, this module marks both as not importable in an agent process (None in
sys.modules: Python's documented way to make an import fail). asyncio and grpclib then take their no-TLS path
and hashlib its built-in hashes; each is written to handle that ImportError. The one part that needs TLS,
the API client for node labels (lightkube, through httpx and anyio), calls `allow()` before it loads; its TLS
runs on memory BIOs of its own, not on asyncio's transports, so asyncio having seen no `ssl` does not matter.
Other commands (the webhook serves TLS) and processes that imported asyncio already are left alone.
"""

from __future__ import annotations

import sys

# The modules that load OpenSSL: the TLS module and hashlib's OpenSSL backend.
OPENSSL_MODULES = ("ssl", "_hashlib")


def keep_out(argv: list[str]) -> bool:
    """For `cpupool agent ...` (the command first), before asyncio is imported: make the OpenSSL modules
    unimportable. True when it did."""
    if len(argv) < 2 or argv[1] != "agent":
        return False
    if "asyncio" in sys.modules or any(name in sys.modules for name in OPENSSL_MODULES):
        return False  # too late to matter, or something here already uses them
    for name in OPENSSL_MODULES:
        sys.modules[name] = None  # type: ignore[assignment]
    return True


def kept_out() -> bool:
    return sys.modules.get("ssl", sys) is None


def allow() -> None:
    """Let TLS in again (before a client that needs it is imported)."""
    for name in OPENSSL_MODULES:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


keep_out(sys.argv)

"""Shared pytest set-up."""

# Imported at start-up, not lazily by its pytest plugin at the end of the session: a late import there
# trips a CPython 3.11 bug ("AST constructor recursion depth mismatch", python/cpython#106905) after
# runs that used many threads.
import hypothesis  # noqa: F401

# Kubelet peers (the grpcio emulator and the kubelet's own device manager) and their fixtures; the real
# API server (kube-apiserver and etcd from tests/apiserver) and its fixtures.
pytest_plugins = ["tests.peers.fixtures", "tests.peers.apiserver_fixtures"]

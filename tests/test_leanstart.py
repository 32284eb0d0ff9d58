"""`cpupool agent` runs without OpenSSL until the label client needs TLS, and without importlib.metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from agent import leanstart

REPO = Path(__file__).resolve().parent.parent

# What an agent process loads on its way to serving, then what the label client would do.
PROBE = """
import json, sys
import agent.cli, agent.supervisor, agent.health, agent.nri.plugin
import betterproto2
from agent import leanstart

def openssl_mapped():
    return any("libssl" in line or "libcrypto" in line for line in open("/proc/self/maps"))

import gc
report = {
    "collector_during_start": gc.isenabled(),
    "kept_out": leanstart.tls_kept_out(),
    "mapped_before": openssl_mapped(),
    "metadata_loaded": "importlib.metadata" in sys.modules,
    "betterproto2": betterproto2.__version__,
}
leanstart.started()
report["collector_after_start"] = gc.isenabled()
leanstart.allow_tls()
import ssl
ssl.create_default_context()
report["mapped_after_allow"] = openssl_mapped()
print(json.dumps(report))
"""


def probe(*argv: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    )
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_an_agent_process_loads_no_openssl_until_tls_is_allowed_and_no_importlib_metadata() -> None:
    report = probe("agent", "--config", "x")
    assert report["kept_out"] is True
    assert report["mapped_before"] is False
    assert report["mapped_after_allow"] is True
    assert report["metadata_loaded"] is False
    # The collector is paused while the agent starts, and runs again once it has served its first plan.
    assert (report["collector_during_start"], report["collector_after_start"]) == (False, True)
    # The version read from the dist-info directory is the one importlib.metadata reports.
    assert report["betterproto2"] == metadata.version("betterproto2")


def test_other_commands_are_left_alone() -> None:
    # The webhook serves TLS; `cpupool status` and the rest are left as they are.
    report = probe("webhook")
    assert report["kept_out"] is False
    assert report["mapped_before"] is True
    assert report["metadata_loaded"] is True
    assert report["collector_during_start"] is True


def test_claims_sign_and_verify_with_the_built_in_hashes() -> None:
    code = """
import sys
sys.argv = ["cpupool", "agent"]
import agent.cli
from agent import leanstart
from agent.claim import ClaimKey
assert leanstart.tls_kept_out() and "_hashlib" not in {k for k, v in sys.modules.items() if v is not None}
key = ClaimKey(b"k" * 32)
print(key.issue("cpupool.io/fast", ["3", "5"]))
"""
    built_in = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    )
    signed = built_in.stdout.strip()
    from agent.claim import ClaimKey  # noqa: PLC0415 - this process uses OpenSSL's hashes

    claim = ClaimKey(b"k" * 32).verify(signed)
    assert (claim.resource, claim.device_ids) == ("cpupool.io/fast", ("3", "5"))


def test_the_provided_version_check_refuses_code_of_another_minor_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, leanstart.BETTERPROTO_VERSION_MODULE, raising=False)
    leanstart.provide_betterproto_version("0.10.0")
    module = sys.modules[leanstart.BETTERPROTO_VERSION_MODULE]
    module.check_compiler_version("0.10.1")  # same minor: accepted, as betterproto2's own check does
    with pytest.raises(ImportError, match=r"needs betterproto2 0\.11\.x"):
        module.check_compiler_version("0.11.0")

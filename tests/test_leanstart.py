"""`cpupool agent` runs without OpenSSL in its process until the node-label client needs TLS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# What an agent process loads on its way to serving, then what the label client would do.
PROBE = """
import json
import agent.cli, agent.supervisor, agent.health, agent.nri.plugin
from agent import nossl

def openssl_mapped():
    return any("libssl" in line or "libcrypto" in line for line in open("/proc/self/maps"))

report = {"kept_out": nossl.kept_out(), "mapped_before": openssl_mapped()}
nossl.allow()
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


def test_an_agent_process_loads_no_openssl_until_tls_is_allowed() -> None:
    report = probe("agent", "--config", "x")
    assert report["kept_out"] is True
    assert report["mapped_before"] is False
    assert report["mapped_after_allow"] is True


def test_other_commands_keep_openssl() -> None:
    # The webhook serves TLS; `cpupool status` and the rest are left as they are.
    report = probe("webhook")
    assert report["kept_out"] is False
    assert report["mapped_before"] is True


def test_claims_sign_and_verify_with_the_built_in_hashes() -> None:
    code = """
import sys
sys.argv = ["cpupool", "agent"]
import agent.cli
from agent import nossl
from agent.claim import ClaimKey
assert nossl.kept_out() and "_hashlib" not in {k for k, v in sys.modules.items() if v is not None}
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

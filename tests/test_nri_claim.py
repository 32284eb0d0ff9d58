"""Signed Allocate claims (agent/claim.py) and their key file (agent/ledger.claim_key)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.claim import ClaimError, ClaimKey, annotation_key, read_claims
from agent.ledger import CLAIM_KEY_FILE, LedgerError, claim_key
from agent.mutation import MutationSettings, PodRejected, mutate_pod
from agent.plan import shared_device_id
from agent.supervisor import load_claim_key
from tests.harness import running_agent

KEY = ClaimKey(b"k" * 32)


def test_a_claim_verifies_to_what_was_issued() -> None:
    text = KEY.issue("cpupool.io/fast", ["7", "3", "12"])
    assert text is not None
    claim = KEY.verify(text)
    assert claim.resource == "cpupool.io/fast"
    assert sorted(claim.device_ids) == ["12", "3", "7"]


def test_thousands_of_millicpus_travel_as_ranges() -> None:
    ids = [shared_device_id(i) for i in range(5000)]
    text = KEY.issue("cpupool.io/shared", ids)
    assert text is not None and len(text) < 120
    assert set(KEY.verify(text).device_ids) == set(ids)


def test_ids_that_are_not_base36_numbers_travel_as_a_list() -> None:
    text = KEY.issue("cpupool.io/x", ["007", "A1"])
    assert text is not None
    assert KEY.verify(text).device_ids == ("007", "A1")


def test_every_allocate_gets_its_own_nonce() -> None:
    first, second = KEY.issue("cpupool.io/fast", ["1"]), KEY.issue("cpupool.io/fast", ["1"])
    assert first is not None and second is not None
    assert KEY.verify(first).nonce != KEY.verify(second).nonce


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: t.replace(";r1;", ";r1-9;"),  # more devices
        lambda t: t.replace("cpupool.io/fast", "cpupool.io/slow"),  # another resource
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # another MAC
        lambda t: t.rpartition(";")[0],  # no MAC
        lambda t: "",
    ],
)
def test_an_altered_claim_does_not_verify(tamper: object) -> None:
    text = KEY.issue("cpupool.io/fast", ["1"])
    assert text is not None and callable(tamper)
    with pytest.raises(ClaimError):
        KEY.verify(tamper(text))


def test_another_agents_key_does_not_verify() -> None:
    text = ClaimKey(b"o" * 32).issue("cpupool.io/fast", ["1"])
    assert text is not None
    with pytest.raises(ClaimError, match="MAC"):
        KEY.verify(text)


def test_read_claims_keeps_valid_ones_and_names_the_rest() -> None:
    fast = KEY.issue("cpupool.io/fast", ["2", "3"])
    shared = KEY.issue("cpupool.io/shared", ["0", "1"])
    assert fast is not None and shared is not None
    found = read_claims(
        KEY,
        {
            annotation_key("cpupool.io/fast"): fast,
            # A valid claim of one resource under another resource's key counts for nothing.
            annotation_key("cpupool.io/multi"): shared,
            "cpupool.io/claim-forged": "1;cpupool.io/forged;n;r0-99;AAAAAAAAAAAAAAAAAAAAAA",
            "cpupool.io/cpus-fast": "2,3",
            "io.kubernetes.container.hash": "abc",
        },
    )
    assert found.devices() == {"cpupool.io/fast": ("2", "3")}
    assert len(found.invalid) == 2
    assert any("another resource's key" in reason for reason in found.invalid)


def test_the_key_is_made_once_kept_private_and_read_back(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = claim_key(state)
    assert len(first) == 32
    assert (state / CLAIM_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert claim_key(state) == first
    assert not [p for p in state.iterdir() if p.name.endswith(".tmp")]


def test_a_damaged_or_exposed_key_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / CLAIM_KEY_FILE
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(LedgerError, match="5 bytes"):
        claim_key(tmp_path)
    path.write_bytes(b"x" * 32)
    os.chmod(path, 0o644)
    with pytest.raises(LedgerError, match="chmod 600"):
        claim_key(tmp_path)
    # The agent still signs claims, with a key for this run only.
    assert load_claim_key(tmp_path).issue("cpupool.io/fast", ["1"]) is not None


async def test_allocate_answers_carry_a_claim_the_agent_verifies_after_a_restart(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        await agent.emu.wait_devices("cpupool.io/fast")
        result = await agent.emu.allocate("cpupool.io/fast", 2, pod="db")
    claim_text = result.annotations[annotation_key("cpupool.io/fast")]
    # The next agent on this node reads the same key from its state directory.
    restarted = load_claim_key(tmp_path / "state")
    claim = restarted.verify(claim_text)
    assert claim.resource == "cpupool.io/fast"
    assert sorted(claim.device_ids) == sorted(result.device_ids)
    # The claim is an annotation only: nothing in the environment a workload could read and copy.
    assert not any(claim_text in value for value in result.envs.values())


def test_the_webhook_refuses_a_pod_that_carries_a_claim_annotation() -> None:
    pod = {
        "metadata": {
            "annotations": {"cpupool.io/claim-fast": "1;cpupool.io/fast;n;r2;AAAA", "other.io/claim-x": "y"}
        },
        "spec": {"containers": [{"name": "app", "image": "busybox"}]},
    }
    with pytest.raises(PodRejected) as refused:
        mutate_pod(pod, MutationSettings())
    assert refused.value.problems == [
        "annotation cpupool.io/claim-fast: only the kubelet sets cpupool.io/claim-* annotations, on "
        "containers, from the cpupool agent's Allocate answers; remove it from the pod"
    ]


def test_a_state_directory_that_cannot_be_written_leaves_the_agent_signing(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(LedgerError, match=CLAIM_KEY_FILE):
        claim_key(blocked / "state")
    assert load_claim_key(blocked / "state").issue("cpupool.io/fast", ["1"]) is not None


def test_ids_in_any_order_or_with_gaps_verify_to_the_same_devices() -> None:
    for ids in (("3", "2"), ("0", "2", "1"), tuple(shared_device_id(i) for i in (5, 9, 1000))):
        text = KEY.issue("cpupool.io/shared", ids)
        assert text is not None
        assert sorted(KEY.verify(text).device_ids) == sorted(ids)
    assert KEY.issue("cpupool.io/x", ["a,b"]) is None and KEY.issue("cpupool.io/x", [""]) is None

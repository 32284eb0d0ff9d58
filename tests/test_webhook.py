"""The admission webhook: the pod it produces (patches applied with the jsonpatch library), the pods it
refuses and why, and the HTTPS server (real TLS with generated certificates, reload without restart)."""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import ipaddress
import json
import os
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import cli
from agent.config import parse_config
from agent.config import pool_env_name as config_pool_env_name
from agent.mutation import (
    ANNOTATIONS_FILE,
    PODINFO_DIR,
    STARTER_DIR,
    STARTER_PATH,
    Mutation,
    MutationSettings,
    PodRejected,
    escape_pointer,
    mutate_pod,
    parse_quantity,
    pointer,
)
from agent.starter.contract import is_reserved_env
from agent.starter.contract import pool_env_name as contract_pool_env_name
from agent.webhook import MAX_BODY_BYTES, CertificateStore, Webhook

BASE = "cpupool.io"
KEY = f"{BASE}/cpus"
CONFIG = parse_config(
    """
pools:
  dedicated: {cpus: "2-5", pooltype: exclusive}
  dedicated-ht: {cpus: "8-15", pooltype: exclusive, hyperThreadingPolicy: multiThreaded}
  shared: {cpus: "6-7", pooltype: shared}
""",
    "test-config",
)
SETTINGS = MutationSettings.from_config(CONFIG)
NO_CONFIG = MutationSettings()
OUR_MOUNTS = {
    STARTER_DIR: ("cpupool-process-starter", True),
    PODINFO_DIR: ("cpupool-podinfo", True),
}


# --- pod builders ---------------------------------------------------------------------------------


def container(
    name: str,
    *,
    command: list[str] | None = None,
    args: list[str] | None = None,
    pools: dict[str, str] | None = None,
    resources: dict[str, Any] | None = None,
    env: list[dict[str, Any]] | None = None,
    mounts: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "image": "example.com/app:1"}
    if command is not None:
        c["command"] = command
    if args is not None:
        c["args"] = args
    if pools is not None or resources is not None:
        res = copy.deepcopy(resources) if resources is not None else {}
        if pools:
            amounts = {f"{BASE}/{pool}": amount for pool, amount in pools.items()}
            # As the API server stores it: a limit alone defaults the request of an extended resource.
            res.setdefault("limits", {}).update(amounts)
            res.setdefault("requests", {}).update(amounts)
        c["resources"] = res
    if env is not None:
        c["env"] = env
    if mounts is not None:
        c["volumeMounts"] = mounts
    return c


def process(proc: str, pool: str, cpus: int, *args: str) -> dict[str, Any]:
    return {"process": proc, "args": list(args), "pool": pool, "cpus": cpus}


def pod(
    *containers: dict[str, Any],
    annotation: list[dict[str, Any]] | str | None = None,
    volumes: list[dict[str, Any]] | None = None,
    init: list[dict[str, Any]] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "p", "namespace": "default"}
    notes = dict(annotations or {})
    if annotation is not None:
        notes[KEY] = annotation if isinstance(annotation, str) else json.dumps(annotation)
    if notes:
        metadata["annotations"] = notes
    spec: dict[str, Any] = {"containers": list(containers)}
    if volumes is not None:
        spec["volumes"] = volumes
    if init is not None:
        spec["initContainers"] = init
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def mutate(p: dict[str, Any], settings: MutationSettings = SETTINGS) -> tuple[dict[str, Any], Mutation]:
    """The mutation and the pod after applying its patch (the input pod is left alone)."""
    before = copy.deepcopy(p)
    mutation = mutate_pod(p, settings)
    assert p == before, "mutate_pod must not change its input"
    return jsonpatch.apply_patch(p, mutation.patch), mutation


def rejected(p: dict[str, Any], settings: MutationSettings = SETTINGS) -> str:
    with pytest.raises(PodRejected) as info:
        mutate_pod(p, settings)
    return str(info.value)


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def assert_wrapped(
    result: dict[str, Any], index: int, pools: str, section: str = "containers"
) -> dict[str, Any]:
    """The container at index starts through the starter with everything the starter reads."""
    c = result["spec"][section][index]
    assert c["command"] == [STARTER_PATH]
    mounts = {m["mountPath"]: (m["name"], bool(m.get("readOnly"))) for m in c["volumeMounts"]}
    assert {path: mounts.get(path) for path in OUR_MOUNTS} == OUR_MOUNTS
    env = env_of(c)
    assert env["CONTAINER_NAME"] == c["name"]
    assert env["CPUPOOL_POOLS"] == pools
    assert env["CPUPOOL_ANNOTATION"] == KEY
    assert env["CPUPOOL_ANNOTATIONS_FILE"] == ANNOTATIONS_FILE
    # The bundle never unpacks itself: no scratch directory, no TMPDIR.
    assert "TMPDIR" not in env
    assert STARTER_PATH.startswith(STARTER_DIR + "/")
    volumes = {v["name"]: v for v in result["spec"]["volumes"]}
    assert volumes["cpupool-process-starter"]["hostPath"] == {"path": STARTER_DIR, "type": "Directory"}
    items = volumes["cpupool-podinfo"]["downwardAPI"]["items"]
    assert items == [{"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]
    assert set(volumes) >= {"cpupool-process-starter", "cpupool-podinfo"}
    return c


def cpu(c: dict[str, Any]) -> tuple[str | None, str | None]:
    res = c.get("resources", {})
    return res.get("requests", {}).get("cpu"), res.get("limits", {}).get("cpu")


# --- what a mutated pod looks like -----------------------------------------------------------------


def test_exclusive_only_container() -> None:
    p = pod(
        container("app", command=["/bin/app"], args=["--fast"], pools={"dedicated": "2"}),
        annotation=[
            {
                "container": "app",
                "processes": [process("/bin/a", "dedicated", 1, "x"), process("/bin/b", "dedicated", 1)],
            }
        ],
    )
    result, mutation = mutate(p)
    c = assert_wrapped(result, 0, "dedicated=exclusive")
    # The original command stays as the starter's arguments (it runs them if the entry ever goes away).
    assert c["args"] == ["/bin/app", "--fast"]
    # The request is what the container holds (its CFS weight), the limit its quota.
    assert cpu(c) == ("2000m", "2100m")
    assert c["resources"]["limits"][f"{BASE}/dedicated"] == "2"
    assert result["metadata"]["annotations"][f"{BASE}/process-starter"] == "app"
    assert result["metadata"]["annotations"][KEY] == p["metadata"]["annotations"][KEY]
    assert mutation.wrapped == ("app",) and mutation.warnings == ()


def test_shared_only_container() -> None:
    p = pod(
        container("app", command=["/bin/app"], pools={"shared": "500"}),
        annotation=[{"container": "app", "processes": [process("/bin/a", "shared", 300)]}],
    )
    result, _ = mutate(p)
    c = assert_wrapped(result, 0, "shared=shared")
    # Request and limit would be equal: the request stays 1m below, so the pod is never Guaranteed.
    assert cpu(c) == ("499m", "500m")


def test_both_pools_in_one_container() -> None:
    p = pod(
        container("app", pools={"dedicated": "1", "shared": "200"}),
        annotation=[
            {
                "container": "app",
                "processes": [process("/bin/rt", "dedicated", 1), process("/bin/ctl", "shared", 200)],
            }
        ],
    )
    result, _ = mutate(p)
    c = assert_wrapped(result, 0, "dedicated=exclusive,shared=shared")
    # 1000m for the exclusive CPU + 1000m for each of the shared pool's 2 CPUs; it holds 1200m.
    assert cpu(c) == ("1200m", "3000m")
    # No command in the pod (the image's entrypoint): only the annotation says what runs.
    assert "args" not in c


def test_two_containers_one_annotated_leaves_the_other_alone() -> None:
    other = container("sidecar", command=["/bin/proxy"], resources={"limits": {"cpu": "1", "memory": "1Gi"}})
    p = pod(
        container("app", command=["/bin/app"], pools={"dedicated": "1"}),
        other,
        annotation=[{"container": "app", "processes": [process("/bin/a", "dedicated", 1)]}],
    )
    result, _ = mutate(p)
    assert_wrapped(result, 0, "dedicated=exclusive")
    assert result["spec"]["containers"][1] == other


def test_no_annotation_with_pool_resources_and_a_command() -> None:
    p = pod(container("app", command=["sh", "-c"], args=["exec worker"], pools={"dedicated": "3"}))
    result, mutation = mutate(p)
    c = assert_wrapped(result, 0, "dedicated=exclusive")
    assert c["args"] == ["sh", "-c", "exec worker"]
    assert cpu(c) == ("3000m", "3100m")
    assert mutation.wrapped == ("app",)


def test_no_annotation_and_no_pools_gets_no_patch() -> None:
    p = pod(container("app", command=["/bin/app"], resources={"limits": {"cpu": "2"}}))
    assert mutate_pod(p, SETTINGS) == Mutation([], ())


def test_pool_resources_without_a_command_are_left_alone_with_a_warning() -> None:
    p = pod(container("app", pools={"shared": "100"}))
    mutation = mutate_pod(p, SETTINGS)
    assert mutation.patch == []
    (warning,) = mutation.warnings
    assert "container 'app'" in warning and "no command" in warning and KEY in warning


@pytest.mark.parametrize(
    ("counts", "node", "limit"),
    [
        ([1, 1], "SMT off: a core is one CPU", "2100m"),
        ([3, 1], "2 threads per core", "4100m"),
        ([6, 2], "4 threads per core (POWER)", "8100m"),
        ([16], "8 threads per core", "16100m"),
    ],
)
def test_multithreaded_counts_fit_any_node_shape(counts: list[int], node: str, limit: str) -> None:
    # Two multiThreaded devices are two whole cores: how many CPUs that is depends on the node, which
    # the webhook cannot see. The annotation's count sets the quota; the starter checks it on the node.
    processes = [process(f"/bin/p{i}", "dedicated-ht", n) for i, n in enumerate(counts)]
    p = pod(
        container("app", pools={"dedicated-ht": "2"}),
        annotation=[{"container": "app", "processes": processes}],
    )
    result, mutation = mutate(p)
    c = assert_wrapped(result, 0, "dedicated-ht=exclusive")
    assert cpu(c) == (f"{sum(counts)}000m", limit), node
    assert mutation.warnings == ()


@pytest.mark.parametrize("counts", [[3], [1, 2, 2], [18]])
def test_multithreaded_counts_that_fit_no_node_are_refused(counts: list[int]) -> None:
    processes = [process(f"/bin/p{i}", "dedicated-ht", n) for i, n in enumerate(counts)]
    p = pod(
        container("app", pools={"dedicated-ht": "2"}),
        annotation=[{"container": "app", "processes": processes}],
    )
    message = rejected(p)
    assert (
        f"take {sum(counts)} CPUs, but the container requests 2 cpupool.io/dedicated-ht, 2 whole cores"
        in message
    )
    assert "(2 with SMT off, 4 with 2 threads per core, 8 with 4)" in message


def test_multithreaded_without_an_entry_gets_no_quota_and_a_warning() -> None:
    p = pod(
        container(
            "app", command=["/bin/app"], pools={"dedicated-ht": "2"}, resources={"limits": {"cpu": "3"}}
        )
    )
    result, mutation = mutate(p)
    c = assert_wrapped(result, 0, "dedicated-ht=exclusive")
    # One CPU per core is all that is sure; no quota rather than a wrong one.
    assert cpu(c) == ("2000m", None)
    (warning,) = mutation.warnings
    assert "depend on the node's threads per core" in warning and "no cpu limit" in warning


def test_a_whole_cpu_request_never_equals_its_limit() -> None:
    p = pod(container("app", command=["/bin/app"], pools={"shared": "1000"}))
    result, _ = mutate(p)
    assert cpu(result["spec"]["containers"][0]) == ("999m", "1000m")


def test_quota_can_be_turned_off_for_exclusive_containers() -> None:
    quota_off = MutationSettings.from_config(CONFIG, exclusive_quota=False)
    p = pod(
        container("rt", command=["/bin/rt"], pools={"dedicated": "1"}, resources={"limits": {"cpu": "4"}}),
        container("ctl", command=["/bin/ctl"], pools={"shared": "300"}),
    )
    result, _ = mutate(p, quota_off)
    rt, ctl = result["spec"]["containers"]
    assert cpu(rt) == ("1000m", None)
    assert rt["resources"]["limits"] == {f"{BASE}/dedicated": "1"}
    assert cpu(ctl) == ("299m", "300m")


def test_without_config_pools_are_checked_against_the_pod_only() -> None:
    # Without the config the webhook cannot tell exclusive from shared: no CPU sums, no cpu limit.
    p = pod(
        container("app", command=["/bin/app"], pools={"anything": "4"}, resources={"limits": {"cpu": "9"}}),
        annotation=[{"container": "app", "processes": [process("/bin/a", "anything", 1)]}],
    )
    result, _ = mutate(p, NO_CONFIG)
    c = assert_wrapped(result, 0, "anything")
    assert cpu(c) == (None, "9")
    unrequested = pod(
        container("app", pools={"a": "1"}),
        annotation=[{"container": "app", "processes": [process("/bin/a", "b", 1)]}],
    )
    assert "does not request cpupool.io/b (it requests: cpupool.io/a)" in rejected(unrequested, NO_CONFIG)


def test_a_custom_resource_base_name_is_followed() -> None:
    custom = MutationSettings(resource_base_name="pools.example.com", pools=CONFIG.pools)
    c = {"name": "app", "command": ["/bin/a"], "resources": {"limits": {"pools.example.com/shared": "100"}}}
    p = {"metadata": {"annotations": {"cpupool.io/cpus": "not even json"}}, "spec": {"containers": [c]}}
    result, _ = mutate(p, custom)
    env = env_of(result["spec"]["containers"][0])
    assert env["CPUPOOL_ANNOTATION"] == "pools.example.com/cpus"
    assert result["metadata"]["annotations"]["pools.example.com/process-starter"] == "app"


def test_existing_starter_variables_are_replaced_and_the_users_tmpdir_is_kept() -> None:
    env = [
        {"name": "CONTAINER_NAME", "value": "stale"},
        {"name": "TMPDIR", "value": "/scratch"},
        {"name": "FROM_FIELD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    p = pod(container("app", command=["/bin/app"], pools={"shared": "100"}, env=env))
    result, _ = mutate(p)
    c = result["spec"]["containers"][0]
    names = [e["name"] for e in c["env"]]
    assert names.count("CONTAINER_NAME") == 1 and env_of(c)["CONTAINER_NAME"] == "app"
    assert env_of(c)["TMPDIR"] == "/scratch"
    assert c["env"][2] == env[2]


def test_mutating_a_mutated_pod_changes_nothing() -> None:
    # reinvocationPolicy IfNeeded, or a pod spec copied from a running pod, brings the webhook's own work.
    p = pod(
        container("app", command=["/bin/app"], args=["-v"], pools={"dedicated": "1", "shared": "100"}),
        container("side", command=["/bin/side"], pools={"shared": "100"}),
        annotation=[{"container": "app", "processes": [process("/bin/a", "dedicated", 1)]}],
    )
    once, _ = mutate(p)
    twice, _ = mutate(once)
    assert twice == once


# --- init containers, native sidecars, ephemeral containers ---------------------------------------


def test_init_containers_and_native_sidecars_are_wrapped_like_containers() -> None:
    setup = container("setup", command=["/bin/setup"], pools={"dedicated": "1"})
    proxy = {**container("proxy", pools={"shared": "200"}), "restartPolicy": "Always"}
    plain = container("plain-init", command=["/bin/true"])
    p = pod(
        container("app", command=["/bin/app"], pools={"dedicated": "2"}),
        init=[plain, setup, proxy],
        annotation=_one(process("/bin/envoy", "shared", 200), name="proxy"),
    )
    result, mutation = mutate(p)
    # Init containers first, in the order the kubelet starts them.
    assert mutation.wrapped == ("setup", "proxy", "app")
    assert result["spec"]["initContainers"][0] == plain
    init = assert_wrapped(result, 1, "dedicated=exclusive", section="initContainers")
    assert init["args"] == ["/bin/setup"] and cpu(init) == ("1000m", "1100m")
    sidecar = assert_wrapped(result, 2, "shared=shared", section="initContainers")
    assert sidecar["restartPolicy"] == "Always" and "args" not in sidecar
    assert cpu(sidecar) == ("199m", "200m")
    app = assert_wrapped(result, 0, "dedicated=exclusive")
    assert cpu(app) == ("2000m", "2100m")
    assert result["metadata"]["annotations"][f"{BASE}/process-starter"] == "setup,proxy,app"
    # The pod's volumes are added once, for all of them; a second pass changes nothing.
    assert [v["name"] for v in result["spec"]["volumes"]] == ["cpupool-process-starter", "cpupool-podinfo"]
    assert mutate(result)[0] == result


def test_a_sidecars_annotation_entry_is_checked_like_a_containers() -> None:
    proxy = {**container("proxy", pools={"dedicated": "2"}), "restartPolicy": "Always"}
    p = pod(
        container("app"), init=[proxy], annotation=_one(process("/bin/envoy", "dedicated", 1), name="proxy")
    )
    assert "sidecar container 'proxy': its processes on exclusive pool 'dedicated' take 1 CPUs" in rejected(p)


def test_ephemeral_containers_are_never_wrapped() -> None:
    # Ephemeral containers come later through their own subresource and cannot request resources; a pod
    # object that lists them (a copied spec) is wrapped as usual and they stay as they are.
    debug = {"name": "debug", "image": "busybox", "command": ["sh"]}
    p = pod(container("app", command=["/bin/app"], pools={"shared": "100"}))
    p["spec"]["ephemeralContainers"] = [debug]
    result, mutation = mutate(p)
    assert mutation.wrapped == ("app",)
    assert result["spec"]["ephemeralContainers"] == [debug]


# --- variables only the agent may set ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "kind", "names"),
    [
        ("containers", "container", ["EXCLUSIVE_CPUS"]),
        ("containers", "container", ["SHARED_CPUS", "CPUPOOL_DEDICATED_CPUS"]),
        ("initContainers", "init container", ["CPUPOOL_SOME_OTHER_POOL_CPUS"]),
        ("sidecar", "sidecar container", ["EXCLUSIVE_CPUS"]),
        ("ephemeralContainers", "ephemeral container", ["SHARED_CPUS"]),
    ],
)
def test_a_pod_that_sets_the_agents_variables_is_refused(section: str, kind: str, names: list[str]) -> None:
    env = [{"name": n, "value": "2,3"} for n in names] + [{"name": "CPUPOOL_POOLS", "value": "mine"}]
    forged = container("forger", command=["/bin/x"], env=env)
    p = pod(container("app", command=["/bin/app"], pools={"dedicated": "1"}))
    if section == "containers":
        p["spec"]["containers"].append(forged)
    elif section == "ephemeralContainers":
        p["spec"]["ephemeralContainers"] = [forged]
    else:
        p["spec"]["initContainers"] = [
            {**forged, "restartPolicy": "Always"} if section == "sidecar" else forged
        ]
    message = rejected(p)
    assert f"{kind} 'forger' sets {', '.join(sorted(names))}: only the cpupool agent sets these" in message
    # The webhook's own variable and look-alikes are not reserved.
    assert "CPUPOOL_POOLS" not in message


def test_the_reserved_names_are_the_agents_variable_names() -> None:
    assert is_reserved_env("EXCLUSIVE_CPUS") and is_reserved_env("SHARED_CPUS")
    for name in ("CPUPOOL_POOLS", "CPUPOOL_ANNOTATION", "CPUPOOL_CPUS", "EXCLUSIVE_CPUS_X", "cpupool_a_cpus"):
        assert not is_reserved_env(name), name


@given(st.from_regex(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", fullmatch=True))
def test_the_starters_pool_variable_rule_is_the_agents(pool: str) -> None:
    assert contract_pool_env_name(pool) == config_pool_env_name(pool)
    assert is_reserved_env(config_pool_env_name(pool))


def test_containers_wrapped_by_the_one_file_starter_are_left_alone() -> None:
    # A spec copied from a pod that an earlier version wrapped: its /opt/bin/process-starter mount and
    # command stay as they were (the file stays on the nodes); the other containers are wrapped as usual.
    old = container("old", command=["/opt/bin/process-starter"], args=["/bin/app"], pools={"shared": "100"})
    p = pod(old, container("new", command=["/bin/app"], pools={"shared": "100"}))
    result, mutation = mutate(p)
    assert mutation.wrapped == ("new",)
    assert result["spec"]["containers"][0] == old


def test_pointer_tokens_are_escaped() -> None:
    assert escape_pointer("cpupool.io/cpus") == "cpupool.io~1cpus"
    assert escape_pointer("a~b/c") == "a~0b~1c"
    doc = {"m": {"a~b/c": 1}}
    patched = jsonpatch.apply_patch(doc, [{"op": "replace", "path": pointer("m", "a~b/c"), "value": 2}])
    assert patched == {"m": {"a~b/c": 2}}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2", 2),
        (3, 3),
        ("1k", 1000),
        ("2Ki", 2048),
        ("1e3", 1000),
        ("1500m", None),
        ("0.5", None),
        ("x", None),
    ],
)
def test_extended_resource_quantities(text: str | int, value: int | None) -> None:
    if value is None:
        with pytest.raises(ValueError, match="not"):
            parse_quantity(text)
    else:
        assert parse_quantity(text) == value


# --- every pod shape -------------------------------------------------------------------------------

ABSENT = object()


def _maybe(draw: st.DrawFn, value: Any) -> Any:
    """The value, a null, or nothing at all: the three ways a field may come."""
    return draw(st.sampled_from([value, None, ABSENT]))


@st.composite
def pod_shapes(draw: st.DrawFn) -> dict[str, Any]:
    containers = []
    names = draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=4, unique=True))
    for name in names:
        c: dict[str, Any] = {"name": name}
        pools = draw(
            st.dictionaries(st.sampled_from(["dedicated", "dedicated-ht", "shared"]), st.integers(1, 3))
        )
        resources: dict[str, Any] = {}
        for section in ("limits", "requests"):
            extra = draw(st.sampled_from([{}, {"cpu": "1"}, {"memory": "1Gi"}]))
            values = {**extra, **{f"{BASE}/{p}": str(n) for p, n in pools.items()}}
            field = _maybe(draw, values) if not pools else values
            if field is not ABSENT:
                resources[section] = field
        res_field = resources if pools else _maybe(draw, resources)
        fields = {
            "resources": res_field,
            "command": _maybe(draw, ["/bin/app", "--x"]),
            "args": _maybe(draw, ["y"]),
            "env": _maybe(draw, draw(st.sampled_from([[], [{"name": "A", "value": "1"}]]))),
            "volumeMounts": _maybe(
                draw, draw(st.sampled_from([[], [{"name": "data", "mountPath": "/data"}]]))
            ),
        }
        c.update({k: v for k, v in fields.items() if v is not ABSENT})
        containers.append(c)
    spec: dict[str, Any] = {"containers": containers}
    volumes = _maybe(draw, draw(st.sampled_from([[], [{"name": "data", "emptyDir": {}}]])))
    if volumes is not ABSENT:
        spec["volumes"] = volumes
    metadata: dict[str, Any] = {"name": "p"}
    notes = _maybe(draw, draw(st.sampled_from([{}, {"team": "x"}])))
    if notes is not ABSENT:
        metadata["annotations"] = notes
    return {"metadata": metadata, "spec": spec}


@given(pod_shapes())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_the_patch_applies_to_any_pod_shape(p: dict[str, Any]) -> None:
    result, mutation = mutate(p)
    before = p["spec"]["containers"]
    after = result["spec"]["containers"]
    for index, (old, new) in enumerate(zip(before, after, strict=True)):
        pooled = any(k.startswith(BASE + "/") for k in (old.get("resources") or {}).get("limits") or {})
        if pooled and old.get("command"):
            assert_wrapped(result, index, env_of(new)["CPUPOOL_POOLS"])
            assert new["args"] == [*old["command"], *(old.get("args") or [])]
            request, limit = cpu(new)
            assert request is not None and request.endswith("m")
            # No annotation here: a multiThreaded pool leaves the quota unknown, anything else sets it.
            multi = f"{BASE}/dedicated-ht" in new["resources"]["limits"]
            assert (limit is None) == multi
            # What the pod had stays: the user's env and mounts come first, untouched.
            assert new["env"][: len(old.get("env") or [])] == (old.get("env") or [])
            assert new["volumeMounts"][: len(old.get("volumeMounts") or [])] == (
                old.get("volumeMounts") or []
            )
        else:
            assert new == old
    if mutation.patch:
        assert result["spec"]["volumes"][: len(p["spec"].get("volumes") or [])] == (
            p["spec"].get("volumes") or []
        )
        assert mutate(result)[0] == result


# --- pods the webhook refuses ----------------------------------------------------------------------


def _one(*processes: dict[str, Any], name: str = "app") -> list[dict[str, Any]]:
    return [{"container": name, "processes": list(processes)}]


@pytest.mark.parametrize(
    ("p", "says"),
    [
        (
            pod(
                container("app", pools={"dedicated": "1"}),
                annotation=_one(process("/a", "dedicated", 1), name="db"),
            ),
            "the pod has no container 'db' (containers: 'app')",
        ),
        (
            {
                **pod(
                    container("app", pools={"dedicated": "1"}),
                    annotation=_one(process("/a", "dedicated", 1), name="debug"),
                ),
                "spec": {
                    "containers": [container("app", pools={"dedicated": "1"})],
                    "ephemeralContainers": [{"name": "debug", "image": "x"}],
                },
            },
            "'debug' is an ephemeral container; they cannot request pool resources, so they cannot be pinned",
        ),
        (
            pod(container("app", pools={"shared": "100"}), annotation=_one(process("/a", "dedicated", 1))),
            "process 0 (/a) runs on pool 'dedicated', but the container does not request "
            "cpupool.io/dedicated (it requests: cpupool.io/shared)",
        ),
        (
            pod(container("app", pools={"dedicated": "1"}), annotation=_one(process("/a", "gpu", 1))),
            "pool 'gpu' is not in the pool config (pools: dedicated, dedicated-ht, shared)",
        ),
        (
            pod(container("app", pools={"dedicated": "2"}), annotation=_one(process("/a", "dedicated", 1))),
            "its processes on exclusive pool 'dedicated' take 1 CPUs, but the container requests "
            "2 cpupool.io/dedicated = 2 CPUs",
        ),
        (
            pod(
                container("app", pools={"dedicated-ht": "1"}),
                annotation=_one(process("/a", "dedicated-ht", 9)),
            ),
            "must add up to 1 times the node's threads per core (1 with SMT off, 2 with 2 threads per core",
        ),
        (
            pod(
                container("app", pools={"shared": "300"}),
                annotation=_one(process("/a", "shared", 200), process("/b", "shared", 200)),
            ),
            "ask for 400 millicpus, more than the container's request of 300 cpupool.io/shared",
        ),
        (
            pod(container("app", pools={"shared": "1"}), annotation="[{"),
            "annotation cpupool.io/cpus: not valid JSON",
        ),
        (
            pod(container("app", pools={"shared": "1"}), annotation=_one(process("/a", "shared", 0))),
            "$[0].processes[0].cpus: 0 is less than the minimum of 1",
        ),
        (
            pod(container("app", command=["/a"], pools={"shared": "1500m"})),
            "spec.containers[0].resources.limits[cpupool.io/shared]: '1500m' is not a whole number",
        ),
        (
            pod(
                container("app", command=["/a"], pools={"shared": "1"}),
                volumes=[{"name": "cpupool-podinfo", "configMap": {"name": "mine"}}],
            ),
            "the pod already has a volume named 'cpupool-podinfo' that the webhook did not add",
        ),
        (
            pod(
                container(
                    "app",
                    command=["/a"],
                    pools={"shared": "1"},
                    mounts=[{"name": "tools", "mountPath": STARTER_DIR}],
                ),
            ),
            f"container 'app' already mounts volume 'tools' at {STARTER_DIR}",
        ),
        ({"metadata": {}, "spec": {"containers": {"name": "app"}}}, "spec.containers must be an array"),
        ({"metadata": {}, "spec": {"containers": [{"image": "x"}]}}, "spec.containers[0].name must be"),
    ],
)
def test_each_fault_is_refused_with_what_to_fix(p: dict[str, Any], says: str) -> None:
    assert says in rejected(p)


def test_every_fault_of_a_pod_is_reported_together() -> None:
    p = pod(
        container("app", pools={"dedicated": "1"}),
        annotation=[
            {"container": "app", "processes": [process("/a", "dedicated", 2)]},
            {"container": "ghost", "processes": [process("/b", "shared", 1)]},
        ],
    )
    message = rejected(p)
    assert "take 2 CPUs" in message and "no container 'ghost'" in message


# --- the HTTPS server ------------------------------------------------------------------------------


def make_cert(directory: Path, name: str) -> tuple[Path, Path, bytes]:
    """A self-signed serving certificate for 127.0.0.1 and localhost: (cert file, key file, DER)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path, cert.public_bytes(serialization.Encoding.DER)


def secret_volume(root: Path, version: str) -> Path:
    """Lay out a Secret volume as the kubelet does: tls.crt -> ..data/tls.crt, ..data -> ..<version>."""
    make_cert(root / f"..{version}", version)
    tmp = root / "..data_tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(f"..{version}")
    os.replace(tmp, root / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")
    return root


class Server:
    def __init__(self, webhook: Webhook, store: CertificateStore, cafile: Path) -> None:
        self.webhook = webhook
        self.store = store
        self.url = f"https://127.0.0.1:{webhook.port}"
        self.client_ssl = ssl.create_default_context(cafile=str(cafile))

    async def post(self, body: bytes | Any, *, client_ssl: ssl.SSLContext | None = None) -> tuple[int, Any]:
        context = client_ssl or self.client_ssl
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.url}/mutate", data=body, ssl=context) as response,
        ):
            return response.status, await response.json(content_type=None)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    root = secret_volume(tmp_path / "tls", "v1")
    store = CertificateStore(root / "tls.crt", root / "tls.key")
    webhook = Webhook(SETTINGS, store, "127.0.0.1", 0)
    await webhook.start(recheck_seconds=0.2)
    try:
        yield Server(webhook, store, root / "tls.crt")
    finally:
        await webhook.close()


def review(p: dict[str, Any] | None, uid: str = "uid-1", **request: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "uid": uid,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "default",
        "operation": "CREATE",
        **request,
    }
    if p is not None:
        body["object"] = p
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": body}


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


async def test_an_admission_review_gets_a_patch_that_makes_the_pod(server: Server) -> None:
    p = pod(
        container("app", command=["/bin/app"], pools={"dedicated": "1"}),
        annotation=_one(process("/bin/a", "dedicated", 1)),
    )
    status, answer = await server.post(encode(review(p, uid="abc-123")))
    assert status == 200
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == "abc-123" and response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patched = jsonpatch.apply_patch(p, json.loads(base64.b64decode(response["patch"])))
    assert_wrapped(patched, 0, "dedicated=exclusive")


async def test_a_pod_without_pools_is_allowed_without_a_patch(server: Server) -> None:
    status, answer = await server.post(encode(review(pod(container("app", command=["/a"])))))
    assert status == 200
    assert answer["response"] == {"uid": "uid-1", "allowed": True}


async def test_an_invalid_annotation_is_denied_with_the_reason(server: Server) -> None:
    p = pod(container("app", pools={"dedicated": "2"}), annotation=_one(process("/a", "dedicated", 1)))
    status, answer = await server.post(encode(review(p)))
    assert status == 200
    response = answer["response"]
    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["code"] == 403
    assert "must add up to 2" in response["status"]["message"]


async def test_warnings_reach_the_user(server: Server) -> None:
    status, answer = await server.post(encode(review(pod(container("app", pools={"shared": "100"})))))
    assert status == 200 and answer["response"]["allowed"] is True
    assert "no command" in answer["response"]["warnings"][0]


async def test_other_operations_and_kinds_pass_untouched(server: Server) -> None:
    p = pod(container("app", command=["/a"], pools={"shared": "100"}))
    for request in (
        review(p, operation="UPDATE"),
        review(p, subResource="ephemeralcontainers"),
        review(
            None,
            kind={"group": "apps", "version": "v1", "kind": "Deployment"},
            resource={"resource": "deployments"},
        ),
    ):
        status, answer = await server.post(encode(request))
        assert (status, answer["response"]) == (200, {"uid": "uid-1", "allowed": True})


def _without(key: str) -> dict[str, Any]:
    body = review(pod(container("app")))
    del body["request"][key]
    return body


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "the body is not JSON"),
        (b"\xff\xfe", "the body is not JSON"),
        (encode([1, 2]), "the body must be a JSON object"),
        (encode({**review(None), "kind": "Pod"}), "kind must be AdmissionReview, got 'Pod'"),
        (
            encode({**review(None), "apiVersion": "admission.k8s.io/v1beta1"}),
            "apiVersion must be admission.k8s.io/v1",
        ),
        (encode({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}), "no request object"),
        (encode(_without("uid")), "request.uid must be a non-empty string"),
        (encode(review(pod(container("app")), uid="")), "request.uid must be a non-empty string"),
        (encode(review(None)), "request.object must be the pod being created"),
    ],
)
async def test_bad_requests_get_400_with_a_reason(server: Server, body: bytes, reason: str) -> None:
    status, answer = await server.post(body)
    assert status == 400
    assert reason in answer["reason"]


async def test_a_body_over_one_mebibyte_gets_400(server: Server) -> None:
    big = b" " * (MAX_BODY_BYTES + 1)
    status, answer = await server.post(big)
    assert status == 400 and "larger than 1048576 bytes" in answer["reason"]

    async def chunks() -> AsyncIterator[bytes]:
        # No Content-Length: the limit must hold while reading.
        for _ in range(MAX_BODY_BYTES // 65536 + 1):
            yield b" " * 65536

    status, answer = await server.post(chunks())
    assert status == 400 and "larger than" in answer["reason"]
    # The server is still fine afterwards.
    status, _ = await server.post(encode(review(pod(container("app")))))
    assert status == 200


async def test_healthz(server: Server) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.url}/healthz", ssl=server.client_ssl) as response,
    ):
        assert response.status == 200
        assert (await response.json())["status"] == "ok"


async def _handshake(port: int, context: ssl.SSLContext) -> ssl.SSLObject:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    ssl_object = writer.get_extra_info("ssl_object")
    writer.close()
    await writer.wait_closed()
    assert isinstance(ssl_object, ssl.SSLObject)
    return ssl_object


def _client(max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = max_version
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls_below_1_2_is_refused(server: Server, tmp_path: Path) -> None:
    # Control: a server that allows TLS 1.1 proves this client can speak it at all here.
    cert, key, _ = make_cert(tmp_path / "control", "control")
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    permissive.load_cert_chain(cert, key)
    control = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=permissive)
    try:
        port = control.sockets[0].getsockname()[1]
        try:
            await _handshake(port, _client(ssl.TLSVersion.TLSv1_1))
        except (ssl.SSLError, ConnectionError) as exc:
            pytest.skip(f"this OpenSSL cannot speak TLS 1.1 at all: {exc}")
    finally:
        control.close()
        await control.wait_closed()

    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(server.webhook.port, _client(ssl.TLSVersion.TLSv1_1))
    tls12 = await _handshake(server.webhook.port, _client(ssl.TLSVersion.TLSv1_2))
    assert tls12.version() == "TLSv1.2"
    assert (await _handshake(server.webhook.port, _client())).version() == "TLSv1.3"


async def _served_certificate(port: int) -> bytes:
    der = (await _handshake(port, _client())).getpeercert(binary_form=True)
    assert der is not None
    return der


async def _wait_for(check: Callable[[], Any], what: str) -> None:
    # A deadline so a broken reload fails the test instead of hanging it; not a speed assertion.
    for _ in range(200):
        if await check():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"gave up waiting for {what}")


async def test_a_renewed_certificate_is_served_without_a_restart(server: Server, tmp_path: Path) -> None:
    port = server.webhook.port
    first = await _served_certificate(port)
    root = tmp_path / "tls"
    secret_volume(root, "v2")
    renewed = x509.load_pem_x509_certificate((root / "tls.crt").read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert renewed != first

    async def serves_renewed() -> bool:
        return await _served_certificate(port) == renewed

    await _wait_for(serves_renewed, "the renewed certificate")
    assert server.webhook.port == port
    # Connections without SNI (the kubelet's probes by IP) get the new one too; so do real requests.
    status, _ = await server.post(encode(review(pod(container("app")))), client_ssl=_client())
    assert status == 200


async def test_a_broken_certificate_update_keeps_the_last_good_one(server: Server, tmp_path: Path) -> None:
    before = await _served_certificate(server.webhook.port)
    target = (tmp_path / "tls" / "tls.crt").resolve()
    target.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    assert server.store.reload_if_changed() is False
    assert await _served_certificate(server.webhook.port) == before
    status, _ = await server.post(encode(review(pod(container("app")))))
    assert status == 200


# --- the command line ------------------------------------------------------------------------------


def test_cli_refuses_a_bad_config_or_certificate(tmp_path: Path) -> None:
    cert, key, _ = make_cert(tmp_path / "tls", "cli")
    config = tmp_path / "pools.yaml"
    config.write_text("pools:\n  x: {cpus: '1', pooltype: bogus}\n")
    assert cli.main(["webhook", "--cert", str(cert), "--key", str(key), "--config", str(config)]) == 2
    assert cli.main(["webhook", "--cert", str(tmp_path / "missing.crt"), "--key", str(key)]) == 2
    args = cli.build_parser().parse_args(["webhook", "--cert", "c", "--key", "k", "--no-exclusive-quota"])
    assert args.exclusive_quota is False and args.port == 8443

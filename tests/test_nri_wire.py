"""The hand-written NRI codec agrees with the generated betterproto2 classes, both ways."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.nri.wire import (
    TtrpcRequest,
    TtrpcResponse,
    decode_container_event,
    decode_synchronize,
    encode_adjustment,
    encode_update,
    encode_updates,
)
from agent.nriapi.nri.pkg.api.v1alpha1 import (
    Container,
    ContainerAdjustment,
    ContainerState,
    ContainerUpdate,
    CreateContainerRequest,
    CreateContainerResponse,
    LinuxContainer,
    LinuxContainerAdjustment,
    LinuxContainerUpdate,
    LinuxCpu,
    LinuxResources,
    Mount,
    OptionalUInt64,
    PodSandbox,
    SynchronizeRequest,
    SynchronizeResponse,
    UpdateContainerRequest,
)

text = st.text(max_size=20)
cpulist = st.from_regex(r"[0-9]{1,3}(-[0-9]{1,3})?(,[0-9]{1,3})*", fullmatch=True) | st.just("")


@given(cpus=cpulist, mems=cpulist)
def test_adjustment_is_what_the_generated_encoder_would_parse(cpus: str, mems: str) -> None:
    parsed = CreateContainerResponse.parse(encode_adjustment(cpus, mems))
    cpu = LinuxCpu(cpus=cpus, mems=mems)
    assert parsed == CreateContainerResponse(
        adjust=ContainerAdjustment(linux=LinuxContainerAdjustment(resources=LinuxResources(cpu=cpu)))
    )


@given(st.lists(st.tuples(text, cpulist, cpulist, st.booleans()), max_size=5), st.booleans())
def test_updates_are_what_the_generated_encoder_would_parse(
    updates: list[tuple[str, str, str, bool]], more: bool
) -> None:
    parsed = SynchronizeResponse.parse(encode_updates([encode_update(*u) for u in updates], more=more))
    expected = [
        ContainerUpdate(
            container_id=cid,
            linux=LinuxContainerUpdate(resources=LinuxResources(cpu=LinuxCpu(cpus=cpus, mems=mems))),
            ignore_failure=ignore,
        )
        for cid, cpus, mems, ignore in updates
    ]
    assert parsed == SynchronizeResponse(update=expected, more=more)


def _container(cid: str, name: str, cpus: str, mems: str) -> Container:
    return Container(
        id=cid,
        pod_sandbox_id="pod-1",
        name=name,
        state=ContainerState.CONTAINER_RUNNING,
        env=["EXCLUSIVE_CPUS=2,3"],
        annotations={"cpupool.io/cpus-fast": "2-3"},
        mounts=[Mount(destination="/x", type="bind", source="/y", options=["ro"])],
        linux=LinuxContainer(
            resources=LinuxResources(cpu=LinuxCpu(cpus=cpus, mems=mems, shares=OptionalUInt64(value=2)))
        ),
    )


@given(cid=text, name=text, cpus=cpulist, mems=cpulist, pod=text, namespace=text)
def test_requests_decode_to_the_fields_the_plugin_reads(
    cid: str, name: str, cpus: str, mems: str, pod: str, namespace: str
) -> None:
    sandbox = PodSandbox(id="pod-1", name=pod, uid="u", namespace=namespace, annotations={"a": "b"})
    event = decode_container_event(
        bytes(CreateContainerRequest(pod=sandbox, container=_container(cid, name, cpus, mems)))
    )
    assert (event.pod.name, event.pod.namespace, event.pod.uid) == (pod, namespace, "u")
    assert (event.container.id, event.container.name, event.container.cpus, event.container.mems) == (
        cid,
        name,
        cpus,
        mems,
    )
    assert event.update_cpus is None
    update = UpdateContainerRequest(
        pod=sandbox,
        container=_container(cid, name, "", ""),
        linux_resources=LinuxResources(cpu=LinuxCpu(cpus=cpus)),
    )
    assert decode_container_event(bytes(update)).update_cpus == cpus
    batch = decode_synchronize(
        bytes(
            SynchronizeRequest(pods=[sandbox], containers=[_container(cid, name, cpus, mems)] * 2, more=True)
        )
    )
    assert batch.more and [c.cpus for c in batch.containers] == [cpus, cpus] and batch.pods[0].name == pod


@given(service=text, method=text, payload=st.binary(max_size=50), timeout=st.integers(0, 2**62))
def test_ttrpc_messages_round_trip(service: str, method: str, payload: bytes, timeout: int) -> None:
    request = TtrpcRequest(service, method, payload, timeout)
    assert TtrpcRequest.decode(request.encode()) == request
    response = TtrpcResponse(payload, code=timeout % 17, message=method)
    assert TtrpcResponse.decode(response.encode()) == response


@given(
    st.dictionaries(
        st.sampled_from(["a.io/x", "cpupool.io/cpus-fast", "io.kubernetes.container.hash"]), text
    ),
    st.dictionaries(st.sampled_from(["cpupool.io/claim-fast", "example.com/claim-gpu"]), text),
)
def test_claim_annotations_are_read_at_creation_only(others: dict[str, str], claims: dict[str, str]) -> None:
    container = Container(id="c", name="main", annotations={**others, **claims}, env=["A=cpupool.io/claim-x"])
    payload = bytes(CreateContainerRequest(pod=PodSandbox(id="p"), container=container))
    assert dict(decode_container_event(payload, claims=True).container.claims) == claims
    assert decode_container_event(payload).container.claims == ()

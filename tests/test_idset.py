"""The compact set of device IDs behind the kubelet's record: it must behave as the set of strings it stands
for, whatever mix of our base-36 IDs and other names it holds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.idset import MAX_BIT, IdSet, shared_device_id
from agent.kubeletapi.v1 import ContainerDevices, ContainerResources, ListPodResourcesResponse, PodResources
from agent.wire import HeldReader

ids = st.one_of(
    st.integers(0, 5000).map(shared_device_id),
    st.sampled_from(["00", "A", "gpu-0", "7", "12", "x" * 9, shared_device_id(MAX_BIT + 3)]),
)


@given(st.frozensets(ids), st.frozensets(ids))
def test_set_operations_match_plain_sets(a: frozenset[str], b: frozenset[str]) -> None:
    x, y = IdSet.of(a), IdSet.of(b)
    assert set(x) == a and len(x) == len(a)
    assert set(x & y) == a & b
    assert set(x | y) == a | b
    assert set(x - y) == a - b
    assert x.isdisjoint(y) == a.isdisjoint(b)
    assert (x == IdSet.of(a)) and (x == a)
    for device_id in a | b | {"zz", "0"}:
        assert (device_id in x) == (device_id in a)


def test_indexes_ranges() -> None:
    s = IdSet.from_indexes([3, 40, 41, 999])
    assert list(s.indexes()) == [3, 40, 41, 999]
    assert list(s.indexes(40)) == [40, 41, 999]
    assert list(s.indexes(4, 999)) == [40, 41]
    assert IdSet.span(5, 8) == {shared_device_id(i) for i in (5, 6, 7)}


def test_reader_remembers_pods_and_forgets_gone_ones() -> None:
    def answer(pods: dict[str, list[str]]) -> bytes:
        return bytes(
            ListPodResourcesResponse(
                pod_resources=[
                    PodResources(
                        name=name,
                        namespace="ns",
                        containers=[
                            ContainerResources(
                                name="c",
                                devices=[ContainerDevices(resource_name="cpupool.io/s", device_ids=held)],
                            )
                        ],
                    )
                    for name, held in pods.items()
                ]
            )
        )

    reader = HeldReader()
    for pods in (
        {"a": ["1", "2"], "b": ["zz", "gpu"]},
        {"a": ["1", "2"], "c": ["3"]},
        {"c": ["3"]},
        {},
    ):
        out: dict[str, IdSet] = {}
        for _ in reader.read_in_steps(answer(pods), lambda name: True, out):
            pass
        expected = set().union(*pods.values()) if pods else set()
        assert set(out.get("cpupool.io/s", ())) == expected

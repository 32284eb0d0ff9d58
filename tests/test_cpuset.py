"""CpuSet: the Linux cpu-list syntax, its errors, and set algebra."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cpuset import MAX_CPU, CpuSet, CpuSetError

# -- parsing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", [0]),
        ("0-3", [0, 1, 2, 3]),
        ("0-3,8,10-11", [0, 1, 2, 3, 8, 10, 11]),
        ("5,1,3", [1, 3, 5]),
        ("1-3,2-4", [1, 2, 3, 4]),
        ("7-7", [7]),
        (f"{MAX_CPU}", [MAX_CPU]),
    ],
)
def test_parse_valid_lists(text: str, expected: list[int]) -> None:
    assert CpuSet.parse(text).to_list() == expected


@pytest.mark.parametrize("text", ["0-3\n", " 0-3 ", "\t0-3\n\n", " 0-1 , 2-3 "])
def test_parse_tolerates_surrounding_whitespace_and_sysfs_newline(text: str) -> None:
    assert CpuSet.parse(text) == CpuSet(range(4))


@pytest.mark.parametrize("text", ["", "\n", "   "])
def test_blank_text_is_the_empty_set(text: str) -> None:
    parsed = CpuSet.parse(text)
    assert parsed == CpuSet()
    assert not parsed
    assert parsed.format() == ""


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("3-1", "runs backwards"),
        ("a", "'a' is not N or N-M"),
        ("1,,2", "empty element"),
        ("1,", "empty element"),
        ("-1", "'-1' is not N or N-M"),
        ("1-", "'1-' is not N or N-M"),
        ("1-2-3", "is not N or N-M"),
        ("0x1", "is not N or N-M"),
        ("1.5", "is not N or N-M"),
        ("0-7:2/4", "is not N or N-M"),
    ],
)
def test_parse_errors_quote_the_text_and_the_fault(text: str, fault: str) -> None:
    with pytest.raises(CpuSetError) as info:
        CpuSet.parse(text)
    message = str(info.value)
    assert repr(text) in message
    assert fault in message


def test_huge_range_is_refused_without_expanding_it() -> None:
    with pytest.raises(CpuSetError) as info:
        CpuSet.parse("0-999999999")
    message = str(info.value)
    assert "'0-999999999'" in message
    assert "999999999" in message
    assert str(MAX_CPU) in message


def test_number_too_long_for_int_conversion_is_a_cpuset_error() -> None:
    # Python refuses int() of more than 4300 digits with a bare ValueError; users must see CpuSetError.
    text = "1" * 5000
    with pytest.raises(CpuSetError, match="above the limit"):
        CpuSet.parse(text)
    with pytest.raises(CpuSetError, match="above the limit"):
        CpuSet.parse("0-" + text)


def test_leading_zeros_do_not_hide_a_small_number() -> None:
    assert CpuSet.parse("0" * 50 + "7") == CpuSet([7])


def test_non_ascii_digits_are_refused() -> None:
    # int() accepts "٣" (Arabic-Indic three); the kernel does not, so neither do we.
    with pytest.raises(CpuSetError):
        CpuSet.parse("\u0663")
    with pytest.raises(CpuSetError):
        CpuSet.parse("\uff11-\uff13")


def test_constructor_rejects_out_of_range_and_non_int_members() -> None:
    for bad in ([-1], [MAX_CPU + 1], [True], ["1"], [1.0]):
        with pytest.raises(CpuSetError):
            CpuSet(bad)  # type: ignore[list-item]


# -- formatting ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "text"),
    [
        ([], ""),
        ([4], "4"),
        ([0, 1], "0,1"),
        ([0, 1, 2], "0-2"),
        ([0, 1, 2, 3, 5, 7, 8], "0-3,5,7,8"),
        ([10, 2, 3, 4, 11, 12], "2-4,10-12"),
    ],
)
def test_format_is_canonical(cpus: list[int], text: str) -> None:
    assert CpuSet(cpus).format() == text
    assert str(CpuSet(cpus)) == text


def test_comma_list_spells_out_every_cpu() -> None:
    assert CpuSet.parse("0-3,8").comma_list() == "0,1,2,3,8"
    assert CpuSet().comma_list() == ""


def test_repr_shows_the_cpu_list() -> None:
    assert repr(CpuSet([1, 2, 3])) == "CpuSet('1-3')"


# -- set algebra and ordering ------------------------------------------------------------------------


def test_set_algebra() -> None:
    a = CpuSet.parse("0-5")
    b = CpuSet.parse("4-9")
    assert (a | b) == CpuSet.parse("0-9")
    assert (a & b) == CpuSet.parse("4,5")
    assert (a - b) == CpuSet.parse("0-3")
    assert (a ^ b) == CpuSet.parse("0-3,6-9")
    assert a.union(b, CpuSet([20])) == CpuSet.parse("0-9,20")
    assert CpuSet.parse("0-1").issubset(a)
    assert not b.issubset(a)
    assert a.isdisjoint(CpuSet.parse("6-7"))
    assert not a.isdisjoint(b)


def test_membership_length_iteration_and_first() -> None:
    cpus = CpuSet([9, 3, 5])
    assert 5 in cpus
    assert 4 not in cpus
    assert len(cpus) == 3
    assert list(cpus) == [3, 5, 9]
    assert cpus.first == 3
    with pytest.raises(ValueError, match="empty"):
        _ = CpuSet().first


def test_equal_sets_are_equal_and_hash_alike() -> None:
    a = CpuSet.parse("0-3")
    b = CpuSet([3, 2, 1, 0])
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != CpuSet.parse("0-4")
    assert a != "0-3"


def test_sorting_orders_sets_by_their_lowest_cpus() -> None:
    sets = [CpuSet.parse("4-5"), CpuSet.parse("0,9"), CpuSet.parse("0-1"), CpuSet()]
    assert [s.format() for s in sorted(sets)] == ["", "0,1", "0,9", "4,5"]
    assert CpuSet.parse("4-5") > CpuSet.parse("0-1")


# -- properties --------------------------------------------------------------------------------------

cpu_numbers = st.integers(min_value=0, max_value=MAX_CPU)
cpu_sets = st.frozensets(st.integers(min_value=0, max_value=300), max_size=80) | st.frozensets(
    cpu_numbers, max_size=20
)


@st.composite
def canonical_lists(draw: st.DrawFn) -> str:
    """A cpu list written the canonical way, built without CpuSet: ascending runs, gaps between them."""
    runs = draw(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 6)), max_size=12))
    parts: list[str] = []
    start = draw(st.integers(0, 50))
    for gap, length in runs:
        last = start + length - 1
        if last > MAX_CPU:
            break
        if length == 1:
            parts.append(str(start))
        elif length == 2:
            parts.append(f"{start},{last}")
        else:
            parts.append(f"{start}-{last}")
        # At least one missing CPU between runs, or the runs would merge.
        start = last + 1 + gap
    return ",".join(parts)


@given(canonical_lists())
def test_format_of_parse_round_trips_canonical_text(text: str) -> None:
    assert CpuSet.parse(text).format() == text


@given(cpu_sets)
def test_parse_of_format_round_trips_any_set(members: frozenset[int]) -> None:
    cpus = CpuSet(members)
    assert CpuSet.parse(cpus.format()) == cpus
    assert CpuSet.parse(cpus.comma_list()) == cpus
    assert set(cpus) == members


@given(cpu_sets, cpu_sets)
def test_algebra_matches_python_sets(a: frozenset[int], b: frozenset[int]) -> None:
    x, y = CpuSet(a), CpuSet(b)
    assert set(x | y) == a | b
    assert set(x & y) == a & b
    assert set(x - y) == a - b
    assert set(x ^ y) == a ^ b
    assert x.issubset(y) == a.issubset(b)
    assert x.isdisjoint(y) == a.isdisjoint(b)


cpu_list_alphabet = st.sampled_from(list("0123456789,- \n\t-:/x")) | st.characters()


@given(st.text(alphabet=cpu_list_alphabet, max_size=40) | st.text(max_size=40))
def test_arbitrary_text_gives_a_cpuset_or_a_cpuset_error(text: str) -> None:
    error: CpuSetError | None = None
    try:
        parsed = CpuSet.parse(text)
    except CpuSetError as err:
        error = err
    if error is not None:
        assert repr(text) in str(error)
    else:
        # Whatever parsed is canonical again after one round.
        assert CpuSet.parse(parsed.format()) == parsed

"""Item sizes as DynamoDB counts them (AWS guide, "DynamoDB item sizes and formats")."""

from __future__ import annotations

import base64

import pytest

from llmq.item_size import MAX_ITEM_BYTES, attribute_value_size, item_size_bytes, number_size


def test_the_limit_is_400_binary_kilobytes() -> None:
    assert MAX_ITEM_BYTES == 409_600


def test_ascii_strings_count_name_and_value_bytes() -> None:
    # Given an item of two ASCII strings, Then each counts its name plus its value
    assert item_size_bytes({"pk": {"S": "job_1"}, "status": {"S": "queued"}}) == (2 + 5) + (6 + 6)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("é", 2),  # Latin-1 supplement: 2 bytes
        ("日本語", 9),  # CJK: 3 bytes a character
        ("😀", 4),  # outside the BMP: 4 bytes, although it is one code point
        ("a日😀", 1 + 3 + 4),
    ],
)
def test_strings_count_utf8_bytes_not_characters(text: str, expected: int) -> None:
    assert attribute_value_size({"S": text}) == expected
    assert item_size_bytes({text: {"S": ""}}) == expected, "names are UTF-8 too"


def test_a_cjk_string_of_fewer_characters_than_the_limit_can_exceed_it_in_bytes() -> None:
    text = "漢" * 140_000
    assert len(text) < MAX_ITEM_BYTES < item_size_bytes({"output": {"S": text}})


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        ("0", 1),
        ("7", 2),  # one significant digit: one byte, plus one
        ("12", 2),
        ("123", 3),
        ("1000000", 2),  # trailing zeros are trimmed
        ("0.00012", 2),  # and leading ones
        ("-12", 3),  # a negative number carries one more byte
        ("1700000000123", 8),  # a millisecond timestamp: 13 digits
        ("9" * 38, 20),  # the most significant digits DynamoDB keeps
        ("-" + "9" * 38, 21),
        ("1E+5", 2),
    ],
)
def test_numbers_take_a_byte_per_two_significant_digits_plus_one(number: str, expected: int) -> None:
    assert number_size(number) == expected
    assert attribute_value_size({"N": number}) == expected


def test_binary_counts_raw_bytes_whether_given_raw_or_as_base64() -> None:
    raw = bytes(range(256)) * 3
    assert attribute_value_size({"B": raw}) == 768
    assert attribute_value_size({"B": base64.b64encode(raw).decode()}) == 768


def test_booleans_and_null_are_one_byte() -> None:
    assert item_size_bytes({"ok": {"BOOL": True}, "gone": {"NULL": True}}) == (2 + 1) + (4 + 1)


def test_lists_and_maps_add_three_bytes_and_one_per_element() -> None:
    assert attribute_value_size({"L": []}) == 3
    assert attribute_value_size({"M": {}}) == 3
    # L: 3 + (1 + 1) + (1 + 2)
    assert attribute_value_size({"L": [{"S": "a"}, {"N": "12"}]}) == 8
    # M: 3 + (1 + len("role") + len("user")) + (1 + len("n") + 2)
    assert attribute_value_size({"M": {"role": {"S": "user"}, "n": {"N": "42"}}}) == 3 + 9 + 4


def test_nesting_adds_up_at_every_level() -> None:
    # Given the shape of a job's input: a map holding a list of maps
    message = {"M": {"role": {"S": "user"}, "content": {"S": "日本"}}}
    inner = 3 + (1 + 4 + 4) + (1 + 7 + 6)
    assert attribute_value_size(message) == inner
    item = {"input": {"M": {"messages": {"L": [message, message]}}}}
    # Then: name + map overhead + (element + key + list overhead + 2 x (element + message))
    assert item_size_bytes(item) == 5 + 3 + (1 + 8 + 3 + 2 * (1 + inner))


def test_sets_are_the_sum_of_their_elements() -> None:
    assert attribute_value_size({"SS": ["a", "日"]}) == 4
    assert attribute_value_size({"NS": ["1", "-12"]}) == 2 + 3
    assert attribute_value_size({"BS": [b"\x00\x01", b"\x02"]}) == 3


@pytest.mark.parametrize("bad", [{}, {"S": "a", "N": "1"}, {"X": "a"}])
def test_a_malformed_attribute_value_is_refused(bad: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        attribute_value_size(bad)

"""The size of a DynamoDB item, counted the way DynamoDB counts it against the 400 KB limit.

The rules come from the AWS guide, "DynamoDB item sizes and formats"
(https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/CapacityUnitCalculations.html),
and the limit from "Constraints in Amazon DynamoDB" (Items: 400 KB, where 1 KB = 1024 bytes):

- an item is the sum, over its attributes, of the UTF-8 length of the name plus the value;
- S: the UTF-8 length (so a CJK character is 3 bytes and an emoji 4, not 1);
- N: about one byte per two significant digits, leading and trailing zeros trimmed, plus one
  byte (plus one more for a negative number: the documented 38 digits then top out at 21);
- B: the raw bytes, not their base64 text;
- BOOL and NULL: 1 byte;
- L and M: 3 bytes of overhead plus 1 byte per element, plus the elements (a map element's
  key counts as an attribute name);
- SS, NS, BS: the sum of their elements.

Items are taken in the low-level AttributeValue form that the DynamoDB client sends,
`{"name": {"S": "..."}}`, so the domain can size an item before it writes it. Binary may be
given as bytes or as its base64 text (the wire form). Nothing here imports boto.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

# 400 KB, in DynamoDB's binary units.
MAX_ITEM_BYTES = 400 * 1024
_CONTAINER_OVERHEAD = 3
_ELEMENT_OVERHEAD = 1
_MAX_NUMBER_BYTES = 21


def item_size_bytes(item: Mapping[str, Mapping[str, Any]]) -> int:
    """Names plus values of a whole item, in bytes."""
    return sum(_utf8_length(name) + attribute_value_size(value) for name, value in item.items())


def attribute_value_size(value: Mapping[str, Any]) -> int:
    """The size of one AttributeValue (`{"S": ...}`, `{"M": {...}}`, ...) without its name."""
    if len(value) != 1:
        raise ValueError(f"an AttributeValue has exactly one type, not {sorted(value)}")
    ((kind, payload),) = value.items()
    sizer = _SIZERS.get(kind)
    if sizer is None:
        raise ValueError(f"unknown DynamoDB type {kind!r}")
    return sizer(payload)


def number_size(number: Any) -> int:
    """Bytes of a number: significant digits, two to a byte, plus one (and one for a sign)."""
    parsed = Decimal(str(number))
    sign, digits, _ = parsed.as_tuple()
    significant = "".join(map(str, digits)).strip("0")
    if not significant:
        return 1
    return min(math.ceil(len(significant) / 2) + 1 + sign, _MAX_NUMBER_BYTES)


def _utf8_length(text: str) -> int:
    # surrogatepass: a lone surrogate is refused by DynamoDB anyway, but sizing must not crash.
    return len(text.encode("utf-8", "surrogatepass"))


def _binary_size(payload: Any) -> int:
    if isinstance(payload, str):
        return len(base64.b64decode(payload))
    return len(bytes(payload))


def _list_size(elements: list[Mapping[str, Any]]) -> int:
    return _CONTAINER_OVERHEAD + sum(_ELEMENT_OVERHEAD + attribute_value_size(v) for v in elements)


def _map_size(members: Mapping[str, Mapping[str, Any]]) -> int:
    return _CONTAINER_OVERHEAD + sum(
        _ELEMENT_OVERHEAD + _utf8_length(key) + attribute_value_size(v) for key, v in members.items()
    )


_SIZERS: dict[str, Callable[[Any], int]] = {
    "S": _utf8_length,
    "N": number_size,
    "B": _binary_size,
    "BOOL": lambda _: 1,
    "NULL": lambda _: 1,
    "SS": lambda values: sum(_utf8_length(v) for v in values),
    "NS": lambda values: sum(number_size(v) for v in values),
    "BS": lambda values: sum(_binary_size(v) for v in values),
    "L": _list_size,
    "M": _map_size,
}

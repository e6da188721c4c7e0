"""Hypothesis strategies over callcredit.v1 messages.

`messages(descriptor)` is generic: it walks a message DESCRIPTOR and draws every
field (or leaves it unset) from random, boundary and oversized values of its
type, with hints from the field's name so that some requests get past
validation and reach the state machine (known ids, digits for destinations).
The targeted strategies build what random fields rarely hit: big batches,
duplicated and foreign ids, renewals out of order, overruns.
"""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from callcredit.v1 import credit_control_pb2
from tests.fuzz.server import ACCOUNTS, CALLS, KEYS, TARIFFS

C = credit_control_pb2

INT32_EDGES = [
    0,
    1,
    -1,
    2,
    59,
    60,
    61,
    120,
    599,
    600,
    601,
    3_600,
    3_601,
    86_399,
    86_400,
    86_401,
    1_000_000,
    1_000_001,
    2**31 - 1,
    -(2**31),
    -(2**31) + 1,
]
INT64_EDGES = [
    0,
    1,
    -1,
    10**9,
    10**9 + 1,
    10**12,
    10**12 + 1,
    10**15,
    10**15 + 1,
    -(10**15),
    -(10**15) - 1,
    10**18,
    10**18 + 1,
    2**53 + 1,
    2**63 - 1,
    -(2**63),
    2**31,
    -(2**31) - 1,
]
STRING_EDGES = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\n",
    "\x7f",
    "\u202e",
    "é",
    "\ufeff",
    "٣",
    "²",
    "0",
    "-1",
    "+",
    "++1",
    "+0",
    "1e3",
    "9" * 19,
    "9" * 20,
    "NaN",
    "a b",
    "a/b",
    "../x",
    "%s",
    "' OR 1=1 --",
    "x" * 128,
    "x" * 129,
    "\U0001f4de" * 32,
    "ç" * 128,
]
# Fields inside repeated messages get at most this long a string: a 10,000
# element list of 1 MiB strings would be built in the test process first.
NESTED_MAX_CHARS = 4_096
MAX_BUILT_BYTES = 24 * 1024 * 1024  # no single generated request above this

ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:@-"
valid_ids = st.text(alphabet=ID_CHARS, min_size=1, max_size=128)
known_ids = st.sampled_from(ACCOUNTS + TARIFFS + CALLS + KEYS + ("nope", "t-acc"))
unicode_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=64)


def _oversized(max_chars: int) -> st.SearchStrategy[str]:
    sizes = [n for n in (127, 128, 129, 256, 257, 4_096, 65_537, 1 << 20) if n <= max_chars]
    return st.builds(
        operator.mul, st.sampled_from(["x", "9", "é", "\x01", "A"]), st.sampled_from(sizes)
    )


def _hint(name: str) -> st.SearchStrategy[str] | None:
    """Values that can pass validation for a field with this name."""
    if name.endswith("_id") or name in ("idempotency_key", "call_id"):
        return st.one_of(known_ids, known_ids, valid_ids)
    if name == "destination":
        return st.one_of(
            st.sampled_from(["84901", "+84901", "1", "0" * 32, "+" + "9" * 32, "849" + "0" * 29]),
            st.from_regex(r"\+?[0-9]{1,32}", fullmatch=True),
        )
    if name == "currency":
        return st.sampled_from(["VND", "USD", "EUR", "vnd", "VN", "VNDD"])
    if name == "prefix":
        return st.one_of(
            st.sampled_from(["", "84", "849"]), st.from_regex(r"[0-9]{0,17}", fullmatch=True)
        )
    if name == "page_token":
        return st.one_of(st.just(""), st.from_regex(r"[0-9]{1,20}", fullmatch=True))
    if name in ("reference", "reason"):
        return st.text(max_size=300)
    return None


def strings(name: str, max_chars: int) -> st.SearchStrategy[str]:
    hostile = st.one_of(st.sampled_from(STRING_EDGES), unicode_text, _oversized(max_chars))
    hint = _hint(name)
    return hostile if hint is None else st.one_of(hint, hint, hostile)


def _int_range(bits: int, edges: list[int]) -> st.SearchStrategy[int]:
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return st.one_of(st.integers(-3, 200), st.sampled_from(edges), st.integers(low, high))


def _scalar(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    t = field.type
    max_chars = NESTED_MAX_CHARS if depth else 1 << 20
    if t == FieldDescriptor.TYPE_STRING:
        return strings(field.name, max_chars)
    if t in (
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SFIXED32,
    ):
        return _int_range(32, INT32_EDGES)
    if t in (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED64,
    ):
        return _int_range(64, INT64_EDGES)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        declared = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(declared), st.integers(-(2**31), 2**31 - 1))
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if t == FieldDescriptor.TYPE_FLOAT else 64)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_MESSAGE:
        assert field.message_type is not None
        return messages(field.message_type, depth + 1)
    raise TypeError(f"no strategy for field type {t} ({field.full_name})")


def _long(element: Any, copies: int) -> list[Any]:
    size = element.ByteSize() if isinstance(element, Message) else len(str(element))
    return [element] * min(copies, max(1, MAX_BUILT_BYTES // max(1, size + 4)))


def _field(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    element = _scalar(field, depth + 1 if field.is_repeated else depth)
    if not field.is_repeated:
        return element
    many = st.builds(_long, element, st.sampled_from([1_000, 9_999, 10_000, 10_001, 20_000]))
    return st.one_of(st.lists(element, max_size=6), st.lists(element, max_size=6), many)


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if field.is_repeated:
            target.extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            target.CopyFrom(value)
            target.SetInParent()  # an empty message still marks the field (or oneof) set
        else:
            setattr(message, name, value)  # a later oneof member replaces an earlier one
    return message


def _deferred_field(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    return st.deferred(lambda: _field(field, depth))


_CACHE: dict[tuple[str, int], st.SearchStrategy[Message]] = {}


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of this type: each field unset, random, boundary, oversized or hinted."""
    key = (descriptor.full_name, depth)
    if key not in _CACHE:
        cls = GetMessageClass(descriptor)
        if depth > 3:
            _CACHE[key] = st.just(cls())
        else:
            optional = {f.name: _deferred_field(f, depth) for f in descriptor.fields}
            _CACHE[key] = st.fixed_dictionaries({}, optional=optional).map(
                lambda values: _build(cls, values)
            )
    return _CACHE[key]


# ------------------------------------------------------------- targeted


@dataclass(frozen=True)
class BatchRecipe:
    """A batch of operations, built from a seed so that thousands cost Hypothesis nothing."""

    size: int
    seed: int
    fresh_calls: int  # how many new call ids the batch draws from (small: duplicates)
    messages: int  # split over this many ControlRequests on one stream
    bad_request_ids: bool
    duplicate_request_ids: bool

    def operations(self, tag: str) -> list[C.Operation]:
        rng = random.Random(self.seed)
        fresh = [f"{tag}-f{k}" for k in range(self.fresh_calls)]
        calls = [*CALLS, "nope", *fresh]
        accounts = [*ACCOUNTS, "nope"]
        sequences: dict[str, int] = {}
        ops = []
        for n in range(self.size):
            if self.duplicate_request_ids and rng.random() < 0.2:
                request_id = f"r{rng.randrange(max(1, n))}"
            elif self.bad_request_ids and rng.random() < 0.1:
                request_id = rng.choice(["", "bad id", "x" * 129, "\x00", "é"])
            else:
                request_id = f"r{n}"
            call_id = rng.choice(calls)
            used = rng.choice([0, 1, 30, 59, 60, 61, 599, 601, 86_400, rng.randrange(0, 2_000)])
            kind = rng.random()
            if kind < 0.45:
                ops.append(
                    C.Operation(
                        request_id=request_id,
                        reserve=C.ReserveRequest(
                            call_id=call_id,
                            account_id=rng.choice(accounts),
                            destination=rng.choice(["84901", "+84901", "1234", "849"]),
                            requested_seconds=rng.choice([0, 1, 30, 600, 601, 86_400]),
                        ),
                    )
                )
            elif kind < 0.8:
                seq = sequences.get(call_id, 0) + rng.choice([1, 1, 1, 0, -1, 5])
                sequences[call_id] = max(seq, sequences.get(call_id, 0))
                ops.append(
                    C.Operation(
                        request_id=request_id,
                        renew=C.RenewRequest(
                            call_id=call_id,
                            sequence=seq,
                            used_seconds=used,
                            requested_seconds=rng.choice([0, 10, 600, 86_400]),
                        ),
                    )
                )
            else:
                ops.append(
                    C.Operation(
                        request_id=request_id,
                        release=C.ReleaseRequest(
                            call_id=call_id,
                            used_seconds=used,
                        ),
                    )
                )
        return ops


batch_recipes = st.builds(
    BatchRecipe,
    size=st.one_of(
        st.integers(1, 50), st.integers(51, 3_000), st.sampled_from([9_999, 10_000, 10_001])
    ),
    seed=st.integers(0, 2**32),
    fresh_calls=st.integers(0, 40),
    messages=st.sampled_from([1, 1, 2, 7]),
    bad_request_ids=st.booleans(),
    duplicate_request_ids=st.booleans(),
)


@dataclass(frozen=True)
class RenewStep:
    sequence: int
    used_seconds: int
    requested_seconds: int


renew_steps = st.lists(
    st.builds(
        RenewStep,
        sequence=st.one_of(st.integers(-1, 12), st.sampled_from([2**63 - 1, 2**31])),
        used_seconds=st.one_of(st.integers(-1, 700), st.sampled_from([86_400, 86_401])),
        requested_seconds=st.one_of(st.integers(0, 700), st.sampled_from([86_400, 86_401])),
    ),
    min_size=1,
    max_size=15,
)

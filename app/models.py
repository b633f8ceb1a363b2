"""Request parsing and the pydantic models of the API (they also generate /openapi.json).

Bodies are parsed with every JSON number with a fraction as a Decimal, so an amount never passes
through a binary float: `0.29` is `Decimal("0.29")` from the first byte to the numeric(12,2) column,
and a metadata number is stored as the literal it was sent as. Input is strict:
duplicate members, numbers Python cannot hold, exponents in amounts and non-ASCII digits are 400.
"""

from __future__ import annotations

import json
import math
import re
import sys
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from app.errors import APIError, validation_error
from payment_service import exact_json
from payment_service.vocabulary import PaymentMethod, PaymentStatus, RefundStatus

INT64_MAX = 2**63 - 1
MAX_BODY_BYTES = 64 * 1024
# Quart's own limit: a body declared larger is answered 413 and the connection closed at once. Up to
# it, a refused body is read and dropped after the 413 (routes.BodyTooLarge), never kept.
DRAIN_BODY_BYTES = 4 * 1024 * 1024
METADATA_MAX_KEYS = 50
METADATA_MAX_BYTES = 8 * 1024
IDEMPOTENCY_KEY_MAX_CHARS = 255
CENT = Decimal("0.01")


# -- pure parsing helpers ------------------------------------------------------------------------
class ExponentNumber(Decimal):
    """A JSON number written with an exponent (`1E+2`): exact in metadata, never an amount."""


class _RefusedJSON(Exception):
    """JSON that parses but that the API refuses (duplicate member, number out of range)."""


# A metadata number's exponent is bounded so that PostgreSQL (whose jsonb writes numbers out in
# full, 1E+400 as 401 digits) stores it exactly and within the metadata size limit.
METADATA_NUMBER_MAX_EXPONENT = 1000


def _reject_constant(name: str) -> Any:
    raise _RefusedJSON(f"{name} is not a number JSON allows.")


def _parse_int(text: str) -> int:
    limit = sys.get_int_max_str_digits()
    if limit and len(text) > limit:  # int() would raise past Python's digit limit
        raise _RefusedJSON(f"A number in the body has more than {limit} digits.")
    return int(text)


def _parse_float(text: str) -> Decimal:
    try:
        return ExponentNumber(text) if "e" in text or "E" in text else Decimal(text)
    except InvalidOperation:  # an exponent beyond what Decimal represents
        raise _RefusedJSON("A number in the body is out of range.") from None


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _RefusedJSON(f"The member {json.dumps(name)} appears more than once.")
            seen.add(name)
    return document


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Parse a request body: exact decimals, no NaN/Infinity or duplicate members, an object."""
    if not raw.strip():
        raise APIError(400, "MALFORMED_JSON", "The request body is empty; send a JSON object.")
    try:
        value = json.loads(
            raw,
            parse_float=_parse_float,
            parse_int=_parse_int,
            parse_constant=_reject_constant,
            object_pairs_hook=_object_without_duplicates,
        )
    except _RefusedJSON as error:
        raise APIError(400, "MALFORMED_JSON", str(error)) from None
    except RecursionError:
        raise APIError(400, "MALFORMED_JSON", "The JSON body is nested too deeply.") from None
    except json.JSONDecodeError as error:
        detail = (
            f"The body is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
        )
        raise APIError(400, "MALFORMED_JSON", detail) from None
    except UnicodeDecodeError as error:
        detail = f"The body is not valid UTF-8 (byte {error.start})."
        raise APIError(400, "MALFORMED_JSON", detail) from None
    if not isinstance(value, dict):
        raise APIError(400, "MALFORMED_JSON", "The body must be a JSON object.")
    return value


# ASCII digits only (a str pattern's \d would take "\u0663"), no sign, exponent, "_" or space.
_AMOUNT_TEXT = re.compile(r"[0-9]+(\.[0-9]{1,2})?")


def parse_amount(value: object) -> Decimal:
    """A positive amount with at most two decimals, from a JSON number or a decimal string."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        raise ValueError("must be a number or a decimal string")
    if isinstance(value, ExponentNumber):
        raise ValueError("must be written without an exponent")
    if isinstance(value, str):
        if not _AMOUNT_TEXT.fullmatch(value):
            raise ValueError('must be a decimal string such as "12.34"')
        value = Decimal(value)
    amount = Decimal(value)
    if not amount.is_finite():
        raise ValueError("must be a finite number")
    if amount <= 0:
        raise ValueError("must be greater than 0")
    if amount > Decimal("1e12"):
        raise ValueError("is too large")
    if amount != amount.quantize(CENT):
        raise ValueError("must have at most 2 decimal places")
    return amount.quantize(CENT)


METADATA_MAX_DEPTH = 32


def _check_json_value(value: Any, path: str, depth: int = 0) -> Any:
    """Metadata values: strings without NUL or lone surrogates, exact numbers, nested JSON."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{path}: strings may not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"{path}: strings must be valid Unicode (no lone surrogates)"
            ) from None
        return value
    if isinstance(value, Decimal):
        if not value.is_finite() or abs(value.adjusted()) > METADATA_NUMBER_MAX_EXPONENT:
            raise ValueError(f"{path}: number out of range")
        return value  # kept exactly: written to jsonb as the literal it was sent as
    if depth > METADATA_MAX_DEPTH:
        raise ValueError(f"{path}: nested more than {METADATA_MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        return {
            _check_json_value(k, path): _check_json_value(v, f"{path}.{k}", depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_check_json_value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise ValueError(f"{path}: not a JSON value")


def parse_metadata(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    if len(value) > METADATA_MAX_KEYS:
        raise ValueError(f"may have at most {METADATA_MAX_KEYS} keys")
    checked = _check_json_value(value, "metadata")
    size = len(exact_json.dumps(checked, ensure_ascii=False).encode("utf-8"))
    if size > METADATA_MAX_BYTES:
        raise ValueError(f"may be at most {METADATA_MAX_BYTES} bytes encoded (got {size})")
    return checked  # type: ignore[no-any-return]


# -- field types ---------------------------------------------------------------------------------
AMOUNT_LIMIT = Decimal("1000000000000")  # parse_amount's own bound; the API's is the setting


def integers_below(digits: str) -> list[str]:
    """Regex alternatives for the integers from 1 up to `digits` - 1, written without leading 0."""
    alternatives = [f"[1-9][0-9]{{0,{len(digits) - 2}}}"] if len(digits) >= 2 else []
    for position, digit in enumerate(digits):
        lowest = 1 if position == 0 else 0
        if int(digit) > lowest:
            rest = len(digits) - position - 1
            tail = f"[0-9]{{{rest}}}" if rest else ""
            alternatives.append(f"{digits[:position]}[{lowest}-{int(digit) - 1}]{tail}")
    return alternatives


def amount_pattern(maximum: Decimal) -> str:
    """The decimal strings parse_amount takes whose value is in (0, maximum] (maximum ≥ 1)."""
    whole, cents = divmod(int(maximum.quantize(CENT) * 100), 100)
    tens, units = divmod(cents, 10)
    fraction = f"{tens}[0-{units}]?" if tens == 0 else f"[0-{tens - 1}][0-9]?|{tens}[0-{units}]?"
    branches = [
        r"0+\.(0[1-9]|[1-9][0-9]?)",  # 0.01 to 0.99
        rf"0*{whole}(\.({fraction}))?",  # the maximum's own whole part
    ]
    below = integers_below(str(whole))
    if below:
        branches.insert(0, rf"0*({'|'.join(below)})(\.[0-9]{{1,2}})?")
    return "^(" + "|".join(branches) + ")$"


def amount_schema(maximum: Decimal = AMOUNT_LIMIT) -> dict[str, Any]:
    """A JSON number (no exponent) or a decimal string, more than 0 and at most `maximum`."""
    return {
        "anyOf": [
            {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": int(maximum) if maximum == maximum.to_integral() else float(maximum),
                "multipleOf": 0.01,
            },
            {"type": "string", "pattern": amount_pattern(maximum)},
        ],
        "examples": [150.00, "12.34"],
    }


# Strings the API stores: no NUL (PostgreSQL text cannot hold it).
_TEXT_PATTERN = r"^[^\x00]*$"
_METADATA_SCALAR = {
    "anyOf": [
        {"type": "string", "pattern": _TEXT_PATTERN},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
    ]
}
_METADATA_SCHEMA = {
    "type": "object",
    "description": (
        f"Any JSON object: at most {METADATA_MAX_KEYS} keys, {METADATA_MAX_BYTES} bytes encoded "
        f"and {METADATA_MAX_DEPTH} levels deep; strings without NUL; numbers are kept exactly."
    ),
    "maxProperties": METADATA_MAX_KEYS,
    "propertyNames": {"pattern": _TEXT_PATTERN},
    "additionalProperties": {
        "anyOf": [
            *_METADATA_SCALAR["anyOf"],
            {"type": "array", "items": _METADATA_SCALAR},
            {
                "type": "object",
                "propertyNames": {"pattern": _TEXT_PATTERN},
                "additionalProperties": _METADATA_SCALAR,
            },
        ]
    },
}
Amount = Annotated[Decimal, BeforeValidator(parse_amount), WithJsonSchema(amount_schema())]
MoneyOut = Annotated[Decimal, WithJsonSchema({"type": "number", "examples": [150.0]})]
IdempotencyKey = Annotated[
    str,
    Strict(),
    Field(min_length=1, max_length=IDEMPOTENCY_KEY_MAX_CHARS, pattern=r"^[\x20-\x7e]+$"),
]


def integral_number(value: object) -> object:
    """A JSON number with a zero fraction (`101.0`, `1e2`) is the integer JSON Schema says it is."""
    if not isinstance(value, Decimal) or not value.is_finite() or value.adjusted() > 18:
        return value  # left to the strict int validation (and its 400)
    return int(value) if value == value.to_integral_value() else value


TripId = Annotated[int, Strict(), Field(ge=1, le=INT64_MAX), BeforeValidator(integral_number)]
Currency = Annotated[str, Strict(), Field(pattern=r"^[A-Z]{3}$")]
Metadata = Annotated[
    dict[str, Any],
    BeforeValidator(parse_metadata),
    WithJsonSchema(_METADATA_SCHEMA),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# The gateway's ids of a payer's saved payment method and of the payer (Stripe's shapes).
GatewayPaymentMethod = Annotated[
    str,
    Strict(),
    Field(
        pattern=r"^pm_[A-Za-z0-9_]{1,250}$",
        description=(
            "The gateway's id of the payer's saved payment method (pm_…). Without it, a test or "
            "embedded gateway charges GATEWAY_TEST_PAYMENT_METHOD; a live one answers 400."
        ),
    ),
]
GatewayCustomer = Annotated[
    str,
    Strict(),
    Field(
        pattern=r"^cus_[A-Za-z0-9_]{1,250}$",
        description="The gateway's id of the payer (cus_…), whose saved method is charged.",
    ),
]


class CreatePayment(_Request):
    idempotency_key: IdempotencyKey | None = Field(
        default=None, description="Or the Idempotency-Key header; one of them is required."
    )
    trip_id: TripId
    method: PaymentMethod
    amount: Amount
    currency: Currency | None = None
    metadata: Metadata | None = None
    payment_method: GatewayPaymentMethod | None = None
    customer: GatewayCustomer | None = None

    @field_validator("amount")
    @classmethod
    def _at_most_max(cls, value: Decimal, info: ValidationInfo) -> Decimal:
        maximum = (info.context or {}).get("max_amount")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be at most {maximum}")
        return value


class CreateRefund(_Request):
    idempotency_key: IdempotencyKey | None = None
    amount: Amount | None = Field(default=None, description="Absent: everything not yet refunded.")
    metadata: Metadata | None = None


class Settle(_Request):
    idempotency_key: IdempotencyKey | None = None
    status: Literal["SUCCESS", "FAILED"]
    gateway_reference: (
        Annotated[str, Strict(), Field(min_length=1, max_length=128, pattern=r"^[\x20-\x7e]+$")]
        | None
    ) = None
    failure_reason: (
        Annotated[str, Strict(), Field(min_length=1, max_length=500, pattern=_TEXT_PATTERN)] | None
    ) = None

    reason: (
        Annotated[
            str,
            Strict(),
            Field(min_length=1, max_length=500, pattern=r"^[^\x00-\x1f\x7f-\x9f]*$"),
        ]
        | None
    ) = Field(default=None, description="Why: for the audit log (FAILED: failure_reason too).")

    @field_validator("failure_reason")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return None if value is None else _check_json_value(value, "failure_reason")


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    trip_id: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None
    status: PaymentStatus | None = None
    limit: Annotated[int, Field(ge=1, le=100)] = 20
    starting_after: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None


M = TypeVar("M", bound=BaseModel)


def validate_model(model: type[M], data: dict[str, Any], **context: Any) -> M:
    """Validate `data`, turning pydantic's errors into a 400 listing each field."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as error:
        errors = [
            {
                "field": ".".join(str(part) for part in item["loc"]) or "body",
                "message": item["msg"].removeprefix("Value error, "),
            }
            for item in error.errors(include_url=False, include_input=False)
        ]
        raise validation_error(errors) from None


# -- response documents (for /openapi.json; the bodies themselves are built in SQL) -------------
class Refund(BaseModel):
    refund_id: int
    payment_id: int
    amount: MoneyOut
    status: RefundStatus
    metadata: dict[str, Any]
    gateway_reference: str | None  # the gateway's id of the refund
    failure_code: str | None  # FAILED: the gateway's code, e.g. charge_already_refunded
    failure_message: str | None
    created_at: datetime


class Payment(BaseModel):
    payment_id: int
    trip_id: int
    amount: MoneyOut
    currency: str
    method: PaymentMethod
    status: PaymentStatus
    reference: str = Field(pattern=r"^PAY-[0-9]{8}-[0-9a-f]{8}$")
    refunded_amount: MoneyOut
    metadata: dict[str, Any]
    gateway_reference: str | None  # the gateway's id of the charge (its intent)
    failure_reason: str | None
    # FAILED: the gateway's code (card_declined, authentication_required, …) and its message;
    # manual_settlement when an operator failed it.
    failure_code: str | None
    failure_message: str | None
    created_at: datetime
    updated_at: datetime


class PendingPayment(Payment):
    message: str


class PaymentWithRefunds(Payment):
    refunds: list[Refund]


class RefundResult(BaseModel):
    """A refund's answer: REFUNDED (200), FAILED when the gateway refused it (200, with its code
    and message; the amount may be refunded again), PENDING while the gateway decides (202)."""

    payment_id: int
    refund_id: int
    refund_amount: MoneyOut
    currency: str
    status: RefundStatus
    timestamp: datetime
    payment_status: PaymentStatus
    refunded_amount: MoneyOut
    remaining_amount: MoneyOut  # neither refunded nor reserved by a refund in progress
    failure_code: str | None = None
    failure_message: str | None = None
    message: str | None = None


class RefundList(BaseModel):
    payment_id: int
    data: list[Refund]


class PaymentList(BaseModel):
    data: list[Payment]
    has_more: bool


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details; `code` is stable, `detail` is for humans."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[FieldError] | None = None


class DatabaseNode(BaseModel):
    """What the database node this worker's pool reached is: the route is open to anyone, so it
    names no address (the logs do: `database reached`)."""

    role: Literal["primary", "standby"]


class Health(BaseModel):
    status: Literal["healthy", "unhealthy"]
    service: str
    version: str
    checks: dict[str, str]
    database: DatabaseNode | None = None  # None when the database did not answer


class Liveness(BaseModel):
    status: Literal["alive"]
    service: str

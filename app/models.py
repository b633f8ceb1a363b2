"""Request parsing and the pydantic models of the API (they also generate /openapi.json).

Bodies are parsed with `json.loads(parse_float=Decimal)`, so an amount never passes through a
binary float: `0.29` is `Decimal("0.29")` from the first byte to the numeric(12,2) column.
"""

from __future__ import annotations

import json
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

INT64_MAX = 2**63 - 1
MAX_BODY_BYTES = 64 * 1024
# Bodies up to this size are read to the end before a 413, so that the client can read the answer;
# beyond it the connection is answered and closed at once.
DRAIN_BODY_BYTES = 4 * 1024 * 1024
METADATA_MAX_KEYS = 50
METADATA_MAX_BYTES = 8 * 1024
IDEMPOTENCY_KEY_MAX_CHARS = 255
CENT = Decimal("0.01")

PaymentMethod = Literal["CARD", "UPI", "WALLET", "CASH", "NETBANKING"]
PaymentStatus = Literal["PENDING", "SUCCESS", "FAILED", "PARTIALLY_REFUNDED", "REFUNDED"]


# -- pure parsing helpers ------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Parse a request body: exact decimals, no NaN/Infinity, a JSON object at the top."""
    if not raw.strip():
        raise APIError(400, "MALFORMED_JSON", "The request body is empty; send a JSON object.")
    try:
        value = json.loads(raw, parse_float=Decimal, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, "MALFORMED_JSON", "The JSON body is nested too deeply.") from None
    except ValueError as error:  # includes JSONDecodeError and UnicodeDecodeError
        raise APIError(400, "MALFORMED_JSON", f"The body is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise APIError(400, "MALFORMED_JSON", "The body must be a JSON object.")
    return value


def parse_amount(value: object) -> Decimal:
    """A positive amount with at most two decimals, from a JSON number or a decimal string."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        raise ValueError("must be a number or a decimal string")
    if isinstance(value, str):
        text = value.strip()
        if text != value or not text:
            raise ValueError('must be a decimal string such as "12.34"')
        try:
            value = Decimal(text)
        except InvalidOperation:
            raise ValueError('must be a decimal string such as "12.34"') from None
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
    """Metadata values: strings without NUL or lone surrogates, finite numbers, nested JSON."""
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
        number = float(value)
        if number in (float("inf"), float("-inf")):
            raise ValueError(f"{path}: number out of range")
        return number
    if depth > METADATA_MAX_DEPTH:
        raise ValueError(f"{path}: nested more than {METADATA_MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        return {
            _check_json_value(k, path): _check_json_value(v, f"{path}.{k}", depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_check_json_value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float):
        return value
    raise ValueError(f"{path}: not a JSON value")


def parse_metadata(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    if len(value) > METADATA_MAX_KEYS:
        raise ValueError(f"may have at most {METADATA_MAX_KEYS} keys")
    checked = _check_json_value(value, "metadata")
    size = len(json.dumps(checked, ensure_ascii=False).encode("utf-8"))
    if size > METADATA_MAX_BYTES:
        raise ValueError(f"may be at most {METADATA_MAX_BYTES} bytes encoded (got {size})")
    return checked  # type: ignore[no-any-return]


# -- field types ---------------------------------------------------------------------------------
_AMOUNT_SCHEMA = {
    "anyOf": [
        {"type": "number", "exclusiveMinimum": 0, "multipleOf": 0.01},
        {"type": "string", "pattern": r"^[0-9]+(\.[0-9]{1,2})?$"},
    ],
    "examples": [150.00, "12.34"],
}
Amount = Annotated[Decimal, BeforeValidator(parse_amount), WithJsonSchema(_AMOUNT_SCHEMA)]
MoneyOut = Annotated[Decimal, WithJsonSchema({"type": "number", "examples": [150.0]})]
IdempotencyKey = Annotated[
    str,
    Strict(),
    Field(min_length=1, max_length=IDEMPOTENCY_KEY_MAX_CHARS, pattern=r"^[\x20-\x7e]+$"),
]
TripId = Annotated[int, Strict(), Field(ge=1, le=INT64_MAX)]
Currency = Annotated[str, Strict(), Field(pattern=r"^[A-Z]{3}$")]
Metadata = Annotated[
    dict[str, Any],
    BeforeValidator(parse_metadata),
    WithJsonSchema({"type": "object", "maxProperties": METADATA_MAX_KEYS}),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CreatePayment(_Request):
    idempotency_key: IdempotencyKey | None = Field(
        default=None, description="Or the Idempotency-Key header; one of them is required."
    )
    trip_id: TripId
    method: PaymentMethod
    amount: Amount
    currency: Currency | None = None
    metadata: Metadata | None = None

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
    failure_reason: Annotated[str, Strict(), Field(min_length=1, max_length=500)] | None = None

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
    status: Literal["REFUNDED", "FAILED"]
    metadata: dict[str, Any]
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
    gateway_reference: str | None
    failure_reason: str | None
    created_at: datetime
    updated_at: datetime


class PendingPayment(Payment):
    message: str


class PaymentWithRefunds(Payment):
    refunds: list[Refund]


class RefundResult(BaseModel):
    payment_id: int
    refund_id: int
    refund_amount: MoneyOut
    currency: str
    status: Literal["REFUNDED"]
    timestamp: datetime
    payment_status: PaymentStatus
    refunded_amount: MoneyOut
    remaining_amount: MoneyOut


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


class Health(BaseModel):
    status: Literal["healthy", "unhealthy"]
    service: str
    version: str
    checks: dict[str, str]


class Liveness(BaseModel):
    status: Literal["alive"]
    service: str

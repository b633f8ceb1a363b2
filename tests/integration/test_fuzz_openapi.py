"""Fuzz the API from its own /openapi.json with schemathesis: whatever is sent, valid or
not, no answer is a 5xx, and every answer matches the document (status code, content type, body
schema). Data the document calls valid is never refused as invalid (the document says
what is enforced), and data it calls invalid is refused. The live server runs in this test's event
loop; the fuzzing (blocking requests) runs in a worker thread, so the loop keeps serving while
hypothesis generates cases.

The example budget is fixed and the generation derandomized, so a run is repeatable and bounded
(well under a minute); FUZZ_EXAMPLES raises the budget for a deeper local run.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import hypothesis
import hypothesis.errors
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from payment_service.gateway.embedded import EmbeddedGateway
from tests.integration.conftest import ApiFactory
from tests.support.api import RunningApi
from tests.support.gateway import gateway_settings

EXAMPLES_PER_OPERATION = int(os.environ.get("FUZZ_EXAMPLES", "50"))
CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Refusals of a schema-valid request that the document states but cannot express as a schema:
# business answers, and the key rules that tie the Idempotency-Key header to the body (one of the
# two is required, equal when both are sent; the header parameter's description says so).
STATED_REFUSALS = {
    "PAYMENT_NOT_REFUNDABLE",
    "REFUND_EXCEEDS_REMAINING",
    "IDEMPOTENCY_KEY_REUSED",
    "IDEMPOTENCY_KEY_MISSING",
    "IDEMPOTENCY_KEY_MISMATCH",
    # With a gateway: an amount with more decimals than the currency has (JPY 1.50), and a
    # webhook whose Stripe-Signature header does not verify (its description says so).
    "AMOUNT_NOT_REPRESENTABLE",
    "WEBHOOK_REJECTED",
}


@schemathesis.check
def schema_valid_request_is_accepted(ctx: Any, response: Any, case: schemathesis.Case) -> bool:
    """A request the document calls valid is never refused as invalid for a reason it hides."""
    if response.status_code not in (400, 422):
        return True
    code = response.json().get("code")
    if code in STATED_REFUSALS:
        return True
    raise AssertionError(
        f"a schema-valid request was refused {response.status_code} {code}: {response.text[:400]}"
    )


CHECKS = {
    GenerationMode.POSITIVE: [*CONFORMANCE, schema_valid_request_is_accepted],
    # Data the document calls invalid must be refused with a 4xx, never accepted.
    GenerationMode.NEGATIVE: [*CONFORMANCE, negative_data_rejection],
}


SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


def operation_takes_input(operation: Any) -> bool:
    definition = operation.definition.raw
    return bool(definition.get("parameters") or definition.get("requestBody"))


def fuzz(
    document: dict[str, Any], base_url: str, headers: dict[str, str] | None = None
) -> tuple[int, list[str]]:
    """Run every operation in both modes, sending `headers` too; return (cases sent, failure
    reports)."""
    schema = schemathesis.openapi.from_dict(document)
    failures: list[str] = []
    sent = [0]
    with requests.Session() as session:
        session.headers.update(headers or {})

        def runner(strategy: Any, checks: list[Any]) -> Any:
            @SETTINGS
            @hypothesis.given(case=strategy)
            def run(case: schemathesis.Case) -> None:
                sent[0] += 1
                case.call_and_validate(
                    base_url=base_url, session=session, checks=checks, timeout=10
                )

            return run

        for result in schema.get_all_operations():
            operation = result.ok()
            for mode, checks in CHECKS.items():
                try:
                    runner(operation.as_strategy(generation_mode=mode), checks)()
                except hypothesis.errors.Unsatisfiable:
                    # An operation without parameters or body has no invalid input to generate.
                    if mode is GenerationMode.POSITIVE or operation_takes_input(operation):
                        failures.append(f"{operation.label} [{mode.value}]: no case generated")
                except (Exception, BaseExceptionGroup) as error:  # report each, then go on
                    failures.append(f"{operation.label} [{mode.value}]: {error}")
    return sent[0], failures


@pytest.mark.timeout(180)
async def test_fuzz_openapi_document(api: RunningApi) -> None:
    await _fuzz_api(api)


@pytest.mark.timeout(240)
async def test_fuzz_openapi_document_with_a_gateway(
    api_factory: ApiFactory, embedded_gateway: EmbeddedGateway
) -> None:
    """The same with charges and refunds at the embedded gateway, and its webhook route."""
    api = await api_factory(**gateway_settings(embedded_gateway.base_url))
    await _fuzz_api(api)


async def _fuzz_api(api: RunningApi) -> None:
    document = (await api.client.get("/openapi.json")).json()
    operations = sum(len(methods) for methods in document["paths"].values())
    assert operations >= 6, document["paths"]

    sent, failures = await asyncio.to_thread(fuzz, document, api.base_url)

    assert not failures, "\n\n".join(failures)
    assert sent >= operations * 2 * min(EXAMPLES_PER_OPERATION, 10), sent
    health = await api.client.get("/health")
    assert health.status_code == 200


@pytest.mark.timeout(180)
async def test_fuzz_the_audit_log_and_replay_routes(api_factory: ApiFactory) -> None:
    """The audit log's filters and the replays' previews and bodies, as the admin key sends
    them (the rest of the admin API is checked by its own tests)."""
    token = "fuzzing-admin-token-for-tests-only"
    api = await api_factory(admin_api_keys=(f"ops:{token}",))
    document = (await api.client.get("/openapi.json")).json()
    wanted = ("/admin/audit", "/admin/deliveries/", "/admin/endpoints/{name}/replay")
    document["paths"] = {
        path: operations
        for path, operations in document["paths"].items()
        if path.startswith(wanted)
    }
    sent, failures = await asyncio.to_thread(
        fuzz, document, api.base_url, {"Authorization": f"Bearer {token}"}
    )
    assert not failures, "\n\n".join(failures)
    assert sent >= 5 * 2 * min(EXAMPLES_PER_OPERATION, 10), sent

"""Schema-driven fuzzing of the embedding API (schemathesis over the server's own OpenAPI document,
seeded): valid and invalid requests to every operation, over real HTTP on loopback. No request may
get a 5xx, and every answer must be one the schema documents (status, content type, body)."""

from __future__ import annotations

import collections
import time

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable

from speechmimic.serve.process import ServerProcess as Server

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

# A batch's body is safetensors: bytes, sent as schemathesis sends any binary body.
schemathesis.serializer.alias("application/x-safetensors", "application/octet-stream")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Examples per (operation, mode); hypothesis stops early on operations with little to vary.
EXAMPLES = {"POST /v1/embed": 900, "default": 120}
MIN_REQUESTS = 2000


def test_fuzzing_the_api_from_its_schema_never_gives_a_server_error(tmp_path, tiny_hf):
    with Server(tmp_path, f"hf:{tiny_hf['hubert']}?layers=all", "--max-delay-ms", "0") as server:
        token = server.key("fuzzer")
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        statuses: collections.Counter = collections.Counter()
        per_operation: collections.Counter = collections.Counter()
        failures: list[str] = []
        t = time.monotonic()
        for result in schema.get_all_operations():
            operation = result.ok()
            label = operation.label
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                examples = EXAMPLES.get(label, EXAMPLES["default"])

                @seed(0)
                @settings(
                    max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )  # fmt: skip
                @given(case=operation.as_strategy(generation_mode=mode))
                def run(case):
                    # the key in both headers, as one key: a generated X-API-Key would otherwise conflict
                    headers = {"Authorization": f"Bearer {token}", "X-API-Key": token}
                    response = case.call(base_url=server.url, headers=headers)
                    statuses[response.status_code] += 1
                    per_operation[label] += 1  # noqa: B023 (run() is called at once)
                    try:
                        case.validate_response(response, checks=CHECKS)
                    except Exception as e:  # collect, so one report lists every kind of failure
                        failures.append(f"{label} {response.status_code}: {str(e)[:300]}")  # noqa: B023

                try:
                    run()
                except Unsatisfiable:  # no invalid request exists for an operation without inputs
                    assert mode == GenerationMode.NEGATIVE
        total = sum(statuses.values())
        print(
            f"\n{total} requests in {time.monotonic() - t:.0f} s; statuses {dict(sorted(statuses.items()))}"
        )
        print(f"per operation {dict(per_operation)}")
        assert total >= MIN_REQUESTS
        assert not [s for s in statuses if s >= 500], statuses
        assert not failures, "\n".join(sorted(set(failures))[:20])
        assert statuses[200] > 0 and statuses[422] > 0  # both sides of the validation were reached

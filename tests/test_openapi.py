"""GET /openapi.json: an OpenAPI 3.1 document built from the marshmallow schemas that names
exactly the app's URL rules, each error status as problem+json. (test_fuzz.py runs it.)"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from flask import Flask

from agentkeys.blueprints.openapi import OPTIONAL, build_document, paths, served_by_default
from agentkeys.broker.factory import create_app
from agentkeys.observability import Observability
from tests.conftest import BASE_SETTINGS, MakeApp

UNDOCUMENTED_METHODS = {"HEAD", "OPTIONS"}  # Flask answers them for every rule by itself
PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


def openapi_path(rule: str) -> str:
    """A werkzeug rule as an OpenAPI path: `/a/<path:b>` is `/a/{b}`."""
    return re.sub(r"<(?:[a-z_]+:)?([a-z_]+)>", r"{\1}", rule)


def routes(app: Flask) -> set[tuple[str, str, str]]:
    """(path, method, endpoint) of every URL rule of the app."""
    return {
        (openapi_path(rule.rule), method.lower(), rule.endpoint)
        for rule in app.url_map.iter_rules()
        for method in (rule.methods or set()) - UNDOCUMENTED_METHODS
    }


def documented(document: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (path, method, operation["operationId"])
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    }


def served_document(app: Flask) -> dict[str, Any]:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert isinstance(response.json, dict)
    return response.json


def test_openapi_path() -> None:
    assert openapi_path("/v1/identities/<identity_type>/<path:identity_value>") == (
        "/v1/identities/{identity_type}/{identity_value}"
    )
    assert openapi_path("/healthz") == "/healthz"


@pytest.mark.parametrize(
    "overrides",
    [{}, {"dev_master_secret": None}],
    ids=["signer-enabled", "signer-disabled"],
)
def test_the_document_names_exactly_the_apps_rules(
    make_app: MakeApp, overrides: dict[str, Any]
) -> None:
    """A new endpoint without documentation, or a documented one that is gone, fails here."""
    app = make_app(**overrides)
    document = served_document(app)
    assert documented(document) == routes(app)
    assert len(routes(app)) == 25
    assert {operation for _, _, operation in routes(app)} == served_by_default()


def test_with_metrics_on_the_document_names_metrics_too(tmp_path: Path, sqlite_url: str) -> None:
    settings = dataclasses.replace(BASE_SETTINGS, database_url=sqlite_url)
    app = create_app(
        settings, instance_path=str(tmp_path), observability=Observability(metrics=True)
    )
    document = served_document(app)
    assert documented(document) == routes(app)
    assert ("/metrics", "get", "metrics.scrape") in routes(app)
    # Every operation of the table is served by one app or the other: none is stale.
    every = {found["operationId"] for ops in paths().values() for found in ops.values()}
    assert {operation for _, _, operation in routes(app)} == every
    assert every - served_by_default() == OPTIONAL == {"metrics.scrape"}


def test_the_document_is_valid_openapi_3_1(app: Flask) -> None:
    document = served_document(app)
    assert document["openapi"] == "3.1.0"
    assert document["servers"] == [{"url": "http://127.0.0.1:8000"}]
    schemathesis.openapi.from_dict(document).validate()
    # The check can fail: a path item that is not an object is refused.
    broken = {**document, "paths": {**document["paths"], "/healthz": "nope"}}
    with pytest.raises(Exception, match="nope"):
        schemathesis.openapi.from_dict(broken).validate()


def test_the_served_document_is_the_built_one(app: Flask) -> None:
    assert served_document(app) == build_document("http://127.0.0.1:8000", served_by_default())
    assert served_document(app) == served_document(app)


def test_request_bodies_are_the_views_marshmallow_schemas(app: Flask) -> None:
    """apispec reads the schemas the views load with: required fields, no unknown ones, and
    the formats the views check (documented only: the views answer their own codes)."""
    schemas = served_document(app)["components"]["schemas"]
    assert schemas["EmailRequest"] == {
        "type": "object",
        "properties": {"email": {"type": "string", "format": "email", "maxLength": 254}},
        "required": ["email"],
        "additionalProperties": False,
    }
    assert schemas["WalletStartRequest"] == {
        "type": "object",
        "properties": {
            "address": {
                "type": "string",
                "pattern": "^0x([0-9a-f]{40}|[0-9A-F]{40}|[0-9a-fA-F]{40})$",
            },
            "chain_id": {"type": "integer", "minimum": 1},
        },
        "required": ["address"],
        "additionalProperties": False,
    }
    operation = served_document(app)["paths"]["/v1/auth/wallet/start"]["post"]
    assert operation["requestBody"] == {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/WalletStartRequest"}}
        },
    }
    assert operation["security"] == [{}, {"identitySession": []}]


def test_the_one_error_body(app: Flask) -> None:
    document = served_document(app)
    assert document["components"]["schemas"]["Problem"] == {
        "type": "object",
        "properties": {
            "type": {"type": "string", "pattern": "^urn:agentkeys:problem:"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "error": {"type": "string", "pattern": "^[a-z0-9_]+$"},
        },
        "required": ["detail", "error", "status", "title", "type"],
        "additionalProperties": False,
    }
    responses = document["components"]["responses"]
    assert {name: r["content"] for name, r in responses.items()} == dict.fromkeys(
        [
            "BadRequest",
            "Unauthorized",
            "Forbidden",
            "NotFound",
            "Conflict",
            "RequestEntityTooLarge",
            "UnsupportedMediaType",
            "TooManyRequests",
            "BadGateway",
            "ServiceUnavailable",
        ],
        PROBLEM,
    )
    assert responses["TooManyRequests"]["headers"] == {
        "Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"}, "required": True}
    }
    assert responses["Unauthorized"]["headers"] == {
        "WWW-Authenticate": {"schema": {"type": "string"}, "required": True}
    }


def test_every_error_status_is_a_problem(app: Flask) -> None:
    """Each 4xx and 5xx is the shared problem+json response, but for the callback's pages."""
    html = []
    for path, operations in served_document(app)["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) < 400:
                    continue
                if "$ref" in response:
                    assert response["$ref"].startswith("#/components/responses/")
                else:
                    html.append((path, method, status, list(response["content"])))
    assert html == [
        ("/auth/oauth2/callback", "get", "400", ["text/html"]),
        ("/auth/oauth2/callback", "get", "502", ["text/html"]),
    ]


def test_error_statuses_of_one_operation(app: Flask) -> None:
    operation = served_document(app)["paths"]["/dev/sign-message"]["post"]
    assert {
        status: r.get("$ref", "").rsplit("/", 1)[-1] for status, r in operation["responses"].items()
    } == {
        "200": "",
        "400": "BadRequest",
        "401": "Unauthorized",
        "403": "Forbidden",
        "413": "RequestEntityTooLarge",
        "415": "UnsupportedMediaType",
        "503": "ServiceUnavailable",
    }
    assert operation["security"] == [{"identitySession": []}]

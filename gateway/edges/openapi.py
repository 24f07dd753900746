"""/openapi.json, generated from the same pydantic models the handlers serialize."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from gateway.edges.schemas import MAX_BODY_BYTES, MAX_COMMAND_BYTES, CommandIn
from keyturn import __version__
from keyturn.agent.api import CommandOut, ErrorOut, RunOut, TargetsOut


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}},
    }


def _ok(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CommandOut"}}},
    }


COMMON_ERRORS = {
    "401": _error("missing, malformed, expired or otherwise invalid bearer token"),
    "503": _error("Postgres, Vault or the target is unreachable"),
}


def build_spec() -> dict[str, Any]:
    _, schemas = models_json_schema(
        [(m, "validation") for m in (CommandIn, CommandOut, ErrorOut, RunOut, TargetsOut)],
        ref_template="#/components/schemas/{model}",
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "keyturn gateway", "version": __version__},
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/commands": {
                "post": {
                    "summary": "Submit a command for a target",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string", "maxLength": 200},
                            "description": "same key and body: same request; other body: 409",
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/CommandIn"}
                            }
                        },
                        "description": f"at most {MAX_BODY_BYTES} bytes; command at most "
                        f"{MAX_COMMAND_BYTES} bytes",
                    },
                    "responses": {
                        "200": _ok("allowed: ran at once (status executed or failed, with result)"),
                        "202": _ok("held for approval (status pending; follow wait_url)"),
                        "400": _error("bad JSON or fields"),
                        "403": _error("blocked by a rule (error.rule) or target not allowed"),
                        "404": _error("unknown target"),
                        "409": _error(
                            "Idempotency-Key reused with a different body, or too many of the"
                            " agent's requests are waiting for a human (too_many_pending)"
                        ),
                        "413": _error("body or command too large"),
                        "429": _error("rate limited (see Retry-After)"),
                        **COMMON_ERRORS,
                    },
                }
            },
            "/v1/commands/{id}": {
                "get": {
                    "summary": "Read a request; with wait, long-poll until it is final",
                    "parameters": [
                        {
                            "name": "id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "wait",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "number", "minimum": 0},
                            "description": "seconds to wait for a final state (capped by max_wait)",
                        },
                    ],
                    "responses": {
                        "200": _ok("the request (final, or still waiting when wait ran out)"),
                        "400": _error("bad wait value"),
                        "404": _error("no such request for this identity"),
                        **COMMON_ERRORS,
                    },
                }
            },
            "/v1/targets": {
                "get": {
                    "summary": "The targets this identity may use, with kind and description",
                    "responses": {
                        "200": {
                            "description": "the targets (an empty list when none is allowed)",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/TargetsOut"}
                                }
                            },
                        },
                        **COMMON_ERRORS,
                    },
                }
            },
            "/v1/runs/{id}": {
                "get": {
                    "summary": "This identity's steps of one run, in order, outputs as it saw them",
                    "parameters": [
                        {
                            "name": "id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                            "description": "at most this many steps (100)",
                        },
                        {
                            "name": "waiting",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "boolean"},
                            "description": "only its requests not yet ended (false)",
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "the run",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/RunOut"}
                                }
                            },
                        },
                        "400": _error("bad limit or waiting"),
                        "404": _error("no such run for this identity"),
                        **COMMON_ERRORS,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "security": [],
                    "responses": {"200": {"description": "alive"}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Postgres and Vault reachable",
                    "security": [],
                    "responses": {
                        "200": {"description": "ready"},
                        "503": _error("a dependency is down"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "security": [],
                    "responses": {"200": {"description": "text exposition"}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1"}},
                }
            },
        },
    }

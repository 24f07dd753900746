"""HTTP calls: one canonical rendition judged, stored, shown and sent; and the rules on them.

The attacker's stories: a path, query, header or body spelled so that a rule reads one thing
and the API another. Each is refused, or judged the way the server will read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.drivers.http.credential import Credential
from keyturn.classify import classify
from keyturn.classify.http import call_of, parse_call
from keyturn.config.loading import parse_config
from keyturn.config.policy import Config
from keyturn.config.rules import Masking
from keyturn.errors import InvalidInput
from keyturn.masking import Masker

SPEC = Path(__file__).parents[2] / "keyturn" / "harness" / "orders-api.yaml"


def text(method: str, path: str, **parts: Any) -> str:
    return call_of(method, path, **parts).render()


# ------------------------------------------------------------------ paths


@pytest.mark.parametrize(
    ("path", "judged"),
    [
        ("/orders/%2e%2e/admin", "/admin"),
        ("/orders/%2E%2E/admin", "/admin"),
        ("/orders/../admin", "/admin"),
        ("/orders/./7", "/orders/7"),
        ("/../../admin", "/admin"),  # never above the target's base path
        ("/orders/7/..", "/orders/"),
        ("/orders/caf%C3%A9", "/orders/café"),
        ("/orders/", "/orders/"),
    ],
)
def test_a_path_is_judged_as_the_segments_the_server_will_see(path: str, judged: str) -> None:
    call = call_of("GET", path)
    assert call.path == judged
    assert parse_call(call.render()).path == judged  # and sent as that, encoded


@pytest.mark.parametrize(
    "path",
    [
        "/orders%2f7",  # an encoded slash: one segment to us, two to many servers
        "/orders%2F..%2Fadmin",
        "/orders%5c7",  # an encoded backslash
        "/orders\\..\\admin",
        "//evil.example/x",  # another host, to a naive join
        "/orders//7",
        "@evil.example/x",
        "http://evil.example/x",
        "evil.example/x",
        "/orders;jsessionid=1/7",  # matrix parameters some servers strip
        "/orders%3bx=1/7",
        "/orders/%00",
        "/orders/%0d%0aX-Injected:%201",
        "/orders/%c0%ae%c0%ae/admin",  # overlong UTF-8 for ".."
        "/orders/\u00e9",  # raw non-ASCII
        "/%EF%BC%8E%EF%BC%8E/admin",  # full-width dots: ".." after NFKC
        "/orders?x=1",  # the query goes in query
        "/orders#frag",
        "/orders 7",
        "/orders/\t",
    ],
)
def test_a_path_that_could_mean_two_things_is_refused(path: str) -> None:
    with pytest.raises(InvalidInput):
        call_of("GET", path)


@given(st.lists(st.text(min_size=1, max_size=8).filter(lambda s: s not in (".", "..")), max_size=4))
def test_a_call_rendered_and_parsed_again_is_the_same_call(segments: list[str]) -> None:
    from urllib.parse import quote

    path = "/" + "/".join(quote(s, safe="") for s in segments)
    try:
        call = call_of("POST", path, query={"q": segments}, json_body=(True, {"s": segments}))
    except InvalidInput:
        return  # refused: nothing to round-trip
    again = parse_call(call.render())
    assert again == call and again.render() == call.render()


# ------------------------------------------------------------------ headers and bodies


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "authorization",
        "Cookie",
        "Host",
        "X-Forwarded-For",
        "X-Forwarded-Host",
        "Proxy-Authorization",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
    ],
)
def test_headers_an_agent_may_not_set_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="may not be set"):
        call_of("GET", "/x", headers={name: "1"})


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\x00", "\u00e9", " padded"])
def test_a_header_value_is_one_line_of_ascii(value: str) -> None:
    with pytest.raises(InvalidInput):
        call_of("GET", "/x", headers={"Accept": value})


def test_a_header_cannot_be_given_twice_in_any_spelling() -> None:
    with pytest.raises(InvalidInput, match="twice"):
        call_of("GET", "/x", headers={"Accept": "a", "accept": "b"})
    smuggled = "POST /x\nContent-Type: text/plain\nContent-Type: application/json\n\n{}"
    with pytest.raises(InvalidInput, match="twice"):
        parse_call(smuggled)
    with pytest.raises(InvalidInput, match="may not be set"):
        parse_call("POST /x\nContent-Type: text/plain\nContent-Length: 1\n\nab")


def test_a_json_body_is_judged_and_sent_as_one_serialisation() -> None:
    # duplicate keys: a rule would read the last amount, many APIs the first
    with pytest.raises(InvalidInput, match="twice"):
        call_of("POST", "/r", headers={"Content-Type": "application/json"},
                text='{"amount": 5, "amount": 5000}')  # fmt: skip
    with pytest.raises(InvalidInput):
        call_of("POST", "/r", json_body=(True, {"amount": float("nan")}))
    spelled = call_of(
        "POST", "/r", headers={"Content-Type": "application/json"},
        text='{ "amount" : 5.0e1 , "note":"\\u0061" }',
    )  # fmt: skip
    assert spelled.body == '{"amount":50.0,"note":"a"}'  # what is sent is what was judged
    assert spelled.data == {"amount": 50.0, "note": "a"}
    assert parse_call(spelled.render()) == spelled


def test_a_text_body_needs_its_type_and_utf8() -> None:
    with pytest.raises(InvalidInput, match="Content-Type"):
        call_of("POST", "/r", text="a=1")
    with pytest.raises(InvalidInput, match="UTF-8"):
        call_of("POST", "/r", headers={"Content-Type": "text/plain; charset=utf-16"}, text="x")
    with pytest.raises(InvalidInput, match="cannot be sent as"):
        call_of("POST", "/r", headers={"Content-Type": "text/plain"}, json_body=(True, {}))


# ------------------------------------------------------------------ rules


def config(**extra: Any) -> Config:
    return parse_config(
        {
            "targets": {
                "api": {"kind": "http", "base_url": "https://api.example", **extra},
            },
            "rules": [
                {"name": "no-deletes", "match": {"http": ["DELETE /orders/*"]}, "action": "block"},
                {
                    "name": "small-refunds",
                    "match": {
                        "http": ["POST /orders/*/refunds"],
                        "body": {"amount": {"at_most": 100}},
                    },
                    "action": "allow",
                },
                {
                    "name": "capped-lists",
                    "match": {"http": ["GET /orders"], "query": {"limit": {"at_most": 100}}},
                    "action": "allow",
                },
                {"name": "reads", "match": {"http": ["* /customers/**"]}, "action": "allow"},
            ],
        }
    )


def decide(cfg: Config, method: str, path: str, **parts: Any) -> tuple[str, str | None]:
    verdict = classify(cfg, "api", text(method, path, **parts))
    return verdict.action, verdict.rule.name if verdict.rule else None


def test_refunds_up_to_100_run_and_larger_ones_wait() -> None:
    cfg = config()
    assert decide(cfg, "POST", "/orders/7/refunds", json_body=(True, {"amount": 100})) == (
        "allow",
        "small-refunds",
    )
    assert decide(cfg, "POST", "/orders/7/refunds", json_body=(True, {"amount": 101}))[0] == "hold"


@pytest.mark.parametrize(
    "body",
    [
        {"amount": "50"},  # a number as text: not a number to the rule
        {"amount": True},  # true is not 1
        {"refund": 50},  # no amount at all
        {"amount": 10**400},
        [{"amount": 5}],
    ],
)
def test_a_body_condition_is_met_only_by_its_own_type(body: Any) -> None:
    assert decide(config(), "POST", "/orders/7/refunds", json_body=(True, body))[0] == "hold"


def test_equals_and_one_of_compare_json_types_too() -> None:
    data = {
        "targets": {"api": {"kind": "http", "base_url": "https://a.example"}},
        "rules": [
            {"name": "one", "match": {"http": ["POST /x"], "body": {"n": 1}}, "action": "allow"},
            {"name": "some", "match": {"http": ["POST /y"], "body": {"n": {"one_of": [1, "a"]}}},
             "action": "allow"},
        ],
    }  # fmt: skip
    cfg = parse_config(data)
    for path in ("/x", "/y"):
        assert decide(cfg, "POST", path, json_body=(True, {"n": 1}))[0] == "allow"
        assert decide(cfg, "POST", path, json_body=(True, {"n": 1.0}))[0] == "allow"
        assert decide(cfg, "POST", path, json_body=(True, {"n": True}))[0] == "hold"  # not 1
        assert decide(cfg, "POST", path, json_body=(True, {"n": "1"}))[0] == "hold"


def test_a_text_body_with_nul_is_refused_it_could_not_be_recorded() -> None:
    with pytest.raises(InvalidInput, match="NUL"):
        call_of("POST", "/r", headers={"Content-Type": "text/plain"}, text="a\x00b")


def test_a_body_that_is_not_json_meets_no_condition() -> None:
    form = {"headers": {"Content-Type": "application/x-www-form-urlencoded"}, "text": "amount=5"}
    assert decide(config(), "POST", "/orders/7/refunds", **form)[0] == "hold"


def test_a_query_parameter_sent_twice_must_be_allowed_every_time() -> None:
    cfg = config()
    assert decide(cfg, "GET", "/orders", query={"limit": 50}) == ("allow", "capped-lists")
    assert decide(cfg, "GET", "/orders", query=[["limit", "5"], ["limit", "5000"]])[0] == "hold"
    assert decide(cfg, "GET", "/orders")[0] == "hold"  # the condition's field is absent


@pytest.mark.parametrize("path", ["/orders/7", "/ORDERS/7", "/Orders/7/", "/orders/%37"])
def test_a_block_rule_reads_a_path_the_broad_way(path: str) -> None:
    assert decide(config(), "DELETE", path) == ("block", "no-deletes")


def test_an_allow_rule_reads_a_path_and_method_the_strict_way() -> None:
    cfg = config()
    assert decide(cfg, "GET", "/customers/1") == ("allow", "reads")
    assert decide(cfg, "HEAD", "/customers") == ("allow", "reads")
    assert decide(cfg, "GET", "/Customers/1")[0] == "hold"  # a case the server may fold
    for method in ("POST", "PUT", "PATCH", "DELETE"):  # "*" allows reads only
        assert decide(cfg, method, "/customers/1")[0] == "hold"
    assert decide(cfg, "GET", "/nothing")[0] == "hold"  # no rule: held


def test_the_openapi_file_refuses_what_the_api_does_not_describe() -> None:
    cfg = config(openapi=str(SPEC))
    action, rule = decide(cfg, "GET", "/admin")
    assert (action, rule) == ("block", None)
    verdict = classify(cfg, "api", text("PUT", "/orders/7"))
    assert verdict.action == "block" and "allows only DELETE, GET" in verdict.reasons[0]
    verdict = classify(
        cfg, "api", text("POST", "/orders/7/refunds", json_body=(True, {"amount": -1}))
    )
    assert (
        verdict.action == "block"
        and "body.amount: -1 is less than the minimum of 1" in verdict.reasons[0]
    )
    verdict = classify(
        cfg, "api", text("POST", "/orders/x/refunds", json_body=(True, {"amount": 1}))
    )
    assert verdict.action == "block" and "path parameter id" in verdict.reasons[0]
    assert decide(cfg, "POST", "/orders/7/refunds", json_body=(True, {"amount": 5}))[0] == "allow"


def test_rules_may_name_openapi_operations() -> None:
    data = {
        "targets": {"api": {"kind": "http", "base_url": "https://a.example", "openapi": str(SPEC)}},
        "rules": [{"name": "get-one", "match": {"operation": ["getOrder"]}, "action": "allow"}],
    }
    cfg = parse_config(data)
    assert decide(cfg, "GET", "/orders/7") == ("allow", "get-one")
    assert decide(cfg, "GET", "/orders")[0] == "hold"
    data["rules"][0]["match"] = {"operation": ["noSuchThing"]}
    with pytest.raises(InvalidInput) as refused:
        parse_config(data)
    assert "noSuchThing" in str(getattr(refused.value, "problems", ""))


def test_policy_tests_and_shadow_rules_cover_http_rules() -> None:
    data = {
        "targets": {"api": {"kind": "http", "base_url": "https://a.example"}},
        "rules": [
            {"name": "try", "match": {"http": ["DELETE /**"]}, "action": "block", "mode": "shadow"},
            {"name": "reads", "match": {"http": ["GET /**"]}, "action": "allow"},
        ],
        "tests": [{"target": "api", "command": "GET /orders", "expect": "allow", "rule": "reads"}],
    }
    verdict = classify(parse_config(data), "api", "DELETE /orders/7")
    assert verdict.action == "hold" and verdict.shadow == (("try", "block"),)


# ------------------------------------------------------------------ answers


def test_the_credential_is_scrubbed_from_an_answer_in_every_likely_spelling() -> None:
    secret = "s3cr/et+key=="
    cred = Credential.of("Authorization", f"Bearer {secret}", [secret])
    import base64
    import json
    from urllib.parse import quote

    for spelled in (secret, json.dumps(secret)[1:-1], quote(secret, safe=""),
                    base64.b64encode(secret.encode()).decode(), f"Bearer {secret}"):  # fmt: skip
        echoed = f'{{"headers": {{"Authorization": "{spelled}"}}}}'.encode()
        assert secret.encode() not in cred.scrub(echoed)
        assert spelled.encode() not in cred.scrub(echoed)
    cut = b'{"echo": "Bearer s3cr/e'
    assert not cred.scrub(cut, cut=True).endswith(b"s3cr/e")


def test_json_answers_are_masked_by_key_at_any_depth_and_by_detectors() -> None:
    masker = Masker.from_policy(
        Masking(columns=["*email*", "customers.name"], detectors=["email", "credit_card"])
    )
    shown = masker.json(
        {
            "data": [
                {"customer": {"email": "x", "name": "Ada", "note": "write to ada@example.com"}}
            ],
            "ada@example.com": "card 4111 1111 1111 1111",
        }
    )
    assert shown == {
        "data": [
            {"customer": {"email": "***", "name": "Ada", "note": "write to a***@example.com"}}
        ],
        "a***@example.com": "card ************1111",
    }

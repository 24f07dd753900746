"""HTTP calls: one canonical rendition judged, stored, shown and sent; and the rules on them.

The attacker's stories: a path, query, header or body spelled so that a rule reads one thing
and the API another. Each is refused, or judged the way the server will read it.
"""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, reject
from hypothesis import strategies as st

from gateway.drivers.http.credential import Credential
from keyturn.classify import classify
from keyturn.classify.http import call_of, parse_call
from keyturn.config.loading import parse_config
from keyturn.config.policy import Config
from keyturn.config.rules import Masking
from keyturn.errors import ConfigError, InvalidInput, TooComplex
from keyturn.masking import Masker

SPEC = Path(__file__).parents[2] / "keyturn" / "harness" / "orders-api.yaml"
API = {"api": {"kind": "http", "base_url": "https://a.example"}}  # a target for rules' tests


def text(method: str, path: str, **parts: Any) -> str:
    return call_of(method, path, **parts).render()


# ------------------------------------------------------------------ paths


@pytest.mark.parametrize(
    ("path", "judged", "sent"),
    [
        ("/orders/%2e%2e/admin", ("admin",), "/admin"),
        ("/orders/%2E%2E/admin", ("admin",), "/admin"),
        ("/orders/../admin", ("admin",), "/admin"),
        ("/orders/./7", ("orders", "7"), "/orders/7"),
        ("/../../admin", ("admin",), "/admin"),  # never above the target's base path
        ("/orders/7/..", ("orders", ""), "/orders/"),
        ("/orders/caf%C3%A9", ("orders", "caf\u00e9"), "/orders/caf%C3%A9"),
        ("/orders/%41%20b", ("orders", "A b"), "/orders/A%20b"),
        ("/orders/", ("orders", ""), "/orders/"),
    ],
)
def test_a_path_is_judged_as_the_segments_the_server_will_see(
    path: str, judged: tuple[str, ...], sent: str
) -> None:
    call = call_of("GET", path)
    assert call.segments == judged and call.target == sent
    assert parse_call(call.render()) == call  # the recorded text means the same call


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


SEGMENT_TEXT = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cc", "Cs", "Cn", "Co"), blacklist_characters="/\\;"
    ),
    min_size=1,
    max_size=8,
)


@given(st.lists(SEGMENT_TEXT, max_size=4), st.lists(SEGMENT_TEXT, max_size=3))
def test_a_call_rendered_and_parsed_again_is_the_same_call(
    segments: list[str], values: list[str]
) -> None:
    from urllib.parse import quote

    path = "/" + "/".join(quote(s, safe="") for s in segments)
    try:
        call = call_of("POST", path, query={"q": values}, json_body=(True, {"s": segments}))
    except InvalidInput:
        reject()  # a segment that only looks like . or .. after NFKC, or the like
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
        "targets": API,
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
        "targets": API,
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


# ------------------------------------------------------------------ where servers read a call differently


@pytest.mark.parametrize("limit", ["100000e-3", "1e-99999", "1_0_0", "+5", "05", " 5", "5 "])
def test_a_query_number_meets_a_numeric_condition_only_written_plainly(limit: str) -> None:
    # 100000e-3 is 100 to Python's float() and 100000 to JavaScript's parseInt
    assert decide(config(), "GET", "/orders", query={"limit": limit})[0] == "hold"


@pytest.mark.parametrize("limit", ["50", "50.5", "0", "100"])
def test_a_plain_query_number_meets_it(limit: str) -> None:
    assert decide(config(), "GET", "/orders", query={"limit": limit})[0] == "allow"


@pytest.mark.parametrize(
    "body",
    ['{"amount": 50, "AMOUNT": 100000}', '{"s": 1, "\u017f": 2}', '{"k": 1, "\u212a": 2}'],
)
def test_keys_that_are_one_key_to_a_case_blind_server_are_refused(body: str) -> None:
    with pytest.raises(InvalidInput, match="ignore case"):
        call_of("POST", "/r", headers={"Content-Type": "application/json"}, text=body)
    with pytest.raises(InvalidInput, match="ignore case"):
        call_of("POST", "/r", json_body=(True, {"x": [json.loads(body)]}))


def test_a_parameter_in_the_query_and_the_body_is_never_allowed_by_either() -> None:
    # Rails' params let the query win over the body: the server would refund 100000
    refund = {"query": {"amount": 100000}, "json_body": (True, {"amount": 50})}
    assert decide(config(), "POST", "/orders/7/refunds", **refund)[0] == "hold"
    capped = {"query": {"limit": 5}, "json_body": (True, {"limit": 5000})}
    assert decide(config(), "GET", "/orders", **capped)[0] == "hold"  # Laravel: body wins


def test_a_guard_on_a_parameter_reads_both_places_and_any_case() -> None:
    data = {
        "targets": API,
        "rules": [
            {"name": "big", "match": {"http": ["POST /r"], "body": {"amount": {"at_least": 1000}}},
             "action": "block"},
            {"name": "force", "match": {"http": ["POST /r"], "query": {"force": "true"}},
             "action": "block"},
            {"name": "ok", "match": {"http": ["POST /r"]}, "action": "allow"},
        ],
    }  # fmt: skip
    cfg = parse_config(data)
    assert decide(cfg, "POST", "/r", query={"amount": 5000}, json_body=(True, {"amount": 5})) == (
        "block",
        "big",
    )
    assert decide(cfg, "POST", "/r", json_body=(True, {"Force": "True"}))[1] == "force"
    assert decide(cfg, "POST", "/r", query={"FORCE": "TRUE"})[1] == "force"
    assert decide(cfg, "POST", "/r", json_body=(True, {"AMOUNT": 1000}))[1] == "big"
    assert decide(cfg, "POST", "/r", json_body=(True, {"amount": 5})) == ("allow", "ok")


def test_a_query_name_in_another_case_is_never_allowed() -> None:
    # ASP.NET binds LIMIT to limit and takes the first
    assert decide(config(), "GET", "/orders", query=[["LIMIT", "100000"], ["limit", "5"]])[0] == (
        "hold"
    )


def test_the_openapi_file_checks_every_copy_of_a_parameter() -> None:
    cfg = config(openapi=str(SPEC))
    verdict = classify(
        cfg, "api", text("GET", "/orders", query=[["limit", "5000"], ["limit", "50"]])
    )
    assert verdict.action == "block" and "given 2 times" in verdict.reasons[0]
    verdict = classify(cfg, "api", text("GET", "/orders", query={"LIMIT": "5000"}))
    assert verdict.action == "block" and "maximum of 100" in verdict.reasons[0]
    verdict = classify(cfg, "api", text("GET", "/orders", query={"limit": "1_0"}))
    assert verdict.action == "block" and "is not of type 'integer'" in verdict.reasons[0]


@pytest.mark.parametrize(
    "parts",
    [
        {"query": {"_method": "DELETE"}},
        {"json_body": (True, {"_METHOD": "DELETE"})},
        {
            "headers": {"Content-Type": "application/x-www-form-urlencoded"},
            "text": "_method=DELETE",
        },
    ],
)
def test_a_method_override_is_refused(parts: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput, match="_method"):
        call_of("POST", "/orders/7", **parts)


def test_many_double_stars_against_a_long_path_are_bounded_work() -> None:
    cfg = parse_config(
        {
            "targets": API,
            "rules": [
                {"name": "deep", "match": {"http": ["* /**/a/**/a/**/a/**/b"]}, "action": "block"}
            ],
        }
    )
    path = "/" + "/".join(["a"] * 1000)  # hours of backtracking for a recursive matcher
    assert decide(cfg, "GET", path)[0] == "hold"
    assert decide(cfg, "GET", path + "/b") == ("block", "deep")


def test_a_text_body_is_one_visible_line_on_the_card() -> None:
    from bot.command_view import ApiView, command_blocks

    padded = "amount=50" + "\n" * 6000 + "&amount=100000"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    command = text("POST", "/orders/7/refunds", headers=form, text=padded)
    blocks, thread = command_blocks("r1", command, False, ApiView("https://a.example", None))
    shown = json.dumps(blocks) + json.dumps(thread)
    assert "&amp;amount=100000" in shown  # escaped for Slack, shown
    assert "\\\\n\\\\n" in shown  # the line breaks, written out
    hidden = text("POST", "/x", json_body=(True, {"note": "ok\u3164"}))
    blocks, _ = command_blocks("r2", hidden, False, ApiView("https://a.example", None))
    assert "U+3164 HANGUL FILLER" in json.dumps(blocks)


def test_an_answer_that_still_carries_the_key_after_decoding_is_caught() -> None:
    key = "AKIAab+cd/ef0123456789=="
    cred = Credential.of("Authorization", f"Bearer {key}", [key])
    for echo in (
        "\\u0041KIAab\\u002Bcd\\/ef0123456789==",  # .NET and PHP escapes
        "AKIAab%2bcd%2Fef0123456789%3d%3d",  # lowercase percent-encoding
        key.encode().hex(),
        "AKIAab&#43;cd/ef0123456789==",  # an HTML entity
    ):
        assert cred.leaks(cred.scrub_text(echo)), echo
    assert not cred.leaks("an answer about something else")


def test_text_that_leaves_keyturn_is_storable() -> None:
    """A NUL or a lone surrogate (an API's answer, a command's output) cannot be stored in
    Postgres or sent as UTF-8: a request would be left half-recorded."""
    masker = Masker.from_policy(Masking())
    assert masker.text("a\x00b") == "a\ufffdb"
    assert masker.text("caf\udce9") == "caf?"
    assert masker.json({"k\x00": ["v\x00"]}) == {"k\ufffd": ["v\ufffd"]}


def test_a_cut_answer_loses_a_fixed_tail_whatever_it_holds() -> None:
    """Dropping a tail only when it looks like the key's start would tell an agent, guess
    by guess, how the key begins (an echo endpoint and a cap are enough)."""
    key = "s3cr/et+key=="
    cred = Credential.of("Authorization", f"Bearer {key}", [key])
    right = b"x" * 100 + b"Bearer s3cr/e"
    wrong = b"x" * 100 + b"Bearer zzzz/e"
    assert len(cred.scrub(right, cut=True)) == len(cred.scrub(wrong, cut=True))
    assert cred.scrub(right, cut=True) == cred.scrub(wrong, cut=True)
    assert cred.scrub(right, cut=False) == right  # whole: nothing to cut


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data; boundary=XX",
         '--XX\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--XX--'),
        ("text/json", '{"_method": "DELETE"}'),
        ("text/plain; x=/json", '{"_method": "DELETE"}'),
        ("application/x-www-form-urlencoded", "a=1;_method=DELETE"),
        ("application/x-www-form-urlencoded", "a=1& _method=DELETE"),
        ("application/x-www-form-urlencoded", "a=1&%5Fmethod=DELETE"),
    ],
)  # fmt: skip
def test_a_method_override_in_any_body_is_refused(content_type: str, body: str) -> None:
    with pytest.raises(InvalidInput, match=r"_method|json"):
        call_of("POST", "/orders/7", headers={"Content-Type": content_type}, text=body)


def test_a_body_is_json_when_its_media_type_is_and_never_ambiguously() -> None:
    call = call_of("POST", "/r", headers={"Content-Type": "text/json"}, text='{ "amount" : 5 }')
    assert call.is_json and call.data == {"amount": 5} and call.body == '{"amount":5}'
    refund = {"headers": {"Content-Type": "text/json"}, "text": '{"amount": 5000}'}
    assert decide(config(), "POST", "/orders/7/refunds", **refund)[0] == "hold"
    # JSON to Laravel (/json anywhere), a form to Rack and PHP (cut at ; , or a space)
    for ambiguous in (
        "text/plain; x=/json",
        "application/x-www-form-urlencoded; x=json",
        "application/x-www-form-urlencoded, application/json",
        "application/x-www-form-urlencoded json",
    ):
        with pytest.raises(InvalidInput, match=r"json|one type"):
            call_of("POST", "/r", headers={"Content-Type": ambiguous}, text='{"amount":50}')


@pytest.mark.parametrize(
    ("query", "parts"),
    [
        ({"r[amount]": "99999"}, {"json_body": (True, {"amount": 50})}),  # Rails' params
        ({"amount": "5"}, {"headers": {"Content-Type": "application/x-www-form-urlencoded"},
                           "text": "amount=99999"}),  # PHP's $_REQUEST
        ({"amount": "5"}, {"headers": {"Content-Type": "multipart/form-data; boundary=X"},
                           "text": "--X--"}),
    ],
)  # fmt: skip
def test_an_allow_condition_never_holds_when_a_server_may_read_the_parameter_elsewhere(
    query: dict[str, str], parts: dict[str, Any]
) -> None:
    data = {
        "targets": API,
        "rules": [
            {"name": "small", "match": {"http": ["POST /orders/*/refunds"],
             "body": {"amount": {"at_most": 100}}}, "action": "allow"},
            {"name": "small-q", "match": {"http": ["POST /orders/*/refunds"],
             "query": {"amount": {"at_most": 100}}}, "action": "allow"},
        ],
    }  # fmt: skip
    verdict = decide(parse_config(data), "POST", "/orders/7/refunds", query=query, **parts)
    assert verdict[0] == "hold"


def test_php_mangled_names_are_the_same_parameter() -> None:
    paged = parse_config(
        {
            "targets": API,
            "rules": [
                {
                    "name": "small-pages",
                    "match": {"http": ["GET /items"], "query": {"page_size": {"at_most": 100}}},
                    "action": "allow",
                },
            ],
        }
    )
    assert decide(paged, "GET", "/items", query={"page_size": "5"})[0] == "allow"
    both = [["page_size", "5"], ["page.size", "5000"]]  # PHP reads page.size as page_size
    assert decide(paged, "GET", "/items", query=both)[0] == "hold"


def test_a_guard_reads_a_form_body_too() -> None:
    data = {
        "targets": API,
        "rules": [
            {"name": "big", "match": {"http": ["POST /r"], "body": {"amount": {"at_least": 1000}}},
             "action": "block"},
        ],
    }  # fmt: skip
    form = {
        "headers": {"Content-Type": "application/x-www-form-urlencoded"},
        "text": "x=1;amount=5000",
    }
    assert decide(parse_config(data), "POST", "/r", **form) == ("block", "big")


def test_a_path_encoded_twice_is_refused() -> None:
    for path in ("/public/%252e%252e/admin", "/public/..%252Fadmin"):
        with pytest.raises(InvalidInput, match="twice"):
            call_of("GET", path)


def test_a_lone_surrogate_escape_in_a_json_text_body_is_bad_input() -> None:
    with pytest.raises(InvalidInput, match="surrogate"):
        parse_call('POST /x\nContent-Type: application/json\n\n{"a":"\\ud800"}')


async def test_an_approval_is_sent_only_where_and_with_what_the_card_showed() -> None:
    from gateway.drivers.http.driver import HttpDriver
    from gateway.usecases.driver import RunFailed

    cfg = config()
    driver = HttpDriver(cfg.policy.http_targets(), None, Masker.from_policy(Masking()))
    elsewhere = config(base_url="https://elsewhere.example").policy.http_targets()["api"]
    other_key = config(vault={"kv": "secret/other"}).policy.http_targets()["api"]
    for approved in (elsewhere, other_key):
        handoff = {"kind": "http", "base_url": approved.base_url, "where_sent": approved.where_sent}
        with pytest.raises(RunFailed, match="not the one approved"):
            await driver.run_approved("api", "GET /orders", handoff)
    await driver.close()


# ------------------------------------------------------------------ the OpenAPI file, read as servers read

SPEC_WITH_EXPORT = """
openapi: 3.0.3
info: {title: t, version: "1"}
paths:
  /orders/{id}:
    get:
      operationId: getOrder
      parameters: [{name: id, in: path, required: true, schema: {type: string}}]
  /orders/export:
    get: {operationId: exportOrders}
  /orders/{id}.json:
    get:
      operationId: getOrderJson
      parameters: [{name: id, in: path, required: true, schema: {type: integer}}]
  /items:
    get:
      operationId: listItems
      parameters: [{name: limit, in: query, schema: {type: integer, maximum: 10, nullable: true}}]
    post:
      operationId: addItem
      requestBody:
        content:
          application/x-www-form-urlencoded:
            schema: {type: object, properties: {text: {type: string, maxLength: 10}},
                     additionalProperties: false}
          multipart/form-data:
            schema: {type: object}
"""


def spec_config(tmp_path: Path, rules: list[dict[str, Any]] | None = None) -> Config:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC_WITH_EXPORT)
    target = {"kind": "http", "base_url": "https://a.example", "openapi": str(spec)}
    return parse_config({"targets": {"api": target}, "rules": rules or []})


@pytest.mark.parametrize("path", ["/orders/EXPORT", "/orders/Export", "/orders/%45xport"])
def test_an_operation_rule_cannot_be_dodged_by_case(tmp_path: Path, path: str) -> None:
    # Express routes /orders/EXPORT to /orders/export; the file's own reading is getOrder
    rules = [
        {"name": "exports", "match": {"operation": ["exportOrders"]}, "action": "hold"},
        {"name": "one", "match": {"operation": ["getOrder"]}, "action": "allow"},
    ]
    cfg = spec_config(tmp_path, rules)
    assert decide(cfg, "GET", "/orders/export") == ("hold", "exports")
    assert decide(cfg, "GET", "/orders/7") == ("allow", "one")
    verdict = classify(cfg, "api", text("GET", path))
    assert verdict.action == "block" and "ignores case" in verdict.reasons[0]


def test_templates_inside_a_segment_and_nullable_parameters_are_read(tmp_path: Path) -> None:
    cfg = spec_config(tmp_path, [{"name": "r", "match": {"http": ["GET /**"]}, "action": "allow"}])
    assert decide(cfg, "GET", "/orders/7.json") == ("allow", "r")
    # {id}.json is the nearer template: its integer id refuses x (a server may route it so)
    assert decide(cfg, "GET", "/orders/x.json")[0] == "block"
    assert decide(cfg, "GET", "/items", query={"limit": "5"}) == ("allow", "r")
    assert decide(cfg, "GET", "/items", query={"limit": "50"})[0] == "block"


def test_a_form_body_is_checked_against_its_schema_and_multipart_is_refused(
    tmp_path: Path,
) -> None:
    cfg = spec_config(
        tmp_path, [{"name": "w", "match": {"http": ["POST /items"]}, "action": "allow"}]
    )
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert decide(cfg, "POST", "/items", headers=form, text="text=short") == ("allow", "w")
    long = classify(cfg, "api", text("POST", "/items", headers=form, text="text=" + "x" * 50))
    assert long.action == "block" and "is too long" in long.reasons[0]
    extra = classify(cfg, "api", text("POST", "/items", headers=form, text="text=a&more=1"))
    assert extra.action == "block" and "Additional properties" in extra.reasons[0]
    multipart = {"Content-Type": "multipart/form-data; boundary=X"}
    parts = classify(cfg, "api", text("POST", "/items", headers=multipart, text="--X--"))
    assert parts.action == "block" and "cannot check" in parts.reasons[0]


def test_an_openapi_file_of_aliases_loads_in_its_own_size_or_is_refused(tmp_path: Path) -> None:
    from keyturn.openapi import Spec

    laughs = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    laughs += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 12)]
    bomb = tmp_path / "bomb.yaml"  # 10^12 nodes expanded; a dozen shared ones really
    bomb.write_text(
        "openapi: 3.0.3\npaths: {}\nx-laughs:\n" + "\n".join("  " + line for line in laughs)
    )
    assert Spec.load(bomb).operations == ()
    loop = tmp_path / "loop.yaml"
    loop.write_text("openapi: 3.0.3\npaths: {}\nx-loop: &a [*a]\n")
    with pytest.raises(ConfigError, match="contains itself"):
        Spec.load(loop)


# ------------------------------------------------------------------ more spellings servers read


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", ".method=DELETE"),
        ("application/x-www-form-urlencoded", "%2Emethod=DELETE"),
        ("application/x-www-form-urlencoded", "[method=DELETE"),
        ("multipart/form-data; boundary=X",
         '--X\r\nContent-Disposition: form-data; name=".method"\r\n\r\nDELETE\r\n--X--'),
    ],
)  # fmt: skip
def test_phps_renaming_cannot_smuggle_a_method_override(content_type: str, body: str) -> None:
    with pytest.raises(InvalidInput, match="_method"):
        call_of("POST", "/orders/7", headers={"Content-Type": content_type}, text=body)


def test_a_guard_folds_case_as_java_does_too() -> None:
    cfg = parse_config(
        {
            "targets": API,
            "rules": [
                {"name": "admin", "match": {"http": ["* /admin/**"]}, "action": "block"},
                {"name": "reads", "match": {"http": ["GET /**"]}, "action": "allow"},
            ],
        }
    )
    for spelled in ("/adm%C4%B1n/users", "/ADM%C4%B0N/users"):  # dotless i, dotted capital I
        assert decide(cfg, "GET", spelled) == ("block", "admin"), spelled


def test_judging_a_huge_form_body_against_many_conditions_is_bounded() -> None:
    rules = [
        {"name": f"g{i}", "match": {"http": ["POST /r"], "body": {f"f{i}": 1, f"h{i}": 2}},
         "action": "block"}
        for i in range(50)
    ]  # fmt: skip
    cfg = parse_config({"targets": API, "rules": rules})
    form = {"headers": {"Content-Type": "application/x-www-form-urlencoded"}, "text": "a&" * 30000}
    with pytest.raises(TooComplex):
        decide(cfg, "POST", "/r", **form)


# ------------------------------------------------------------------ a fifth outside round


def test_php_drops_a_parameter_names_leading_spaces() -> None:
    both = [["limit", "50"], [" limit", "5000"]]  # PHP's $_GET['limit'] is 5000
    assert decide(config(), "GET", "/orders", query=both)[0] == "hold"
    with pytest.raises(InvalidInput, match="_method"):
        call_of("POST", "/orders/7", query=[[" _method", "DELETE"]])


@pytest.mark.parametrize(
    "body",
    [
        {"amount": 50, "refund": {"amount": 5000}},  # Rails reads params[:refund][:amount]
        {"amount": 50, "items": [{"amount": 5000}]},
    ],
)
def test_an_allow_condition_needs_its_field_once_in_the_whole_body(body: Any) -> None:
    assert decide(config(), "POST", "/orders/7/refunds", json_body=(True, body))[0] == "hold"


def test_a_literal_dotted_key_is_the_dotted_field_too() -> None:
    data = {
        "targets": API,
        "rules": [
            {"name": "small", "match": {"http": ["POST /r"],
             "body": {"refund.amount": {"at_most": 100}}}, "action": "allow"},
        ],
    }  # fmt: skip
    cfg = parse_config(data)
    assert decide(cfg, "POST", "/r", json_body=(True, {"refund": {"amount": 50}})) == (
        "allow",
        "small",
    )
    lodash = {"refund.amount": 5000, "refund": {"amount": 50}}  # _.get reads the literal key
    assert decide(cfg, "POST", "/r", json_body=(True, lodash))[0] == "hold"


def test_a_query_condition_never_allows_with_the_parameter_deep_in_the_body() -> None:
    nested = {"query": {"limit": 50}, "json_body": (True, {"order": {"limit": 5000}})}
    assert decide(config(), "GET", "/orders", **nested)[0] == "hold"


def test_a_guard_reads_a_parameter_deep_in_the_body() -> None:
    data = {
        "targets": API,
        "rules": [
            {"name": "big", "match": {"http": ["POST /r"], "body": {"amount": {"at_least": 1000}}},
             "action": "block"},
        ],
    }  # fmt: skip
    deep = {"amount": 5, "refund": {"amount": 5000}}
    assert decide(parse_config(data), "POST", "/r", json_body=(True, deep)) == ("block", "big")


def _decodable(text: bytes, altchars: bytes) -> bytes:
    """Everything an agent could decode from the base64 runs left in ``text``."""
    out = b""
    for run in text.split(b"***"):
        for skip in range(4):
            piece = run[skip:]
            piece = piece[: len(piece) - len(piece) % 4]
            with contextlib.suppress(ValueError):
                out += base64.b64decode(piece, altchars=altchars) + b"|"
    return out


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4, 5])
def test_the_key_in_base64_is_cut_out_at_any_alignment(offset: int) -> None:
    # an echo that base64-encodes the whole request: the agent shifts the key's alignment
    key = "AKIAab+cd/ef0123456789=="
    cred = Credential.of("Authorization", f"Bearer {key}", [key])
    echoed = ("x" * offset + f"Authorization: Bearer {key}\r\nHost: api\r\n").encode()
    for encode, altchars in ((base64.b64encode, b"+/"), (base64.urlsafe_b64encode, b"-_")):
        left = _decodable(cred.scrub(encode(echoed)), altchars)
        assert key[2:-2].encode() not in left, (offset, altchars)


def test_a_fence_in_a_command_never_closes_the_cards_code_block() -> None:
    from bot.slack_text import code_block

    for hostile in ("a````b", "`````", "x`", "`x", "``` ```"):
        inside = code_block(hostile)[3:-3]
        assert "```" not in inside and not inside.startswith("`") and not inside.endswith("`")

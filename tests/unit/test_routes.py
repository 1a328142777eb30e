"""Routes (pibl.routes): first match in order, host tables, rewrites, access, warnings."""

from __future__ import annotations

from typing import Any

import pytest

from pibl.config import validate
from pibl.errors import ConfigError
from pibl.routes import Router, compile_routes, normalize_host, route_warnings

WEB = {"backends": [{"url": "http://127.0.0.1:9001"}]}
API = {"backends": [{"url": "http://127.0.0.1:9002"}]}


def config(*routes: dict[str, Any], **extra: Any) -> Any:
    return validate({"pools": {"web": WEB, "api": API}, "routes": list(routes), **extra}, "t")


def router(*routes: dict[str, Any]) -> Router:
    return Router(compile_routes(config(*routes)))


def pick(r: Router, host: str, path: str = "/", method: str = "GET", **headers: str) -> str | None:
    hdrs = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    route = r.match(host.encode(), path.encode(), method.encode(), hdrs)
    return None if route is None else route.name


TWO_APPS = (
    {"name": "api", "host": "api.example.com", "path_prefix": "/v1/", "pool": "api"},
    {"name": "wild", "host": "*.example.com", "pool": "api"},
    {"name": "post", "methods": ["POST"], "path_prefix": "/form", "pool": "api"},
    {"name": "hdr", "headers": ["X-Debug"], "pool": "api"},
    {"name": "web", "path_prefix": "/", "pool": "web"},
)


@pytest.mark.parametrize(
    ("host", "path", "method", "headers", "expected"),
    [
        ("api.example.com", "/v1/users", "GET", {}, "api"),
        ("API.Example.com:8080", "/v1/users", "GET", {}, "api"),
        ("api.example.com.", "/v1/x", "GET", {}, "api"),
        ("api.example.com", "/v2/users", "GET", {}, "wild"),  # the wildcard catches it
        ("www.example.com", "/", "GET", {}, "wild"),
        ("example.com", "/", "GET", {}, "web"),  # *.example.com is not example.com itself
        ("evil-example.com", "/", "GET", {}, "web"),
        ("site.test", "/form", "POST", {}, "post"),
        ("site.test", "/form", "GET", {}, "web"),
        ("site.test", "/x", "GET", {"X_Debug": "1"}, "hdr"),
        ("site.test", "/x", "GET", {}, "web"),
    ],
)
def test_first_match_in_order(
    host: str, path: str, method: str, headers: dict[str, str], expected: str
) -> None:
    assert pick(router(*TWO_APPS), host, path, method, **headers) == expected


def test_no_match_is_none() -> None:
    r = router({"host": "a.test", "pool": "web"})
    assert pick(r, "b.test") is None


def test_regex_and_host_lists() -> None:
    r = router(
        {"name": "img", "path_regex": r"\.(png|jpg)$", "pool": "api"},
        {"name": "two", "host": ["a.test", "b.test"], "pool": "web"},
    )
    assert pick(r, "x.test", "/a/b.png") == "img"
    assert pick(r, "b.test", "/a/b.txt") == "two"
    assert pick(r, "c.test", "/a/b.txt") is None


def test_a_file_without_routes_has_one_catch_all() -> None:
    cfg = validate(WEB, "t")
    routes = compile_routes(cfg)
    assert len(routes) == 1 and routes[0].pool == "default"
    assert Router(routes).match(b"anything", b"/x", b"DELETE", []) is routes[0]


@pytest.mark.parametrize(
    ("prefix", "strip", "replace", "target", "expected"),
    [
        ("/api/", True, None, b"/api/users?x=1", b"/users?x=1"),
        ("/api", True, None, b"/api/users", b"/users"),
        ("/api", True, None, b"/api", b"/"),
        ("/old/", False, "/new/", b"/old/a", b"/new/a"),
        ("/old", False, "/new", b"/old/a", b"/new/a"),
    ],
)
def test_prefix_rewrites(
    prefix: str, strip: bool, replace: str | None, target: bytes, expected: bytes
) -> None:
    entry: dict[str, Any] = {"path_prefix": prefix, "pool": "web", "strip_prefix": strip}
    if replace is not None:
        entry["replace_prefix"] = replace
    (route,) = compile_routes(config(entry))
    assert route.rewrite_target(target) == expected


def test_header_plans() -> None:
    (route,) = compile_routes(
        config(
            {
                "pool": "web",
                "request_headers": {"add": {"X-App": "shop"}, "remove": ["Cookie"]},
                "response_headers": {"add": {"Cache-Control": "public"}, "remove": ["Server"]},
            }
        )
    )
    req = [(b"Host", b"a"), (b"cookie", b"x=1"), (b"X-App", b"old")]
    assert route.request_edits.apply(req) == [(b"Host", b"a"), (b"X-App", b"shop")]
    resp = [(b"Server", b"x"), (b"Cache-Control", b"private")]
    assert route.response_edits.apply(resp) == [(b"Cache-Control", b"public")]


@pytest.mark.parametrize(
    ("allow", "deny", "client", "ok"),
    [
        (["10.0.0.0/8"], [], "10.1.2.3", True),
        (["10.0.0.0/8"], [], "192.168.1.1", False),
        (["10.0.0.0/8"], ["10.9.0.0/16"], "10.9.1.1", False),
        (None, ["127.0.0.1"], "127.0.0.1", False),
        (None, ["127.0.0.1"], "127.0.0.2", True),
        (["::1", "127.0.0.0/8"], [], "::ffff:127.0.0.1", True),
        (["10.0.0.0/8"], [], "not an address", False),
    ],
)
def test_access_rules(allow: list[str] | None, deny: list[str], client: str, ok: bool) -> None:
    entry: dict[str, Any] = {"pool": "web", "deny": deny}
    if allow is not None:
        entry["allow"] = allow
    (route,) = compile_routes(config(entry))
    assert route.allowed(client) is ok
    assert route.allowed(client) is ok  # (cached)


def test_redirect_and_fixed_answers() -> None:
    redirect, fixed = compile_routes(
        config(
            {"path_prefix": "/old", "redirect": {"to": "https://new.test$path", "status": 301}},
            {"path_prefix": "/ping", "respond": {"status": 200, "body": "pong"}},
        )
    )
    assert redirect.redirect_location(b"/old/a?b=1") == b"https://new.test/old/a?b=1"
    assert redirect.redirect == (301, b"https://new.test$path")
    assert fixed.respond == (200, b"pong", b"text/plain; charset=utf-8")


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ([{"pool": "nope"}], "routes[0]: no pool named 'nope'"),
        ([{"pool": "web", "respond": {"body": "x"}}], "has both pool and respond"),
        ([{"pool": "web", "host": "a b"}], "is not a host name"),
        ([{"pool": "web", "path_regex": "("}], "not a valid regular expression"),
        ([{"pool": "web", "allow": ["10.0.0.0/33"]}], "is not an address or network"),
        ([{"pool": "web", "strip_prefix": True}], "need a path_prefix"),
        ([{"pool": "web", "methods": ["get"]}], "upper-case method"),
        ([{"pool": "web", "limit": {"rate": 1, "key": "cookie"}}], "header:NAME"),
        ([{"pool": "web", "mirror": {"pool": "nope"}}], "no pool named 'nope'"),
    ],
)
def test_invalid_routes_name_the_key(routes: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(*routes)
    assert message in str(info.value)
    assert str(info.value).startswith("t: ")


def test_old_single_list_files_stay_valid() -> None:
    cfg = validate(WEB, "t")
    assert cfg.pools == {} and cfg.routes == ()
    with pytest.raises(ConfigError):
        validate({}, "t")
    with pytest.raises(ConfigError) as info:
        validate({"pools": {"web": WEB, "api": API}}, "t")
    assert "no [[routes]]" in str(info.value)


def test_unreachable_routes_are_warned_about() -> None:
    cfg = config(
        {"name": "all", "pool": "web"},
        {"name": "late", "path_prefix": "/api", "pool": "api"},
    )
    assert route_warnings(cfg) == [
        "routes[1] (late) is never reached: routes[0] (all) matches everything it does"
    ]
    cfg = config(
        {"name": "wild", "host": "*.example.com", "pool": "web"},
        {"name": "sub", "host": "a.example.com", "path_prefix": "/x", "pool": "api"},
        {"name": "other", "host": "example.org", "pool": "api"},
    )
    assert route_warnings(cfg) == [
        "routes[1] (sub) is never reached: routes[0] (wild) matches everything it does"
    ]
    assert route_warnings(config(*TWO_APPS)) == []


@pytest.mark.parametrize(
    ("raw", "name"),
    [(b"Example.COM", "example.com"), (b"a.test:8080", "a.test"), (b"[::1]:80", "[::1]")],
)
def test_normalize_host(raw: bytes, name: str) -> None:
    assert normalize_host(raw) == name


def test_trusted_proxies_give_the_rightmost_untrusted_forwarded_address() -> None:
    from pibl.routes import TrustedProxies

    trusted = TrustedProxies(["10.0.0.0/8", "127.0.0.1"])
    xff = [(b"X-Forwarded-For", b"203.0.113.9, 198.51.100.7"), (b"x-forwarded-for", b"10.1.1.1")]
    assert trusted.client("127.0.0.1", xff) == "198.51.100.7"
    assert trusted.client("192.0.2.1", xff) == "192.0.2.1"  # an untrusted peer's word is not taken
    assert trusted.client("127.0.0.1", []) == "127.0.0.1"
    assert trusted.client("127.0.0.1", [(b"X-Forwarded-For", b"10.2.2.2")]) == "10.2.2.2"
    assert trusted.client("127.0.0.1", [(b"X-Forwarded-For", b"junk")]) == "127.0.0.1"
    assert not TrustedProxies([])


@pytest.mark.parametrize(
    "target",
    [b"/admin/x", b"/%61dmin/x", b"//admin/x", b"/./admin/x", b"/x/../admin/x", b"/admin/x?y=1"],
)
def test_paths_are_matched_as_the_backend_understands_them(target: bytes) -> None:
    r = router(
        {"name": "admin", "path_prefix": "/admin/", "pool": "web", "allow": ["10.0.0.0/8"]},
        {"name": "rest", "pool": "api"},
    )
    route = r.match(b"a.test", target, b"GET", [])
    assert route is not None and route.name == "admin"
    assert not route.allowed("127.0.0.1")


@pytest.mark.parametrize(
    ("target", "path"),
    [
        (b"/a%2Fb", b"/a%2Fb"),  # an encoded slash is data, not a separator
        (b"/a%2fb", b"/a%2Fb"),
        (b"/%7Euser", b"/~user"),
        (b"/a/./b/../c", b"/a/c"),
        (b"/../../etc", b"/etc"),
        (b"/a//b/", b"/a/b/"),
        (b"/img.png?v=2", b"/img.png"),
        (b"", b"/"),
        (b"/%zz", b"/%zz"),
    ],
)
def test_normalize_path(target: bytes, path: bytes) -> None:
    from pibl.routes import normalize_path

    assert normalize_path(target) == path


def test_a_regex_sees_the_path_without_the_query() -> None:
    r = router(
        {"name": "img", "path_regex": r"\.png$", "pool": "api"}, {"name": "rest", "pool": "web"}
    )
    assert pick(r, "a.test", "/a.png?v=2") == "img"


def test_a_rewrite_applies_to_the_path_as_matched() -> None:
    (route,) = compile_routes(config({"path_prefix": "/api/", "strip_prefix": True, "pool": "web"}))
    assert route.rewrite_target(b"//api/users?x=1") == b"/users?x=1"


def test_a_route_may_set_host_but_not_what_pibl_owns() -> None:
    from pibl.http.message import RequestHead

    (route,) = compile_routes(
        config({"pool": "web", "request_headers": {"add": {"Host": "inner"}}})
    )
    head = RequestHead(
        method=b"GET", target=b"/", version=b"1.1", headers=[(b"Host", b"outer")], host=b"outer"
    )
    assert route.upstream_head(head).host == b"inner"
    with pytest.raises(ConfigError) as info:
        config({"pool": "web", "request_headers": {"add": {"X-Forwarded-For": "1.2.3.4"}}})
    assert "set by PIBL itself" in str(info.value)


def test_without_a_default_pool_every_route_needs_an_action() -> None:
    with pytest.raises(ConfigError) as info:
        config({"path_prefix": "/x", "cache": False})
    assert "needs pool, redirect or respond" in str(info.value)


def test_a_chosen_coding_without_its_package_is_warned_about(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pibl.compress

    monkeypatch.setattr(pibl.compress, "available_encodings", lambda: ("br", "gzip"))
    chosen = validate({**WEB, "compression": {"encodings": ["zstd", "gzip"]}}, "t")
    assert any("zstandard package is not installed" in w for w in route_warnings(chosen))
    assert route_warnings(validate(WEB, "t")) == []  # the default list is not a choice

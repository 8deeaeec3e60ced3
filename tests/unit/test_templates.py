"""Sandboxed Secret templates: the language, its refusals, and its bounds."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr

from tokensync.controller import templates
from tokensync.controller.templates import (
    FIELDS,
    MAX_FILTERS,
    MAX_TOTAL_BYTES,
    MAX_VALUE_BYTES,
    TemplateError,
    compile_template,
    render_templates,
    template_values,
)
from tokensync.models.tokens import TokenSet

TOKEN = "eyJhbGciOi.SECRET-token-value_42"

VALUES = {
    "access_token": TOKEN,
    "token_type": "Bearer",
    "expires_at": "2025-01-01T01:00:00Z",
    "issued_at": "2025-01-01T00:00:00Z",
    "scope": "read write",
    "id_token": "",
    # Present in the mapping on purpose: templates still must not reach it.
    "refresh_token": "REFRESH-never-leaves",
}


def render(source: str, values: dict[str, str] = VALUES, key: str = "k") -> str:
    return compile_template(key, source).render(values)


def error(source: str, key: str = "k") -> str:
    with pytest.raises(TemplateError) as caught:
        compile_template(key, source)
    assert caught.value.key == key
    assert str(caught.value).startswith(f"target.template[{key}]: ")
    return str(caught.value)


# -- the language ---------------------------------------------------------------------------------


def test_plain_text_and_fields():
    assert render("") == ""
    assert render("no placeholders }} at all") == "no placeholders }} at all"
    assert render("{{ token_type }} {{ access_token }}") == f"Bearer {TOKEN}"
    assert render("{{access_token}}") == TOKEN
    assert render("{{\n  scope\n}}") == "read write"
    assert render("{{ expires_at }}/{{ issued_at }}") == "2025-01-01T01:00:00Z/2025-01-01T00:00:00Z"


def test_absent_fields_render_empty():
    assert render("[{{ id_token }}]") == "[]"
    assert render("[{{ scope }}]", {"access_token": "a"}) == "[]"


def test_concatenation_and_literals():
    assert render("{{ 'a' ~ \"b\" ~ token_type }}") == "abBearer"
    assert render("{{ '' }}") == ""
    assert render(r"""{{ "say \"hi\"" }}""") == 'say "hi"'
    assert render(r"""{{ 'it\'s' }}""") == "it's"
    assert render(r"""{{ "back\\slash" }}""") == "back\\slash"
    assert render("""{{ "it's " ~ 'say "x"' }}""") == """it's say "x\""""
    assert render('{{ "}}" }}') == "}}"
    assert render('{{ "{{" }}') == "{{"
    assert render('{{ "{%" }}') == "{%"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ 'a:b' | b64enc }}", base64.b64encode(b"a:b").decode()),
        ("{{ 'héllo' | b64enc }}", base64.b64encode("héllo".encode()).decode()),
        ("{{ 'say \"x\"\\\\' | json }}", '"say \\"x\\"\\\\"'),
        ("{{ 'é' | json }}", '"\\u00e9"'),
        ("{{ 'MiXed' | upper }}", "MIXED"),
        ("{{ 'MiXed' | lower }}", "mixed"),
        ("{{ '  padded \t' | trim }}", "padded"),
        ("{{ 'a b&c=d/é~' | urlencode }}", "a%20b%26c%3Dd%2F%C3%A9~"),
        ("{{ ' x ' | trim | upper | json }}", '"X"'),
    ],
)
def test_filters(source, expected):
    assert render(source) == expected


def test_filters_apply_to_the_whole_concatenation():
    assert render("{{ 'user:' ~ access_token | b64enc }}") == base64.b64encode(f"user:{TOKEN}".encode()).decode()


def test_dockerconfigjson():
    source = (
        '{"auths":{"ghcr.io":{"username":"oauth2accesstoken","password":{{ access_token | json }},'
        '"auth":{{ "oauth2accesstoken:" ~ access_token | b64enc | json }}}}}'
    )
    token = 'tok"with\\odd</chars>'
    document = json.loads(render(source, {"access_token": token}))
    registry = document["auths"]["ghcr.io"]
    assert registry["password"] == token
    assert base64.b64decode(registry["auth"]).decode() == f"oauth2accesstoken:{token}"


def test_authorization_header():
    assert render_templates({"Authorization": "{{ token_type }} {{ access_token }}"}, VALUES) == {
        "Authorization": f"Bearer {TOKEN}"
    }


def test_render_templates_renders_every_key_in_order():
    out = render_templates({"b": "{{ scope | upper }}", "a": "x{{ token_type }}"}, VALUES)
    assert out == {"b": "READ WRITE", "a": "xBearer"}
    assert list(out) == ["b", "a"]


def test_compilation_is_cached():
    templates._compile.cache_clear()
    first = compile_template("a", "{{ access_token }}")
    second = compile_template("b", "{{ access_token }}")
    assert first.parts is second.parts
    assert (first.key, second.key) == ("a", "b")
    assert templates._compile.cache_info().hits == 1


def test_template_values_from_a_token_set():
    issued = datetime(2025, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    token = TokenSet(
        access_token=SecretStr("acc"),
        refresh_token=SecretStr("REFRESH"),
        id_token=SecretStr("idt"),
        scope="openid",
        issued_at=issued,
        expires_at=issued + timedelta(hours=1),
    )
    values = template_values(token)
    assert values == {
        "access_token": "acc",
        "token_type": "Bearer",
        "expires_at": "2025-01-01T01:00:00Z",
        "issued_at": "2025-01-01T00:00:00Z",
        "scope": "openid",
        "id_token": "idt",
    }
    assert set(values) == FIELDS
    assert "REFRESH" not in values.values()
    bare = template_values(TokenSet(access_token=SecretStr("acc"), issued_at=issued))
    assert bare["expires_at"] == bare["scope"] == bare["id_token"] == ""


# -- refusals -------------------------------------------------------------------------------------


def test_refresh_token_is_refused_by_name():
    message = error('{"t": {{ refresh_token }}}', key=".dockerconfigjson")
    assert message.startswith("target.template[.dockerconfigjson]: unknown field 'refresh_token' at column 10")
    assert "never leaves the store" in message
    assert "REFRESH-never-leaves" not in message


def test_unknown_field_names_key_name_and_column():
    assert error("Bearer {{ acess_token }}", key="Authorization").startswith(
        "target.template[Authorization]: unknown field 'acess_token' at column 11"
    )


def test_unknown_filter():
    message = error("{{ access_token | b64dec }}")
    assert message.startswith("target.template[k]: unknown filter 'b64dec' at column 19")
    assert "b64enc" in message  # lists what exists


def test_multi_line_positions():
    assert "at line 2, column 4" in error("line one\n{{ nope }}")


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("{{ access_token", "unclosed '{{' at column 1"),
        ("abc {{ access_token | json", "unclosed '{{' at column 5"),
        ("{{ access_token ~", "unclosed '{{' at column 1"),
        ("{{", "unclosed '{{' at column 1"),
        ("{{ }}", "empty expression at column 4"),
        ('{{ "open }}', "unterminated string literal at column 4"),
        (r"{{ 'a\n' }}", "unknown escape in string literal at column 6"),
        ("{{ access_token | }}", "expected a filter name"),
        ("{{ access_token token_type }}", "unexpected 't' at column 17"),
        ("{{ access_token | json ~ scope }}", "'~' after a filter"),
        ("{{ ~ access_token }}", "unexpected '~'"),
    ],
)
def test_syntax_errors(source, problem):
    assert problem in error(source)


@pytest.mark.parametrize(
    "source",
    [
        "{{ access_token.__class__ }}",
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ access_token[0] }}",
        "{{ access_token() }}",
        "{{ access_token | upper() }}",
        "{{ access_token | truncate(3) }}",
        "{{ lipsum }}",
        "{{ lipsum.__globals__ }}",
        "{{ config }}",
        "{{ self }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ __import__('os') }}",
        "{{ range(10) }}",
        "{{ 7*7 }}",
        "{{ access_token if true }}",
        "{% for x in range(10) %}x{% endfor %}",
        "{%- set x = 1 -%}",
        "{# a comment #}",
        "{{ access_token }}{% if x %}",
        "${{ access_token }}{{ env.HOME }}",
    ],
)
def test_jinja_style_escapes_are_errors(source):
    error(source)


def test_jinja_lookalikes_in_text_are_only_text():
    assert render("${ access_token } {access_token} { {access_token} }") == (
        "${ access_token } {access_token} { {access_token} }"
    )


def test_filter_chain_is_capped():
    ok = "{{ access_token" + " | trim" * MAX_FILTERS + " }}"
    assert render(ok) == TOKEN
    assert f"more than {MAX_FILTERS} filters" in error("{{ access_token" + " | trim" * (MAX_FILTERS + 1) + " }}")


def test_template_source_length_is_capped():
    assert "longer than" in error("x" * (templates.MAX_SOURCE_CHARS + 1))


# -- bounds ---------------------------------------------------------------------------------------


def test_value_bound():
    big = {"access_token": "a" * (MAX_VALUE_BYTES - 2)}
    assert len(render("[{{ access_token }}]", big)) == MAX_VALUE_BYTES
    with pytest.raises(TemplateError, match=r"^target\.template\[k\]: rendered value exceeds 65536 bytes$"):
        render("[{{ access_token }}]!", big)


def test_value_bound_counts_utf8_bytes():
    values = {"access_token": "é" * (MAX_VALUE_BYTES // 2)}  # 2 bytes each
    assert render("{{ access_token }}", values)
    with pytest.raises(TemplateError):
        render("{{ access_token }}.", values)


def test_value_bound_is_checked_inside_concatenations_and_filter_chains():
    values = {"access_token": '"\\' * 200}
    # Each `json` roughly doubles the backslashes: without a check after every
    # step this would allocate far past the bound before noticing.
    hostile = "{{ access_token" + " | json" * MAX_FILTERS + " }}"
    started = time.perf_counter()
    with pytest.raises(TemplateError, match="exceeds"):
        render(hostile, values)
    concat = "{{ " + " ~ ".join(["access_token"] * 1000) + " }}"
    with pytest.raises(TemplateError, match="exceeds"):
        render(concat, {"access_token": "x" * 1024})
    assert time.perf_counter() - started < 2


def test_many_placeholders_hit_the_bound():
    source = "{{ access_token }}" * 900
    with pytest.raises(TemplateError, match="exceeds"):
        render(source, {"access_token": "x" * 100})


def test_total_bound_names_the_key():
    big = "x" * (MAX_VALUE_BYTES - 10)
    n = MAX_TOTAL_BYTES // len(big)  # this many fit
    sources = {f"k{i}": "{{ access_token }}" for i in range(n)}
    assert len(render_templates(sources, {"access_token": big})) == n
    sources[f"k{n}"] = "{{ access_token }}"
    with pytest.raises(TemplateError) as caught:
        render_templates(sources, {"access_token": big})
    assert caught.value.key == f"k{n}"
    assert str(caught.value) == f"target.template[k{n}]: rendered values exceed {MAX_TOTAL_BYTES} bytes in total"


def test_render_templates_reports_compile_errors_by_key():
    with pytest.raises(TemplateError, match=r"^target\.template\[bad\]: unknown field 'nope'"):
        render_templates({"good": "{{ access_token }}", "bad": "{{ nope }}"}, VALUES)


# -- no token value in any error ------------------------------------------------------------------


@pytest.mark.parametrize(
    "templates_",
    [
        {"a": "{{ access_token }}" * 900},
        {"a": "{{ access_token }}", "b": "{{ access_token }}" * 30},
        {"a": "{{ access_token" + " | json" * MAX_FILTERS + " }}"},
        {"a": "{{ access_token }}", "b": "{{ refresh_token }}"},
        {"a": "{{ access_token.x }}"},
        {"a": "{{ access_token | nope }}"},
    ],
)
def test_errors_never_contain_token_values(templates_):
    values = {"access_token": "T0KEN-" + "\\" * 3000, "refresh_token": "R3FRESH"}
    with pytest.raises(TemplateError) as caught:
        render_templates(templates_, values)
    text = f"{caught.value} {caught.value!r} {caught.value.args}"
    assert "T0KEN" not in text
    assert "R3FRESH" not in text
    # Nor in a chained exception a traceback would print.
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__

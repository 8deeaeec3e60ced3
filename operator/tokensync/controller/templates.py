"""Sandboxed templates that shape the target Secret (``spec.target.template``).

A template maps a Secret key to text with ``{{ expr }}`` placeholders, for values
such as an ``Authorization`` header or a registry's ``.dockerconfigjson``::

    Bearer {{ access_token }}
    {"auths":{"ghcr.io":{"auth":{{ "oauth2accesstoken:" ~ access_token | b64enc | json }}}}}

Why not Jinja: templates are written by tenants and run inside the operator, next
to every tenant's tokens. Even Jinja's sandbox exposes attribute access, loops and
a large surface that has had escapes; and nothing here needs more than "put this
token field here, encoded like so". So this is a tiny language instead, designed so
that it *cannot* do anything else:

* ``expr := atom ('~' atom)* ('|' filter)*``; an atom is a field name or a quoted
  string literal (``\\\\``, ``\\"`` and ``\\'`` escapes). ``~`` concatenates. Filters
  apply to the whole concatenation, left to right (unlike Jinja, where ``|`` binds
  tighter than ``~``): ``"user:" ~ access_token | b64enc`` encodes both.
* No attribute or item access, no calls, no loops, no statements: ``{%`` and
  ``{#`` are errors rather than text, so a Jinja template pasted in fails loudly
  instead of leaking its syntax into a Secret.
* Fields are a fixed list (:data:`FIELDS`). ``refresh_token`` is not one of them:
  it never leaves the store, and a template is exactly the way it would leak.
* Parsing is one left-to-right pass; rendering is bounded: each value at most
  :data:`MAX_VALUE_BYTES`, all of them at most :data:`MAX_TOTAL_BYTES` (a Secret
  holds at most 1 MiB), checked after every concatenation and filter step so a
  chain like ``| json | json | json`` cannot blow up before the check.
* Errors name the Secret key and a column and never contain a token value: compile
  errors only ever see the template, and render errors only report sizes.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

from tokensync.models.tokens import TokenSet

__all__ = [
    "FIELDS",
    "FILTERS",
    "MAX_FILTERS",
    "MAX_SOURCE_CHARS",
    "MAX_TOTAL_BYTES",
    "MAX_VALUE_BYTES",
    "Template",
    "TemplateError",
    "compile_template",
    "render_templates",
    "template_values",
]

#: What a template may reference. Absent values (no ``id_token``, unknown expiry)
#: render as empty strings, so a template does not break when an IdP omits one.
FIELDS = frozenset({"access_token", "token_type", "expires_at", "issued_at", "scope", "id_token"})

MAX_SOURCE_CHARS = 16384  # as spec.target.template's maxLength in the CRD
MAX_VALUE_BYTES = 64 * 1024
MAX_TOTAL_BYTES = 512 * 1024  # half of a Secret's 1 MiB, leaving room for the other keys
#: Real templates use two or three filters; a cap keeps a hostile chain's work small.
MAX_FILTERS = 8


def _json(value: str) -> str:
    return json.dumps(value)  # ASCII-only: safe to embed anywhere in a JSON document


def _b64enc(value: str) -> str:
    return base64.b64encode(value.encode("utf-8")).decode("ascii")


def _urlencode(value: str) -> str:
    return urllib.parse.quote(value, safe="")  # everything but RFC 3986 unreserved characters


FILTERS: Mapping[str, Callable[[str], str]] = {
    "b64enc": _b64enc,
    "json": _json,
    "lower": str.lower,
    "trim": str.strip,
    "upper": str.upper,
    "urlencode": _urlencode,
}


class TemplateError(ValueError):
    """A template that does not compile or render; the message names the Secret key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"target.template[{key}]: {problem}")
        self.key = key
        self.problem = problem


class _Problem(Exception):
    """A compile error before the key is known (compilation is cached by source alone)."""

    def __init__(self, problem: str, offset: int | None = None, hint: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.offset = offset
        self.hint = hint


class _TooLarge(Exception):
    """Rendering passed its byte budget; carries no text on purpose."""


def _size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


@dataclass(frozen=True, slots=True)
class _Field:
    name: str


@dataclass(frozen=True, slots=True)
class _Expr:
    atoms: tuple[_Field | str, ...]
    filters: tuple[Callable[[str], str], ...]

    def evaluate(self, values: Mapping[str, str], budget: int) -> str:
        """The expression's value, or :class:`_TooLarge` as soon as it passes ``budget`` bytes."""
        pieces: list[str] = []
        size = 0
        for atom in self.atoms:
            piece = values.get(atom.name, "") if isinstance(atom, _Field) else atom
            size += _size(piece)
            if size > budget:
                raise _TooLarge
            pieces.append(piece)
        text = "".join(pieces)
        for apply in self.filters:
            text = apply(text)
            if _size(text) > budget:
                raise _TooLarge
        return text


_Part = str | _Expr
_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_REST = _NAME_START | frozenset("0123456789")


def _where(source: str, offset: int) -> str:
    """``column N`` (1-based), with the line for multi-line templates."""
    line = source.count("\n", 0, offset) + 1
    column = offset - (source.rfind("\n", 0, offset) + 1) + 1
    return f"line {line}, column {column}" if "\n" in source else f"column {column}"


class _Parser:
    """One pass over the source; every loop advances ``pos``, so parsing is linear."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.pos = 0

    def parse(self) -> tuple[_Part, ...]:
        source = self.source
        parts: list[_Part] = []
        while self.pos < len(source):
            start = self.pos
            opening = source.find("{", start)
            while opening != -1 and source[opening : opening + 2] not in ("{{", "{%", "{#"):
                opening = source.find("{", opening + 1)
            if opening == -1:
                parts.append(source[start:])
                break
            if opening > start:
                parts.append(source[start:opening])
            if source[opening + 1] != "{":
                mark = source[opening : opening + 2]
                hint = f'only {{{{ expr }}}}; for the literal text write {{{{ "{mark}" }}}}'
                raise _Problem(f"'{mark}' is not supported", opening, hint)
            self.pos = opening + 2
            parts.append(self._expression(opening))
        return tuple(parts)

    def _skip_space(self) -> None:
        while self.pos < len(self.source) and self.source[self.pos] in " \t\r\n":
            self.pos += 1

    def _expression(self, opening: int) -> _Expr:
        atoms: list[_Field | str] = [self._atom(opening)]
        filters: list[Callable[[str], str]] = []
        while True:
            self._skip_space()
            if self.pos >= len(self.source):
                raise _Problem("unclosed '{{'", opening)
            char = self.source[self.pos]
            if self.source.startswith("}}", self.pos):
                self.pos += 2
                return _Expr(tuple(atoms), tuple(filters))
            if char == "~" and not filters:
                self.pos += 1
                atoms.append(self._atom(opening))
            elif char == "|":
                self.pos += 1
                if len(filters) == MAX_FILTERS:
                    raise _Problem(f"more than {MAX_FILTERS} filters", self.pos - 1)
                filters.append(self._filter(opening))
            elif char == "~":
                raise _Problem("'~' after a filter; filters come last", self.pos)
            else:
                raise _Problem(f"unexpected {char!r}", self.pos)

    def _atom(self, opening: int) -> _Field | str:
        self._skip_space()
        if self.pos >= len(self.source):
            raise _Problem("unclosed '{{'", opening)
        start = self.pos
        char = self.source[start]
        if char in "'\"":
            return self._string(char, opening)
        name = self._name()
        if not name:
            if self.source.startswith("}}", start):
                raise _Problem("empty expression", start)
            raise _Problem(f"unexpected {char!r}", start)
        if name not in FIELDS:
            hint = "the refresh token never leaves the store" if name == "refresh_token" else ""
            raise _Problem(f"unknown field {name!r}", start, hint or f"fields: {', '.join(sorted(FIELDS))}")
        return _Field(name)

    def _filter(self, opening: int) -> Callable[[str], str]:
        self._skip_space()
        if self.pos >= len(self.source):
            raise _Problem("unclosed '{{'", opening)
        start = self.pos
        name = self._name()
        if not name:
            raise _Problem(f"expected a filter name, found {self.source[start]!r}", start)
        if name not in FILTERS:
            raise _Problem(f"unknown filter {name!r}", start, f"filters: {', '.join(sorted(FILTERS))}")
        return FILTERS[name]

    def _name(self) -> str:
        """An ASCII identifier (possibly empty); nothing else can name a field or filter."""
        source, start = self.source, self.pos
        if start < len(source) and source[start] in _NAME_START:
            self.pos += 1
            while self.pos < len(source) and source[self.pos] in _NAME_REST:
                self.pos += 1
        return source[start : self.pos]

    def _string(self, quote: str, opening: int) -> str:
        source = self.source
        start = self.pos
        self.pos += 1
        chunks: list[str] = []
        while self.pos < len(source):
            char = source[self.pos]
            if char == quote:
                self.pos += 1
                return "".join(chunks)
            if char == "\\":
                escaped = source[self.pos + 1 : self.pos + 2]
                if escaped not in ("\\", '"', "'"):
                    raise _Problem("unknown escape in string literal", self.pos, "only \\\\, \\\" and \\'")
                chunks.append(escaped)
                self.pos += 2
            else:
                chunks.append(char)
                self.pos += 1
        raise _Problem("unterminated string literal", start)


@lru_cache(maxsize=512)
def _compile(source: str) -> tuple[_Part, ...]:
    """Parse once per distinct source: the operator renders on every refresh."""
    if len(source) > MAX_SOURCE_CHARS:
        raise _Problem(f"template longer than {MAX_SOURCE_CHARS} characters")
    return _Parser(source).parse()


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled template for one Secret key. Build with :func:`compile_template`."""

    key: str
    parts: tuple[_Part, ...]

    def render(self, values: Mapping[str, str], *, limit: int = MAX_VALUE_BYTES) -> str:
        """Fill in ``values`` (see :func:`template_values`); at most ``limit`` UTF-8 bytes."""
        out: list[str] = []
        size = 0
        for part in self.parts:
            try:
                piece = part if isinstance(part, str) else part.evaluate(values, limit - size)
            except _TooLarge:
                raise TemplateError(self.key, f"rendered value exceeds {limit} bytes") from None
            size += _size(piece)
            if size > limit:
                raise TemplateError(self.key, f"rendered value exceeds {limit} bytes")
            out.append(piece)
        return "".join(out)


def compile_template(key: str, source: str) -> Template:
    """Compile ``source`` for Secret key ``key``, or raise :class:`TemplateError`.

    Call it when a spec is accepted, to report errors in status before any token
    is fetched; rendering later reuses the cached parse.
    """
    try:
        parts = _compile(source)
    except _Problem as problem:
        where = f" at {_where(source, problem.offset)}" if problem.offset is not None else ""
        hint = f" ({problem.hint})" if problem.hint else ""
        raise TemplateError(key, f"{problem.problem}{where}{hint}") from None
    return Template(key, parts)


def render_templates(templates: Mapping[str, str], values: Mapping[str, str]) -> dict[str, str]:
    """Render every ``key -> source`` in ``templates``, enforcing the per-value and total bounds."""
    rendered: dict[str, str] = {}
    total = 0
    for key, source in templates.items():
        remaining = MAX_TOTAL_BYTES - total
        template = compile_template(key, source)
        try:
            text = template.render(values, limit=min(MAX_VALUE_BYTES, remaining))
        except TemplateError:
            if remaining >= MAX_VALUE_BYTES:
                raise
            raise TemplateError(key, f"rendered values exceed {MAX_TOTAL_BYTES} bytes in total") from None
        total += _size(text)
        rendered[key] = text
    return rendered


def _stamp(value: datetime | None) -> str:
    """RFC 3339 in UTC with a ``Z``, to the second, as Kubernetes writes times."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else ""


def template_values(token: TokenSet) -> dict[str, str]:
    """The values templates can see, from a token set; never the refresh token."""
    return {
        "access_token": token.access_token.get_secret_value(),
        "token_type": token.token_type,
        "expires_at": _stamp(token.expires_at),
        "issued_at": _stamp(token.issued_at),
        "scope": token.scope or "",
        "id_token": token.id_token.get_secret_value() if token.id_token is not None else "",
    }

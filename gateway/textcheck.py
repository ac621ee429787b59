"""Requests whose text is not Unicode are refused in one place, before any route runs.

JSON's ``\\ud800`` escapes (and raw surrogate bytes, which Python's JSON parser lets
through) make strings holding a lone surrogate: half of a UTF-16 pair, with no UTF-8 form,
so SQLite, the audit log and every response refuse it, and a route failed with a 500
wherever it first stored or echoed one. ``create_app`` makes every route depend on
``text_only``; ``escaped`` lets a 422 that quotes such a string still be rendered.
"""

import contextlib
from collections.abc import Iterable
from typing import Any

from fastapi import Request, params
from fastapi.exceptions import RequestValidationError


def escaped(text: str) -> str:
    """``text`` with each surrogate code point written as its ``\\udXXX`` escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _not_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


Loc = tuple[str | int, ...]


def _first_surrogate(value: Any, loc: Loc) -> tuple[Loc, str] | None:
    """Where in ``value`` (parsed JSON: objects, arrays, strings) a string, or an object's
    key, is not Unicode text, and that string."""
    todo: list[tuple[Any, Loc]] = [(value, loc)]
    while todo:
        item, at = todo.pop()
        if isinstance(item, str) and _not_text(item):
            return at, item
        if isinstance(item, dict):
            for key, inner in reversed(item.items()):
                if _not_text(key):
                    return (*at, escaped(key)), key
                todo.append((inner, (*at, key)))
        elif isinstance(item, list):
            todo.extend((inner, (*at, i)) for i, inner in reversed(list(enumerate(item))))
    return None


def _first_surrogate_in(pairs: Iterable[tuple[str, Any]], where: str) -> tuple[Loc, str] | None:
    """The same for named values (a form's fields and file names, a query, a path)."""
    for key, value in pairs:
        text = value if isinstance(value, str) else getattr(value, "filename", None) or ""
        for part in (key, text):
            if _not_text(part):
                return (where, escaped(key)), part
    return None


def _parsed_as_json(content_type: str) -> bool:
    """Whether FastAPI parsed a body of this type as JSON (no type at all, or
    ``application/json`` or ``application/*+json``)."""
    mime = content_type.partition(";")[0].strip().lower()
    return (
        not mime
        or mime == "application/json"
        or (mime.startswith("application/") and mime.endswith("+json"))
    )


async def text_only(request: Request) -> None:
    """Refuse a request any of whose strings is not Unicode text, before anything reads it.

    JSON's ``\\ud800`` escapes (and raw surrogate bytes, which Python's JSON parser lets
    through) make strings that hold a lone surrogate: half of a UTF-16 pair, with no
    UTF-8 form, so SQLite, the audit log and every response refuse it, and a route failed
    with a 500 wherever it first stored or echoed one (a login, an agency, a case, an
    alarm note). A form can carry one too, in a multipart body declared as UTF-7. Every
    route depends on this check (``create_app``), so this one place covers every JSON
    body, form, query and path string: a 422 naming the field, and nothing stored or
    audited. The body it checks is the one FastAPI already parsed for the route.
    """
    body = getattr(request.scope.get("route"), "body_field", None)
    ctype = request.headers.get("content-type", "")
    found: tuple[Loc, str] | None = None
    if body is not None and isinstance(body.field_info, params.Form):
        found = _first_surrogate_in((await request.form()).multi_items(), "body")
    elif body is not None and await request.body() and _parsed_as_json(ctype):
        with contextlib.suppress(ValueError):  # no JSON: FastAPI has said so already
            found = _first_surrogate(await request.json(), ("body",))
    found = (
        found
        or _first_surrogate_in(request.path_params.items(), "path")
        or _first_surrogate_in(request.query_params.multi_items(), "query")
    )
    if found is None:
        return
    loc, text = found
    char = next(c for c in text if "\ud800" <= c <= "\udfff")
    name = ".".join(str(p) for p in loc[1:]) or loc[0]
    raise RequestValidationError(
        [
            {
                "type": "string_unicode",
                "loc": loc,
                "msg": f"{name} must be Unicode text, but holds U+{ord(char):04X}: half of a "
                "UTF-16 surrogate pair, which alone is no character, has no UTF-8 form and "
                "cannot be stored; send the whole character (both halves, or the character "
                "itself), or leave it out",
                "input": escaped(text),
            }
        ]
    )

"""The services' typed options, built from command-line text.

    --set tftp.workers=2 --set tftp.max_blksize=1468 --port http=8080

Each `--set SERVICE.FIELD=VALUE` names a field of that service's nested `Options` dataclass
(bootsvc.service) and is converted by the field's declared type; `--port SERVICE=PORT` is short
for `--set SERVICE.port=PORT`. Anything wrong (a service that is not run, a field it does not
have, a value of the wrong type or out of range) is one `VlxError` naming the flag.
Imports the service interface only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from virtualinux.vvcm import VlxError

from .service import service_class

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in TRUE:
        return True
    if lowered in FALSE:
        return False
    raise ValueError(text)


# How a field's declared type is read from text, and what the error calls it.
CONVERTERS: dict[object, tuple[Callable[[str], object], str]] = {
    int: (int, "an integer"),
    float: (float, "a number"),
    bool: (_to_bool, "true or false"),
    str: (str, "text"),
    Path: (Path, "a path"),
    ipaddress.IPv4Address: (ipaddress.IPv4Address, "an IPv4 address"),
}
NONE = "none"       # what sets an optional field (`int | None`) to None


def converter(declared: object) -> tuple[Callable[[str], object], str]:
    """How to read a field of type `declared` from text: one of CONVERTERS, `X | None`
    (NONE or an X) or `tuple[X, ...]` (X,X,...); and what the error calls it."""
    if declared in CONVERTERS:
        return CONVERTERS[declared]
    arguments = typing.get_args(declared)
    if typing.get_origin(declared) in (typing.Union, types.UnionType) \
            and type(None) in arguments and len(arguments) == 2:
        inner, described = converter(next(a for a in arguments if a is not type(None)))
        return (lambda text: None if text.lower() == NONE else inner(text),
                f"{described} or {NONE}")
    if typing.get_origin(declared) is tuple and len(arguments) == 2 \
            and arguments[1] is Ellipsis:
        item, described = converter(arguments[0])
        return (lambda text: tuple(item(part.strip()) for part in text.split(",")
                                   if part.strip()),
                f"a comma-separated list, each {described}")
    raise TypeError(f"no command-line form for a field of type {declared!r}")


def parse(services: Sequence[str], settings: Sequence[str] = (),
          ports: Sequence[str] = ()) -> dict[str, object]:
    """Each service's `Options`, by service name, with the settings applied."""
    given: dict[str, dict[str, object]] = {name: {} for name in services}
    flags: dict[str, str] = {}      # the flag that set something of a service, for errors
    items = [("--port", item, _port_setting(item)) for item in ports]
    items += [("--set", item, item) for item in settings]
    for flag, shown, item in items:
        service, field, value = _setting(flag, shown, item, services)
        if field in given[service]:
            raise VlxError(f"{service}.{field} is set twice", flag)
        given[service][field] = value
        flags[service] = flag
    options: dict[str, object] = {}
    for name in services:
        try:
            options[name] = service_class(name).Options(**given[name])
        except ValueError as err:
            raise VlxError(f"{name}: {err}", flags.get(name)) from None
    return options


def _port_setting(item: str) -> str:
    service, sep, port = item.partition("=")
    if not sep or not service:
        raise VlxError(f"{item!r}: write SERVICE=PORT, e.g. tftp=6969", "--port")
    return f"{service}.port={port}"


def _setting(flag: str, shown: str, item: str,
             services: Sequence[str]) -> tuple[str, str, object]:
    key, sep, text = item.partition("=")
    service, dot, field = key.partition(".")
    if not sep or not dot or not service or not field:
        raise VlxError(f"{shown!r}: write SERVICE.FIELD=VALUE, e.g. tftp.workers=2", flag)
    try:
        cls = service_class(service)
    except VlxError as err:
        raise VlxError(err.message, flag) from None
    if service not in services:
        raise VlxError(f"{shown!r}: {service} is not run here (--services "
                       f"{','.join(services)})", flag)
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    if field not in fields:
        known = ", ".join(sorted(fields)) or "none"
        raise VlxError(f"{shown!r}: {service} has no option {field!r} (it has: {known})", flag)
    try:
        convert, described = converter(typing.get_type_hints(cls.Options)[field])
    except TypeError as err:
        raise VlxError(f"{shown!r}: {service}.{field} cannot be set here ({err})",
                       flag) from None
    try:
        return service, field, convert(text)
    except ValueError:
        raise VlxError(f"{shown!r}: {service}.{field} must be {described}, not {text!r}",
                       flag) from None

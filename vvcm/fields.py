"""Inventory fields, declared once on the model's dataclasses and used everywhere.

Each dataclass field of the model carries a `Setting` in its metadata: the key it has in the
inventory TOML, in `--json` output and as a `--flag` of `vlx`, its help text, and how its value
is parsed and dumped. Import, export, JSON and argparse are all derived from that one table.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import functools
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from .errors import VlxError

REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Setting:
    help: str
    parse: Callable[[Any], Any]
    dump: Callable[[Any], Any] = lambda value: value
    default: Any = REQUIRED
    metavar: str | None = None


def setting(help: str, parse: Callable[[Any], Any], dump: Callable[[Any], Any] | None = None,
            default: Any = REQUIRED, metavar: str | None = None) -> Any:
    """A dataclass field whose metadata is its inventory `Setting`."""
    meta = {"setting": Setting(help, parse, dump or (lambda value: value), default, metavar)}
    if default is REQUIRED:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def settings_of(cls: type) -> Iterator[tuple[str, Setting]]:
    return iter(_settings(cls))


@functools.cache
def _settings(cls: type) -> tuple[tuple[str, Setting], ...]:
    # Once per class: from_mapping and to_mapping run per row of a 10,000-node database.
    return tuple((field.name, field.metadata["setting"]) for field in dataclasses.fields(cls)
                 if "setting" in field.metadata)


@functools.cache
def _known(cls: type) -> frozenset[str]:
    return frozenset(name for name, _ in _settings(cls))


def from_mapping(cls: type, data: Mapping[str, Any], where: str,
                 ignore: tuple[str, ...] = ()) -> Any:
    """Build a `cls` from TOML/JSON data, naming `where` and the field in every error."""
    if not isinstance(data, Mapping):
        raise VlxError(f"expected a table, got {type(data).__name__}", where)
    known = _known(cls)
    unknown = sorted(data.keys() - known - set(ignore))
    if unknown:
        raise VlxError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})", where)
    values = {}
    for name, spec in _settings(cls):
        if name not in data or data[name] is None:
            if spec.default is REQUIRED:
                raise VlxError(f"missing required key {name!r} ({spec.help})", where)
            continue
        try:
            values[name] = spec.parse(data[name])
        except (ValueError, TypeError) as err:
            raise VlxError(f"{name} = {data[name]!r}: {err}", where) from None
    return cls(**values)


def from_rows(cls: type, rows: Iterable[tuple[str, Any]], where: str) -> tuple[Any, ...]:
    """Many `cls` from (name, data) pairs, as from_mapping would make them one by one (same
    checks; on any fault from_mapping itself raises, so the error is the same), placed at
    `where NAME`: the rows of a database.

    Why: every change to a 10,000-node database decodes its 20,000 rows, and most values
    repeat (cpus = 8, memory = "16GiB", kind = "snapshot", the portal): each distinct value of
    a key is parsed once per call. The parsers are pure and return immutable values, so the
    result can be shared. Only str and int (not bool) values and lists of str (as tuples:
    JSON gives no tuples) are remembered: those never compare equal to one another, while 1,
    1.0 and True do and do not parse alike."""
    settings = _settings(cls)
    known = _known(cls)
    required = frozenset(name for name, spec in settings if spec.default is REQUIRED)
    parsers = {name: spec.parse for name, spec in settings}
    memos: dict[str, dict[Any, Any]] = {name: {} for name in parsers}
    make = _maker(cls)
    out = []
    for row_name, data in rows:
        values = _parse_row(data, known, required, parsers, memos)
        # A row with anything wrong goes through from_mapping, which says what.
        out.append(make(values) if values is not None
                   else from_mapping(cls, data, f"{where} {row_name}"))
    return tuple(out)


@functools.cache
def _maker(cls: type) -> Callable[[dict[str, Any]], Any]:
    """What builds a `cls` from parsed values for from_rows.

    A frozen dataclass's __init__ sets each field through object.__setattr__: 1.7 us for a
    Node against 0.85 us for filling the instance's __dict__ directly, 20,000 times per load.
    That is the same object (fields, defaults, ==, hash), so it is done where nothing else
    runs at construction (no __post_init__, no default_factory, no slots); otherwise __init__."""
    fields = dataclasses.fields(cls)
    if hasattr(cls, "__post_init__") or hasattr(cls, "__slots__") or any(
            not f.init or f.default_factory is not dataclasses.MISSING for f in fields):
        return lambda values: cls(**values)
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    new = object.__new__

    def make(values: dict[str, Any]) -> Any:
        obj: Any = new(cls)
        state = obj.__dict__
        state.update(defaults)
        state.update(values)
        return obj
    return make


def _parse_row(data: Any, known: frozenset[str], required: frozenset[str],
               parsers: dict[str, Callable[[Any], Any]],
               memos: dict[str, dict[Any, Any]]) -> dict[str, Any] | None:
    """The parsed values of one row of from_rows, or None if anything is wrong with it."""
    # type() first: the isinstance of an ABC costs more than a whole memo hit.
    if not (type(data) is dict or isinstance(data, Mapping)) or not data.keys() <= known or \
            not required <= data.keys():
        return None
    values = {}
    for name, value in data.items():
        if value is None:
            if name in required:
                return None
            continue
        kind = type(value)
        key = value if kind is str or kind is int else (
            tuple(value) if kind is list and all(type(v) is str for v in value) else None)
        if key is not None:
            memo = memos[name]
            if key not in memo:
                try:
                    memo[key] = parsers[name](value)
                except (ValueError, TypeError):
                    return None
            values[name] = memo[key]
        else:
            try:
                values[name] = parsers[name](value)
            except (ValueError, TypeError):
                return None
    return values


def to_mapping(obj: object, skip_defaults: bool = False) -> dict[str, Any]:
    """Dumped values of every setting of `obj`, leaving out those that are None."""
    out = {}
    # Through a `type` variable: mypy takes type(obj), a type[object], for unhashable.
    cls: type = type(obj)
    for name, spec in _settings(cls):
        value = getattr(obj, name)
        if value is None or (skip_defaults and spec.default is not REQUIRED
                             and value == spec.default):
            continue
        out[name] = spec.dump(value)
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type, positional: str | None = None,
                  all_optional: bool = False) -> None:
    """One `--flag` per setting of `cls` (the `positional` one becomes an argument)."""
    for name, spec in settings_of(cls):
        if name == positional:
            parser.add_argument(name, help=spec.help)
            continue
        required = spec.default is REQUIRED and not all_optional
        shown = "" if spec.default in (REQUIRED, None) else _show(spec)
        default_note = f" (default: {shown})" if shown else ""
        parser.add_argument("--" + name.replace("_", "-"), dest=name, required=required,
                            metavar=spec.metavar, help=spec.help + default_note)


def from_arguments(cls: type, args: argparse.Namespace, where: str = "command line") -> Any:
    data = {name: getattr(args, name) for name, _ in settings_of(cls)
            if getattr(args, name, None) is not None}
    return from_mapping(cls, data, where)


def _show(spec: Setting) -> str:
    dumped = spec.dump(spec.default)
    if isinstance(dumped, list | tuple):
        return ",".join(str(v) for v in dumped)
    return str(dumped)


# Parsers. Each raises ValueError with a message that says what a good value looks like.

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_MAC = re.compile(r"^[0-9a-f]{2}([:-][0-9a-f]{2}){5}$")
_MEMORY = re.compile(r"^(\d+)\s*(k|m|g|t)?(i?b)?$", re.IGNORECASE)
_UNITS_MIB = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024, None: 1}
_POWER = {"k": 3, "m": 6, "g": 9, "t": 12}


def parse_name(value: Any) -> str:
    if not isinstance(value, str) or not _LABEL.match(value):
        raise ValueError("not a host name: use 1-63 lower-case letters, digits and '-', "
                         "not starting or ending with '-'")
    return value


def parse_domain(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 253:
        raise ValueError("not a DNS domain")
    labels = value.rstrip(".").split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise ValueError("not a DNS domain: labels are letters, digits and '-'")
    return value.rstrip(".")


def parse_mac(value: Any) -> str:
    if not isinstance(value, str) or not _MAC.match(value.lower()):
        raise ValueError("not a MAC address: use six hex pairs like 52:54:00:00:00:11")
    mac = value.lower().replace("-", ":")
    if int(mac[:2], 16) & 1:
        raise ValueError("a multicast MAC address cannot be a boot MAC")
    return mac


def parse_ipv4(value: Any) -> ipaddress.IPv4Address:
    if type(value) is str:
        # inet_pton takes exactly what ipaddress takes (four decimal octets, none above 255,
        # no leading zeros) at a tenth of its cost, which counts for 10,000 nodes per load;
        # anything else goes the slow way below, for ipaddress's own error message.
        try:
            return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, value))
        except OSError:
            pass
    if not isinstance(value, str | ipaddress.IPv4Address):
        raise ValueError("not an IPv4 address")
    try:
        return ipaddress.IPv4Address(value)
    except ipaddress.AddressValueError as err:
        raise ValueError(f"not an IPv4 address ({err})") from None


def parse_ipv4_list(value: Any) -> tuple[ipaddress.IPv4Address, ...]:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        raise ValueError("expected a list of IPv4 addresses")
    return tuple(parse_ipv4(item.strip() if isinstance(item, str) else item) for item in value)


# A kernel argument goes on an iPXE line: no spaces, no `${` (netboot checks it again).
_KERNEL_ARG = re.compile(r"[A-Za-z0-9._:,=/+@-]+")


def parse_kernel_args(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list | tuple):
        raise ValueError("expected a list of kernel arguments")
    for item in value:
        if not isinstance(item, str) or not _KERNEL_ARG.fullmatch(item):
            raise ValueError(f"{item!r} cannot go on a kernel command line (allowed: letters, "
                             "digits and . _ : , = / + @ -)")
    return tuple(value)


# An authorized_keys line as the admin setting takes it: key type, base64 blob and an
# optional comment, nothing before the type (an options field like `command="..."` or
# `from=` would change what the key may do), one line.
_SSH_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                  "ecdsa-sha2-nistp521", "ssh-rsa", "sk-ssh-ed25519@openssh.com",
                  "sk-ecdsa-sha2-nistp256@openssh.com")
_SSH_COMMENT = re.compile(r"[\x21-\x7e]+( [\x21-\x7e]+)*")


def parse_ssh_public_key(value: Any) -> str:
    """One SSH public key line, `TYPE BASE64 [COMMENT]`, checked: a known type, a blob that
    decodes and names that same type (and, for the types cryptography reads, a valid key),
    a comment of printable characters. Returned normalised (single spaces)."""
    if not isinstance(value, str):
        raise ValueError("expected an SSH public key line (TYPE BASE64 [COMMENT])")
    if any(ord(char) < 0x20 or ord(char) == 0x7f for char in value.strip()):
        raise ValueError("an SSH public key is one line: no line breaks, tabs or control "
                         "characters")
    parts = re.split(" +", value.strip(), maxsplit=2)
    if len(parts) < 2 or parts[0] not in _SSH_KEY_TYPES:
        shown = value.strip()[:40]
        raise ValueError(f"{shown!r} is not an SSH public key line: it must start with a key "
                         f"type ({', '.join(_SSH_KEY_TYPES[:2])}, ...), and no options")
    kind, blob = parts[0], parts[1]
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the {kind} key's base64 part does not decode") from None
    named = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    if raw[4:4 + named] != kind.encode():
        raise ValueError(f"the {kind} key's blob names another key type")
    if not kind.startswith("sk-"):
        from cryptography.hazmat.primitives import serialization
        try:
            serialization.load_ssh_public_key(f"{kind} {blob}".encode())
        except (ValueError, TypeError) as err:
            raise ValueError(f"the {kind} key is not a valid public key ({err})") from None
    comment = " ".join(parts[2].split()) if len(parts) == 3 else ""
    if comment and not _SSH_COMMENT.fullmatch(comment):
        raise ValueError(f"the {kind} key's comment has characters other than printable ASCII")
    return f"{kind} {blob} {comment}".rstrip()


def parse_ssh_public_keys(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [line for line in value.splitlines() if line.strip()]
    if not isinstance(value, list | tuple):
        raise ValueError("expected a list of SSH public key lines")
    return tuple(dict.fromkeys(parse_ssh_public_key(item) for item in value))


def parse_address_range(value: Any) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """`FIRST-LAST`, both included."""
    if not isinstance(value, str) or value.count("-") != 1:
        raise ValueError("not an address range: use FIRST-LAST like 198.18.0.100-198.18.0.149")
    first, last = (parse_ipv4(part.strip()) for part in value.split("-"))
    if first > last:
        raise ValueError(f"the range runs backwards ({first} after {last})")
    return first, last


def dump_address_range(value: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]) -> str:
    return f"{value[0]}-{value[1]}"


def parse_cidr(value: Any) -> ipaddress.IPv4Network:
    if not isinstance(value, str | ipaddress.IPv4Network):
        raise ValueError("not a CIDR network")
    try:
        network = ipaddress.IPv4Network(value, strict=True)
    except ValueError as err:
        raise ValueError(f"not a CIDR network like 198.18.0.0/24 ({err})") from None
    if network.prefixlen > 30:
        raise ValueError("a network needs a prefix of /30 or shorter to hold hosts")
    return network


def parse_ipv4_interface(value: Any) -> ipaddress.IPv4Interface:
    """An address with the prefix of its network ("198.18.1.254/24"), as put on a link."""
    if not isinstance(value, str | ipaddress.IPv4Interface) or \
            (isinstance(value, str) and "/" not in value):
        raise ValueError("not an address with its prefix like 198.18.1.254/24")
    try:
        interface = ipaddress.IPv4Interface(value)
    except ValueError as err:
        raise ValueError(f"not an address with its prefix like 198.18.1.254/24 ({err})") \
            from None
    if interface.network.prefixlen > 30 or interface.ip in (interface.network.network_address,
                                                            interface.network.broadcast_address):
        raise ValueError(f"{interface.ip} is not a host address of {interface.network}")
    return interface


def parse_count(value: Any) -> int:
    number = _integer(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def parse_memory_mib(value: Any) -> int:
    """Memory as MiB: an integer is MiB, a string may say 512MiB, 4GiB, 4G."""
    if isinstance(value, bool):
        raise ValueError("not a memory size")
    if isinstance(value, int):
        mib = value
    elif isinstance(value, str) and (match := _MEMORY.match(value.strip())):
        unit = match.group(2).lower() if match.group(2) else None
        if unit and match.group(3) and match.group(3).lower() == "b":
            raise ValueError(f"{value.strip()!r} is a decimal unit (10^{_POWER[unit]} bytes), "
                             f"which memory is not counted in: write "
                             f"'{match.group(1)}{match.group(2).upper()}iB'")
        mib = int(int(match.group(1)) * _UNITS_MIB[unit])
    else:
        raise ValueError("not a memory size: use MiB as an integer, or a string like '512MiB' "
                         "or '4GiB'")
    if mib < 16:
        raise ValueError("memory below 16 MiB cannot boot anything")
    return mib


def dump_memory_mib(mib: int) -> str:
    return f"{mib // 1024}GiB" if mib % 1024 == 0 else f"{mib}MiB"


def parse_ratio(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("not a number")
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise ValueError("not a number") from None
    if not 0.1 <= ratio <= 64:
        raise ValueError("must be between 0.1 and 64")
    return ratio


def parse_seconds(value: Any) -> int:
    number = _integer(value)
    if not 60 <= number <= 2**31 - 1:
        raise ValueError("must be between 60 and 2147483647 seconds")
    return number


def ranged_int(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        number = _integer(value)
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}")
        return number
    return parse


def choice_list(choices: tuple[str, ...]) -> Callable[[Any], tuple[str, ...]]:
    def parse(value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ValueError("expected a list of names")
        for item in value:
            if item not in choices:
                raise ValueError(f"unknown {item!r} (choose from {', '.join(choices)})")
        if len(set(value)) != len(value):
            raise ValueError("names a role twice")
        return tuple(sorted(value))
    return parse


def dump_str(value: Any) -> str:
    return str(value)


def dump_list(values: tuple[Any, ...]) -> list[Any]:
    return [str(v) for v in values]


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        return int(value)
    raise ValueError("not an integer")

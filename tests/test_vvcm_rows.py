"""fields.from_rows, the batch decoder of database rows: the same objects and the same errors
as from_mapping row by row, although it parses each repeated value once."""

from __future__ import annotations

import ipaddress

import pytest
from virtualinux.vvcm import fields
from virtualinux.vvcm.errors import VlxError
from virtualinux.vvcm.model import Node, Volume


def _node(i: int, **extra) -> dict:
    return {"name": f"n{i}", "mac": f"52:54:00:00:00:{i:02x}", "ip": f"198.18.0.{i + 10}",
            "cpus": 8, "memory": "16GiB", "roles": [], **extra}


def test_rows_decode_as_from_mapping_does():
    rows = [(f"n{i}", _node(i)) for i in range(5)] + [("g", _node(9, roles=["gateway-primary"]))]
    decoded = fields.from_rows(Node, rows, "database node")
    one_by_one = tuple(fields.from_mapping(Node, data, "x") for _, data in rows)
    assert decoded == one_by_one
    assert [hash(n) for n in decoded] == [hash(n) for n in one_by_one]
    assert decoded[0].libvirt_uri is None and decoded[0].netns is None   # the defaults
    assert decoded[0].memory == 16384 and decoded[0].ip == ipaddress.IPv4Address("198.18.0.10")
    assert [str(role) for role in decoded[-1].roles] == ["gateway-primary"]


@pytest.mark.parametrize(("bad", "message"), [
    ({"cpus": True}, "database node n1: cpus = True: not an integer"),
    ({"cpus": 0}, "database node n1: cpus = 0: must be at least 1"),
    ({"ip": "198.18.0.010"}, "database node n1: ip = '198.18.0.010': not an IPv4 address"),
    ({"mac": None}, "database node n1: missing required key 'mac'"),
    ({"colour": "red"}, "database node n1: unknown key 'colour'"),
])
def test_a_bad_row_fails_as_from_mapping_fails(bad, message):
    # Row n0 puts the good values (8, ...) in the memo first: True must not be taken for 1.
    rows = [("n0", _node(0, cpus=1)), ("n1", {**_node(1), **bad})]
    with pytest.raises(VlxError) as err:
        fields.from_rows(Node, rows, "database node")
    assert str(err.value).startswith(message)
    with pytest.raises(VlxError) as one:
        fields.from_mapping(Node, rows[1][1], "database node n1")
    assert str(one.value) == str(err.value)


def test_defaults_and_none_match_from_mapping():
    data = {"name": "v", "kind": "golden", "backend": "reflink", "path": "/p", "size": 1,
            "owner": None}
    assert fields.from_rows(Volume, [("v", data)], "db") == (
        fields.from_mapping(Volume, data, "db"),)


def test_parse_ipv4_takes_exactly_what_ipaddress_takes():
    for text in ("0.0.0.0", "255.255.255.255", "198.18.0.1"):
        assert fields.parse_ipv4(text) == ipaddress.IPv4Address(text)
    for text in ("01.2.3.4", "1.2.3", "256.1.1.1", " 1.2.3.4", "1.2.3.4/32", "", "1.2.3.0x4"):
        with pytest.raises(ValueError, match="not an IPv4 address"):
            fields.parse_ipv4(text)

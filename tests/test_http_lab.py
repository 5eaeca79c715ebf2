"""HTTP against curl in namespaces: whole files, ranges, HEAD, keep-alive, per-node files from
the database, the TFTP path rules, and garbage that does not stop the service."""
# The lab fixture comes from test_tftp_lab; a fixture used as an argument looks like a
# redefinition to ruff.
# ruff: noqa: F811

from __future__ import annotations

import sys

import pytest
from virtualinux.netboot import scripts

from .conftest import require
from .test_tftp_lab import SERVER, bootfiles_lab, digest, service_settings  # noqa: F401

pytestmark = pytest.mark.lab
URL = f"http://{SERVER}"


def curl(lab, *args: str):
    return lab.run(["curl", "-sS", "--path-as-is", *args])


def test_curl_gets_whole_files_and_ranges(bootfiles_lab):
    require("curl")
    lab, got = bootfiles_lab, bootfiles_lab.download
    kernel = (lab.tree / "images/vmlinuz").read_bytes()
    result = curl(lab, "--fail", "-o", str(got / "whole"), "-o", str(got / "again"),
                  f"{URL}/images/vmlinuz", f"{URL}/images/vmlinuz")      # one connection
    assert result.returncode == 0, result.stderr
    assert digest(got / "whole") == digest(got / "again") == digest(lab.tree / "images/vmlinuz")
    for spec, expected in (("0-99", kernel[:100]), ("5000000-", kernel[5_000_000:]),
                           ("-4096", kernel[-4096:])):
        result = curl(lab, "--fail", "-r", spec, "-o", str(got / "part"), "-w", "%{http_code}",
                      f"{URL}/images/vmlinuz")
        assert result.stdout == "206" and (got / "part").read_bytes() == expected, spec
    result = curl(lab, "-r", f"{len(kernel)}-", "-o", "/dev/null", "-w", "%{http_code}",
                  f"{URL}/images/vmlinuz")
    assert result.stdout == "416"


def test_head_and_node_files_from_the_database(bootfiles_lab):
    lab = bootfiles_lab
    result = curl(lab, "-I", f"{URL}/images/vmlinuz")
    assert "HTTP/1.1 200 OK" in result.stdout
    assert f"Content-Length: {(lab.tree / 'images/vmlinuz').stat().st_size}" in result.stdout
    result = curl(lab, "--fail", f"{URL}/nodes/52-54-00-00-00-11.ipxe")
    node = lab.cluster.node("node1")
    assert result.stdout == scripts.node_script(lab.cluster, node, ["console=ttyS0"])
    cpio_url = f"{URL}/nodes/52-54-00-00-00-11.cpio"
    assert curl(lab, "-o", "/dev/null", "-w", "%{http_code}", cpio_url).stdout == "403"
    lab.client.add_address("br0", f"{node.ip}/24")     # now we are node1
    result = curl(lab, "--fail", "--interface", str(node.ip), "-o", str(lab.download / "cpio"),
                  cpio_url)
    assert result.returncode == 0, result.stderr
    assert (lab.download / "cpio").read_bytes() == scripts.node_cpio(lab.cluster, node)


@pytest.mark.parametrize("path, status", [
    ("/../outside.txt", "403"), ("/images/../../outside.txt", "403"), ("/escape", "403"),
    ("/%2e%2e/outside.txt", "403"), ("/a%00b", "403"), ("/etc/passwd", "404"),
    ("/nodes/52-54-00-00-00-99.ipxe", "404"), ("/" + "x" * 300, "403")])
def test_same_path_rules_as_tftp(bootfiles_lab, path, status):
    result = curl(bootfiles_lab, "-o", "/dev/null", "-w", "%{http_code}", f"{URL}{path}")
    assert result.stdout == status


def test_garbage_and_other_methods_do_not_stop_the_service(bootfiles_lab):
    lab = bootfiles_lab
    assert curl(lab, "-X", "DELETE", "-o", "/dev/null", "-w", "%{http_code}",
                f"{URL}/boot.ipxe").stdout == "405"
    sender = ("import socket\n"
              f"for p in [b'\\x00\\xff garbage\\r\\n\\r\\n', b'GET / HTTP/9\\r\\n\\r\\n',"
              " b'GET /' + b'a' * 20000, b'']:\n"
              f"    s = socket.create_connection(('{SERVER}', 80), timeout=5)\n"
              "    s.sendall(p)\n"
              "    s.shutdown(socket.SHUT_WR)\n"
              "    s.recv(4096)\n"
              "    s.close()\n")
    result = lab.run([sys.executable, "-c", sender])
    assert result.returncode == 0, result.stderr
    assert curl(lab, "--fail", f"{URL}/boot.ipxe").stdout.startswith("#!ipxe")
    counters = lab.stop()["http"]
    assert counters["bad_request"] == 2 and counters["header_too_large"] == 1
    assert counters["status_405"] == 1 and counters["status_200"] == 1

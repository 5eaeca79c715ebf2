"""What a person relies on across every `vlx` noun: global options before or after the verb,
--version and descriptions, one error prefix, quiet logs, plain counts and units."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import pytest
from virtualinux.vvcm.cli import build_parser, main
from virtualinux.vvcm.command import vlx_command

from .conftest import EXAMPLE, vlx

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def cluster_db(db_path, capsys):
    assert vlx(capsys, "db", "init")[0] == 0
    assert vlx(capsys, "db", "import", str(EXAMPLE))[0] == 0
    return db_path


def test_db_is_accepted_before_the_noun_and_after_the_verb(cluster_db, tmp_path, monkeypatch,
                                                           capsys):
    monkeypatch.setenv("VLX_DB", str(tmp_path / "elsewhere.db"))  # not the cluster
    before = vlx(capsys, "--db", str(cluster_db), "node", "list")
    after = vlx(capsys, "node", "list", "--db", str(cluster_db))
    assert before[0] == after[0] == 0
    assert before[1] == after[1] and "node4" in after[1]
    # A value given early is not overwritten by a default further down.
    assert vlx(capsys, "--db", str(cluster_db), "db", "show", "--json")[0] == 0
    code, _, err = vlx(capsys, "db", "show")
    assert code == 2 and "elsewhere.db" in err


def test_verbose_works_in_either_place():
    parser = build_parser()
    assert parser.parse_args(["-v", "node", "list"]).verbose
    assert parser.parse_args(["node", "list", "-v"]).verbose
    assert not parser.parse_args(["node", "list"]).verbose


def test_noun_options_are_accepted_after_the_verb_too(tmp_path):
    parser = build_parser()
    for argv in (["image", "--cache", str(tmp_path), "list"],
                 ["image", "list", "--cache", str(tmp_path)]):
        assert parser.parse_args(argv).cache == tmp_path
    for noun, verb in (("lab", "status"), ("bootsvc", "status")):
        early = parser.parse_args([noun, "--state-dir", str(tmp_path), verb])
        late = parser.parse_args([noun, verb, "--state-dir", str(tmp_path)])
        assert early.state_dir == late.state_dir == tmp_path
        assert parser.parse_args([noun, verb]).state_dir != tmp_path   # the default stays


def test_every_leaf_command_takes_every_global_option():
    def leaves(parser: argparse.ArgumentParser, path: list[str]):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, parser
        for action in subs:
            for name, sub in action.choices.items():
                yield from leaves(sub, path + [name])

    found = list(leaves(build_parser(), []))
    assert len(found) > 20
    for path, parser in found:
        flags = {flag for action in parser._actions for flag in action.option_strings}
        assert {"--db", "-v", "--verbose"} <= flags, path


def test_version_and_a_description_for_every_noun(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert re.fullmatch(r"vlx \d+\.\d+\S*\n", capsys.readouterr().out)
    nouns = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in nouns.choices.items():
        assert parser.description, f"vlx {name} --help has no description"


def test_an_error_has_one_prefix(tmp_path, capsys):
    code, _, err = vlx(capsys, "image", "show", "nosuch", "--cache", str(tmp_path))
    assert code == 2
    assert err.startswith("vlx: error: no cached image named 'nosuch'") and err.count("vlx") == 2


def test_a_command_does_not_repeat_its_output_as_log_lines_on_stderr(cluster_db, tmp_path):
    image = tmp_path / "image"
    image.mkdir()
    (image / "vmlinuz").write_bytes(b"k" * 4096)
    (image / "initrd.img").write_bytes(b"i" * 4096)
    # A real process: logging is set up once per process, not per main() call.
    env = {"VLX_DB": str(cluster_db), "PATH": "/usr/bin:/bin"}
    argv = ["netboot", "render", "--image", str(image), "--out", str(tmp_path / "netboot")]
    done = subprocess.run(vlx_command(*argv), capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.startswith("rendered ")
    assert done.stderr == ""
    verbose = subprocess.run(vlx_command(*argv, "-v"), capture_output=True, text=True, env=env)
    assert verbose.returncode == 0 and "netboot tree" in verbose.stderr   # -v shows the log
    # Daemons keep their event lines (DHCPACK ...) without -v.
    assert build_parser().parse_args(["bootsvc", "run", "--interface", "eth0"]).logs_events


@pytest.mark.parametrize("address, says", [
    ("198.18.0.0", "is the network address of the cluster network 198.18.0.0/24"),
    ("198.18.0.255", "is the broadcast address of the cluster network 198.18.0.0/24"),
    ("198.18.1.15", "is outside the cluster network 198.18.0.0/24"),
])
def test_network_and_broadcast_addresses_are_named_as_such(cluster_db, capsys, address, says):
    code, _, err = vlx(capsys, "node", "add", "node5", "--mac", "52:54:00:00:00:15", "--ip",
                       address, "--cpus", "2", "--memory", "1GiB")
    assert code == 2 and says in err


@pytest.mark.parametrize("memory", ["4GB", "512MB", "4gb"])
def test_decimal_memory_units_are_refused_not_read_as_binary(cluster_db, capsys, memory):
    before = cluster_db.read_bytes()
    code, _, err = vlx(capsys, "node", "add", "node5", "--mac", "52:54:00:00:00:15", "--ip",
                       "198.18.0.15", "--cpus", "2", "--memory", memory)
    assert code == 2 and "decimal unit" in err and "iB'" in err and err.count("\n") == 1
    assert cluster_db.read_bytes() == before


def test_binary_memory_units_and_bare_letters_are_binary(cluster_db, capsys):
    for name, memory, mib in (("node5", "4GiB", 4096), ("node6", "4G", 4096)):
        assert vlx(capsys, "node", "add", name, "--mac", f"52:54:00:00:00:{name[-1]}0",
                   "--ip", f"198.18.0.{name[-1]}0", "--cpus", "2", "--memory", memory)[0] == 0
        assert json.loads(vlx(capsys, "node", "show", name, "--json")[1])["memory_mib"] == mib


def test_placement_error_says_per_node_what_is_free_and_why_it_does_not_fit(cluster_db, capsys):
    code, _, err = vlx(capsys, "vc", "define", "blue", "--vms", "3", "--vcpus", "2",
                       "--memory", "512MiB", "--cidr", "198.19.6.0/24")
    assert code == 2 and err.count("\n") == 1
    assert "blue-3 needs 2 VCPUs and 512 MiB on one node" in err
    assert "once blue-1@node3, blue-2@node4 are placed" in err
    for node in ("node1", "node2", "node3", "node4"):
        assert f"{node} 1 VCPU, 768 MiB (too few VCPUs)" in err


def test_the_readme_vc_define_example_works_on_the_example_cluster(cluster_db, capsys):
    line = next(line for line in README.read_text().splitlines()
                if line.startswith("vlx vc define blue"))
    argv = line.split("[")[0].split()[1:]   # without the optional [--vxlan ID | --vlan ID]
    code, out, err = vlx(capsys, *argv)
    assert code == 0, err
    assert out.startswith("defined blue: blue-1@")


def test_bootsvc_status_says_when_the_replica_serves_another_database(cluster_db, tmp_path,
                                                                      capsys):
    state = tmp_path / "replica"
    state.mkdir()
    (state / "status.json").write_text(json.dumps({
        "state": "stopped", "pid": 0, "node": None, "interface": "eth0",
        "address": "198.18.0.201", "generation": 3, "updated": "x", "reloads": 0,
        "stale_generations_refused": 0, "services": {}, "database": "/elsewhere/cluster.db"}))
    code, out, _ = vlx(capsys, "bootsvc", "status", "--state-dir", str(state))
    assert code == 1
    assert out.startswith("stopped: (not a node) on eth0")
    assert out.endswith(f"\nnote: this replica serves /elsewhere/cluster.db, not {cluster_db} "
                        "(--db, VLX_DB)\n")
    assert vlx(capsys, "bootsvc", "status", "--state-dir", str(state), "--json")[0] == 1


def test_bootsvc_run_warns_of_a_netboot_tree_that_is_not_there(cluster_db, tmp_path, capsys,
                                                               caplog):
    from virtualinux.vvcm.cli.bootsvc import missing_tree_warning

    # Said at start (the interface is made up, so it stops right after).
    code, _, _ = vlx(capsys, "bootsvc", "run", "--interface", "nosuch0", "--services", "tftp",
                     "--netboot-root", str(tmp_path / "none"))
    assert code == 2
    assert f"netboot tree {tmp_path}/none does not exist" in caplog.text

    assert missing_tree_warning(("dhcp",), tmp_path / "none") is None
    said = missing_tree_warning(("dhcp", "tftp", "http"), tmp_path / "none")
    assert said.startswith(f"netboot tree {tmp_path}/none does not exist: tftp and http")
    assert "vlx netboot render" in said
    (tmp_path / "tree").mkdir()
    assert "holds no boot.ipxe" in missing_tree_warning(("http",), tmp_path / "tree")
    (tmp_path / "tree" / "boot.ipxe").write_text("#!ipxe\n")
    assert missing_tree_warning(("http",), tmp_path / "tree") is None


def test_a_command_imports_only_the_noun_it_names():
    from virtualinux.vvcm.cli import noun_of
    assert noun_of(["--db", "bootsvc", "db", "serve"]) == "db"      # --db's value is no noun
    assert noun_of(["--store=etcd://x:2379", "-v", "bootsvc", "run"]) == "bootsvc"
    for argv in (["--help"], ["nosuch", "list"], ["a.b"], ["__main__"]):
        assert noun_of(argv) is None, argv
    # A module that is no noun (common) builds the whole parser, whose error lists the nouns.
    assert "bootsvc" in build_parser("common")._subparsers._group_actions[0].choices
    # `vlx bootsvc run` starts no libvirt, lab or image code (a node runs it at every boot).
    code = ("import sys; from virtualinux.vvcm.cli import build_parser; build_parser('bootsvc');"
            "print(sorted(m for m in sys.modules if m in ('libvirt', 'virtualinux.vm_test.lab',"
            " 'virtualinux.image.build', 'virtualinux.vvcm.virt.migrate')))")
    done = subprocess.run([vlx_command()[0], "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]", done.stdout
    assert sorted(build_parser("bootsvc")._subparsers._group_actions[0].choices) == ["bootsvc"]

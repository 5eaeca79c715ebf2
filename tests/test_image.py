"""Image building without a build: our elements' layout (as DIB and dib-lint want it), the
cache key and cache entries, bad `vlx image` input, and a mirror that does not answer."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from virtualinux.image import build, cache, dib
from virtualinux.image.build import ImageSpec, image_inputs, image_spec, root_size
from virtualinux.vvcm.cli import main
from virtualinux.vvcm.errors import VlxError

ELEMENTS = sorted(path for path in dib.ELEMENTS_DIR.iterdir() if path.is_dir())
SCRIPTS = sorted(script for element in ELEMENTS for phase in element.glob("*.d")
                 if phase.name != "environment.d" for script in phase.iterdir()
                 if script.is_file())


def test_our_elements_are_the_node_guest_and_base_elements():
    assert [element.name for element in ELEMENTS] == [
        "virtualinux-base", "virtualinux-guest", "virtualinux-node"]


@pytest.mark.parametrize("element", ELEMENTS, ids=lambda path: path.name)
def test_element_has_readme_sorted_known_deps_and_a_package_mapping(element):
    assert (element / "README.rst").read_text().startswith("=")
    deps = (element / "element-deps").read_text().split()
    assert deps == sorted(deps)
    for dep in deps:
        assert (dib.ELEMENTS_DIR / dep).is_dir() or (dib.DIB_ELEMENTS_DIR / dep).is_dir(), dep
    packages = yaml.safe_load((element / "package-installs.yaml").read_text())
    assert isinstance(packages, dict) and packages
    assert list(packages) == sorted(packages)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_element_script_is_executable_bash_that_stops_on_errors(script):
    text = script.read_text()
    assert os.access(script, os.X_OK)
    assert text.startswith("#!/bin/bash\n")
    assert "set -eu\nset -o pipefail\n" in text
    # DIB sanitises the environment: our own knobs must be DIB_ variables to get through.
    # Quoted here-documents (<<'UNIT') are files the script writes, and comments are comments:
    # neither is expanded.
    shell = re.sub(r"<<'(\w+)'\n.*?\n\1\n", "", text, flags=re.DOTALL)
    shell = re.sub(r"(?m)^\s*#.*$", "", shell)
    for word in shell.replace("{", " ").replace("$", " $").split():
        if word.startswith("$VLX") or word.startswith("$DIB") and "VLX" in word:
            assert word.startswith("$DIB_VLX_"), word


def test_dib_lint_passes_on_our_elements(tmp_path):
    # dib-lint only knows DIB's own tree layout: give it one holding our elements.
    tree = tmp_path / "diskimage_builder"
    (tree / "lib").mkdir(parents=True)
    shutil.copytree(dib.ELEMENTS_DIR, tree / "elements", symlinks=True)
    lint = Path(shutil.which("dib-lint", path=str(Path(os.sys.executable).parent)) or "dib-lint")
    done = subprocess.run([str(lint)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_input_key_ignores_order_and_follows_every_value():
    key = cache.input_key({"a": "1", "b": "2"})
    assert key == cache.input_key({"b": "2", "a": "1"})
    assert key != cache.input_key({"a": "1", "b": "3"})
    assert key != cache.input_key({"a": "1", "b": "2", "c": ""})


def test_tree_hash_sees_contents_names_and_the_executable_bit(tmp_path):
    (tmp_path / "hook").write_text("#!/bin/bash\n")
    first = cache.sha256_tree(tmp_path)
    (tmp_path / "hook").chmod(0o755)
    executable = cache.sha256_tree(tmp_path)
    (tmp_path / "hook").rename(tmp_path / "hook2")
    renamed = cache.sha256_tree(tmp_path)
    assert len({first, executable, renamed}) == 3
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.pyc").write_bytes(b"junk")
    assert cache.sha256_tree(tmp_path) == renamed


def test_node_key_follows_the_elements_and_the_virtualinux_source(tmp_path, monkeypatch):
    spec = image_spec("node")
    base = cache.input_key(image_inputs(spec))
    assert base == cache.input_key(image_inputs(spec))
    assert base != cache.input_key(image_inputs(image_spec("node", release="trixie")))
    assert base != cache.input_key(image_inputs(image_spec("node", root_size_mib=4096)))
    assert base != cache.input_key(image_inputs(image_spec(
        "node", mirror="http://mirror.example/debian")))
    assert "virtualinux-source" not in image_inputs(image_spec("guest"))

    elements = tmp_path / "elements"
    shutil.copytree(dib.ELEMENTS_DIR, elements)
    monkeypatch.setattr(dib, "ELEMENTS_DIR", elements)
    assert cache.input_key(image_inputs(spec)) == base
    with (elements / "virtualinux-node" / "package-installs.yaml").open("a") as stream:
        stream.write("htop:\n")
    assert cache.input_key(image_inputs(spec)) != base


def test_source_hash_covers_the_packages_but_not_the_tests(tmp_path):
    source = tmp_path / "src"
    (source / "pkg").mkdir(parents=True)
    (source / "tests").mkdir()
    (source / "pyproject.toml").write_text(
        '[tool.setuptools.package-dir]\n"virtualinux.pkg" = "pkg"\n')
    (source / "pkg" / "a.py").write_text("A = 1\n")
    first = build.source_tree_hash(source)
    (source / "tests" / "test_a.py").write_text("def test(): pass\n")
    assert build.source_tree_hash(source) == first
    (source / "pkg" / "a.py").write_text("A = 2\n")
    assert build.source_tree_hash(source) != first


def test_the_node_wheel_carries_what_a_node_runs_and_not_the_lab_or_benches(tmp_path):
    source = build.node_source(build.REPOSITORY, tmp_path / "source")
    assert not (source / "bench").exists() and not (source / "vm-test").exists()
    # The same folders the node key hashes: a change to a bench makes no new node image.
    assert sorted(p.name for p in source.iterdir()) == sorted(
        build.wheel_sources(build.REPOSITORY))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                           "--disable-pip-version-check", "--wheel-dir", str(tmp_path / "w"),
                           str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "w").glob("virtualinux-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packages = {name.split("/")[1] for name in archive.namelist()
                    if name.startswith("virtualinux/")}
    assert packages == {"bootsvc", "image", "initscripts", "netboot", "storage", "vvcm"}


def test_vlx_works_on_a_node_without_the_lab(tmp_path):
    """What `vlx` does where vm_test is not installed (a node): every noun but `lab`."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['virtualinux.vm_test'] = None\n"
         "from virtualinux.vvcm.cli import main; sys.exit(main(sys.argv[1:]))", "--help"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "bootsvc" in done.stdout and "\n    lab " not in done.stdout


def test_root_size_leaves_headroom_in_whole_64_mib():
    spec = ImageSpec("guest")
    assert root_size(spec, 100) == 640          # 100 + 512, rounded up
    assert root_size(spec, 4000) == 5056        # 4000 + 1000, rounded up
    assert root_size(ImageSpec("guest", root_size_mib=3000), 4000) == 3000


def test_a_cache_entry_exists_only_once_published_and_is_delivered_whole(tmp_path):
    root = cache.cache_root(tmp_path / "cache")
    assert cache.cached(root, "guest", "k1") is None
    with cache.staging(root, "guest") as staged:
        (staged / "root.img").write_bytes(b"x" * 4096)
        assert cache.cached(root, "guest", "k1") is None
        cache.write_manifest(staged, {"kind": "guest", "key": "k1"})
        entry = cache.publish(staged, cache.entry_dir(root, "guest", "k1"))
    assert cache.cached(root, "guest", "k1") == entry
    assert [manifest["key"] for _, manifest in cache.entries(root)] == ["k1"]
    out = cache.deliver(entry, tmp_path / "out")
    assert sorted(path.name for path in out.iterdir()) == ["manifest.json", "root.img"]
    assert not [path for path in root.iterdir() if "building" in path.name]


def _published(root: Path, kind: str, key: str, when: float) -> Path:
    """A finished entry of `kind`, with a build log, last used at `when`."""
    with cache.staging(root, kind) as staged:
        (staged / "root.img").write_bytes(b"x")
        cache.write_manifest(staged, {"kind": kind, "key": key})
        entry = cache.publish(staged, cache.entry_dir(root, kind, key))
    (root / "logs").mkdir(exist_ok=True)
    (root / "logs" / f"{kind}-{key}-20261202T000000.log").write_text("built\n")
    os.utime(entry, (when, when))
    return entry


def test_publishing_keeps_the_most_recently_used_entries_of_its_kind(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.setenv("VLX_IMAGE_CACHE_KEEP", "2")
    root = cache.cache_root(tmp_path / "cache")
    _published(root, "node", "n1", 1000)
    _published(root, "guest", "g1", 2000)
    _published(root, "guest", "g2", 3000)
    assert cache.cached(root, "guest", "g1") is not None      # a hit makes g1 the most recent
    _published(root, "guest", "g3", 1500)                      # g2 is now the least recent
    keys = sorted(manifest["key"] for _, manifest in cache.entries(root))
    assert keys == ["g1", "g3", "n1"]                          # another kind is not counted
    assert sorted(log.name for log in (root / "logs").iterdir()) == [
        "guest-g1-20261202T000000.log", "guest-g3-20261202T000000.log",
        "node-n1-20261202T000000.log"]
    assert not [path for path in root.iterdir() if "retired" in path.name]
    # An entry being rebuilt (its build lock held) is never taken from under the build.
    with cache.build_lock(root, "guest", "g1"):
        assert cache.prune(root, "guest", 0) == [cache.entry_dir(root, "guest", "g3")]
    assert [manifest["key"] for _, manifest in cache.entries(root)] == ["n1", "g1"]
    assert main(["image", "--cache", str(root), "prune", "--keep", "0"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"removed {cache.entry_dir(root, 'guest', 'g1')}",
        f"removed {cache.entry_dir(root, 'node', 'n1')}"]
    assert cache.entries(root) == []
    monkeypatch.setenv("VLX_IMAGE_CACHE_KEEP", "none")
    with pytest.raises(VlxError, match="VLX_IMAGE_CACHE_KEEP='none'"):
        cache.keep_count()


def test_bad_spec_values_are_refused_with_the_flag_named(tmp_path):
    with pytest.raises(VlxError, match="unknown image kind 'vm'"):
        image_spec("vm")
    with pytest.raises(VlxError, match="--release"):
        image_spec("guest", release="Bookworm;rm")
    with pytest.raises(VlxError, match="--mirror 'ftp://x'"):
        image_spec("guest", mirror="ftp://x")
    with pytest.raises(VlxError, match="--security-mirror"):
        image_spec("guest", security_mirror="deb.debian.org")
    with pytest.raises(VlxError, match="--root-size 100 MiB"):
        image_spec("guest", root_size_mib=100)
    with pytest.raises(VlxError, match="--xen is for node"):
        image_spec("guest", xen=True)
    with pytest.raises(VlxError, match="not a virtualinux checkout"):
        image_spec("node", source=tmp_path)


def test_a_mirror_that_does_not_answer_fails_at_once_and_leaves_nothing(tmp_path):
    # 127.0.0.1:9 (discard) refuses the connection: no traffic leaves the machine.
    spec = image_spec("guest", mirror="http://127.0.0.1:9/debian")
    with pytest.raises(VlxError, match="phase mirror.*does not answer"):
        build.build_image(spec, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                          progress=lambda message: None)
    assert not (tmp_path / "out").exists()
    assert cache.entries(tmp_path / "cache") == []


def test_a_security_mirror_that_does_not_answer_is_named(tmp_path, monkeypatch):
    answered = []

    class Reply:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def urlopen(request, timeout):
        # The main mirror answers; the security mirror's port refuses, as a dead host would.
        if "127.0.0.1:9" in request.full_url:
            raise build.urllib.error.URLError("Connection refused")
        answered.append(request.full_url)
        return Reply()

    monkeypatch.setattr(build.urllib.request, "urlopen", urlopen)
    spec = image_spec("guest", security_mirror="http://127.0.0.1:9/debian-security")
    with pytest.raises(VlxError, match="Debian security mirror does not answer for bookworm: "
                                       "http://127.0.0.1:9/debian-security/dists/"
                                       "bookworm-security/Release"):
        build.check_mirror(spec)
    assert answered == ["http://deb.debian.org/debian/dists/bookworm/Release"]


def test_hook_lines_name_the_phase_and_the_element_that_ships_the_script():
    line = ("2026-11-25 14:22:50.652 | dib-run-parts Running "
            "/tmp/dib_build.Ngk/hooks/install.d/60-virtualinux-install\n")
    match = dib._HOOK.search(line)
    assert match and match.groups() == ("install.d", "60-virtualinux-install")
    in_chroot = "12:00:00.000 | dib-run-parts Running /tmp/in_target.d/post-install.d/80-x\n"
    assert dib._HOOK.search(in_chroot).groups() == ("post-install.d", "80-x")
    paths = [dib.ELEMENTS_DIR, dib.DIB_ELEMENTS_DIR]
    assert dib.element_of("install.d", "60-virtualinux-install", paths) == "virtualinux-node"
    assert dib.element_of("root.d", "08-debootstrap", paths) == "debootstrap"
    assert dib.element_of("root.d", "99-nothing", paths) == "?"


@pytest.mark.parametrize("argv, message", [
    (["image", "build", "vm"], "unknown image kind 'vm'"),
    (["image", "build", "guest", "--mirror", "file:///srv"], "--mirror"),
    (["image", "build", "guest", "--xen"], "--xen is for node"),
    (["image", "show", "nothing"], "no cached image named 'nothing'"),
])
def test_bad_vlx_image_input_exits_2_with_one_message(argv, message, tmp_path, capsys):
    assert main(["image", "--cache", str(tmp_path), *argv[1:]]) == 2
    assert message in capsys.readouterr().err


def test_vlx_image_list_and_show_read_the_manifests(tmp_path, capsys):
    with cache.staging(tmp_path, "guest") as staged:
        (staged / "root.img").write_bytes(b"\0" * 1000)
        cache.write_manifest(staged, {"kind": "guest", "key": "abc", "artifacts": {
            "root.img": {"size": 1000, "sha256": "0" * 64}}, "inputs": {"release": "bookworm"},
            "packages": {"openssh-server": "1:9.2p1-2+deb12u3", "chrony": "4.3-2+deb12u1"}})
        cache.publish(staged, cache.entry_dir(tmp_path, "guest", "abc"))
    assert main(["image", "--cache", str(tmp_path), "list"]) == 0
    assert "guest  abc" in capsys.readouterr().out
    assert main(["image", "--cache", str(tmp_path), "show", "guest"]) == 0
    shown = capsys.readouterr().out
    assert "root.img" in shown and "input release: bookworm" in shown
    # The package versions the README promises, in text too (not only --json).
    assert shown.endswith("  packages (2):\n"
                          "    chrony                           4.3-2+deb12u1\n"
                          "    openssh-server                   1:9.2p1-2+deb12u3\n")


INITRAMFS_FILES = dib.ELEMENTS_DIR / "virtualinux-node/post-install.d/virtualinux-initramfs"


@pytest.mark.parametrize("name", ["hook", "login", "node-files"])
def test_initramfs_scripts_are_posix_sh_with_the_prereqs_contract(name):
    script = INITRAMFS_FILES / name
    assert os.access(script, os.X_OK) and script.read_text().startswith("#!/bin/sh\n")
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True).returncode == 0
    said = subprocess.run(["sh", str(script), "prereqs"], capture_output=True, text=True)
    assert said.returncode == 0 and said.stdout.strip() in ("", "iscsi")


def test_the_login_never_puts_the_secret_on_a_command_line():
    text = (INITRAMFS_FILES / "login").read_text()
    uses = [line.strip() for line in text.splitlines() if "ISCSI_PASSWORD" in line
            and not line.lstrip().startswith("#")]
    # Only printf (a shell builtin: no argv of another process) and unset may see it.
    assert uses == ['"node.session.auth.password = ${ISCSI_PASSWORD:-}"',
                    "unset ISCSI_PASSWORD"]
    assert "iscsistart" not in text.replace("iscsistart -w", "").split("#")[0]


@pytest.mark.parametrize(("cmdline", "panic"), [
    ("root=LABEL=vroot rw", "15"),
    ("root=LABEL=vroot break=mount", ""),
    ("break root=LABEL=vroot", ""),
    ("rd.shell", ""),
    ("vlx.debug=shell quiet", ""),
    ("vlx.debug=shellx", "15"),
])
def test_initramfs_reboots_on_failure_unless_the_command_line_asks_for_a_shell(
        tmp_path, cmdline, panic):
    proc_cmdline = tmp_path / "cmdline"
    proc_cmdline.write_text(cmdline + "\n")
    conf = tmp_path / "panic.conf"
    conf.write_text((INITRAMFS_FILES / "panic.conf").read_text()
                    .replace("/proc/cmdline", str(proc_cmdline)))
    said = subprocess.run(["sh", "-c", f'panic=; . "{conf}"; printf "%s" "$panic"'],
                          capture_output=True, text=True, check=True)
    assert said.stdout == panic

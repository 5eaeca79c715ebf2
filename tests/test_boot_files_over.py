"""The cluster setting boot_files_over: kernel and initrds over TFTP where HTTP is unwanted."""

from __future__ import annotations

import pytest
from virtualinux.netboot import layout, render, scripts
from virtualinux.vvcm import Cluster, VlxError, inventory
from virtualinux.vvcm.model import BootFilesOver

from .conftest import EXAMPLE, vlx


def example_with(tmp_path, line: str):
    text = EXAMPLE.read_text().replace("[cluster]\n", f"[cluster]\n{line}\n", 1)
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def load(path) -> Cluster:
    return inventory.apply(Cluster(0, None), inventory.load(path), str(path))


def test_http_is_the_default_and_tftp_names_every_file_by_tftp(tmp_path):
    http = load(EXAMPLE)
    assert http.settings.boot_files_over == BootFilesOver.HTTP
    tftp = load(example_with(tmp_path, 'boot_files_over = "tftp"'))
    assert tftp.settings.boot_files_over == BootFilesOver.TFTP
    node = tftp.nodes[0]
    for cluster, scheme, other in ((http, "http://", "tftp://"), (tftp, "tftp://", "http://")):
        script = scripts.node_script(cluster, node, ["console=ttyS0"])
        fetched = [line.split()[1] for line in script.splitlines()
                   if line.startswith(("kernel ", "initrd "))]
        assert fetched and all(url.startswith(scheme + "${next-server}/") for url in fetched)
        assert other not in script
        discover = scripts.discover_script((), scripts.files_base(cluster))
        assert f"kernel {scheme}${{next-server}}/{layout.KERNEL} " in discover


def test_a_rendered_tree_follows_the_setting(tmp_path):
    image = tmp_path / "image"
    image.mkdir()
    (image / "vmlinuz").write_bytes(b"kernel")
    (image / "initrd.img").write_bytes(b"initrd")
    cluster = load(example_with(tmp_path, 'boot_files_over = "tftp"'))
    tree = render.render(cluster, image, tmp_path / "netboot", ["console=ttyS0"]).root
    for name in (layout.DISCOVER_SCRIPT, layout.node_script_name(cluster.nodes[0].mac)):
        text = (tree / name).read_text()
        assert f"tftp://${{next-server}}/{layout.INITRD}" in text and "http://" not in text


def test_a_bad_value_is_one_line_naming_the_key(tmp_path, db_path, capsys):
    path = example_with(tmp_path, 'boot_files_over = "nfs"')
    with pytest.raises(VlxError, match="boot_files_over.*choose from http, tftp"):
        load(path)
    code, _, err = vlx(capsys, "--db", str(db_path), "db", "import", str(path))
    assert code == 2 and "boot_files_over" in err and len(err.strip().splitlines()) == 1

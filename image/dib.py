"""Running diskimage-builder: the environment it needs here, its log in a file, its progress
as phases with elapsed time, and its failure as one message naming element, phase and log.

DIB names each hook it runs (`dib-run-parts Running .../hooks/install.d/60-virtualinux-install`);
that line tells the phase and the script, and the script's name is found in exactly one
element directory, which names the element that failed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import diskimage_builder

from ..vvcm.errors import VlxError

ELEMENTS_DIR = Path(__file__).resolve().parent / "elements"
DIB_ELEMENTS_DIR = Path(diskimage_builder.__file__).resolve().parent / "elements"
_HOOK = re.compile(r"dib-run-parts Running \S*/(?:hooks|in_target\.d)/([a-z-]+\.d)/(\S+)\s*$")
_NO_SPACE = re.compile(r"No space left on device|Could not allocate block|ENOSPC")

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Mirrors:
    """Where Debian comes from. The defaults answer from these machines; DIB's own default
    security host does not (LAB.md), so it is always set."""
    debian: str = "http://deb.debian.org/debian"
    security: str = "http://deb.debian.org/debian-security"


@dataclasses.dataclass
class HookPosition:
    phase: str = "start"
    script: str = ""


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Clock:
    """Elapsed time since the build started, printed in front of each progress line."""

    def __init__(self, progress: Progress):
        self.started = time.monotonic()
        self.progress = progress

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, message: str) -> None:
        self.progress(f"[{self.elapsed():7.1f}s] {message}")


def element_of(phase: str, script: str, paths: Sequence[Path]) -> str:
    """The element that ships `phase/script`, or "?" when none of `paths` has it."""
    for root in paths:
        for element in sorted(root.iterdir()) if root.is_dir() else []:
            if (element / phase / script).exists():
                return element.name
    return "?"


def environment(release: str, mirrors: Mirrors, dib_cache: Path,
                extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)    # disk-image-create sits beside our python
    env.update({
        "PATH": f"{bin_dir}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        "ELEMENTS_PATH": str(ELEMENTS_DIR),
        "DIB_RELEASE": release,
        "DIB_DISTRIBUTION_MIRROR": mirrors.debian,
        "DIB_DEBIAN_MIRROR": mirrors.debian,
        "DIB_DEBIAN_SECURITY_MIRROR": mirrors.security,
        "DIB_IMAGE_CACHE": str(dib_cache),    # debootstrap's tarball, reused by later builds
        **extra,
    })
    return env


def disk_image_create(elements: Sequence[str], output: Path, root_label: str, log_path: Path,
                      env: dict[str, str], clock: Clock) -> None:
    """`disk-image-create -t tar --root-label LABEL -o OUTPUT ELEMENTS...`, its output into
    `log_path`, its hooks reported as phases. Raises VlxError naming the failing element and
    phase. DIB writes the label into /etc/fstab; the caller labels the file system the same."""
    program = shutil.which("disk-image-create", path=env["PATH"])
    if program is None:
        raise VlxError("disk-image-create is not installed (pip install diskimage-builder)",
                       "image build")
    cmd = [program, "-t", "tar", "--root-label", root_label, "-o", str(output), *elements]
    position = HookPosition()
    no_space = False
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace",
                                   stdin=subprocess.DEVNULL)
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            match = _HOOK.search(line)
            if match:
                if match.group(1) != position.phase:
                    clock.say(f"dib {match.group(1)}")
                position = HookPosition(match.group(1), match.group(2))
            if _NO_SPACE.search(line):
                no_space = True
        code = process.wait()
    if code != 0:
        element = element_of(position.phase, position.script, [ELEMENTS_DIR, DIB_ELEMENTS_DIR])
        reason = "no space left on device" if no_space else f"exit code {code}"
        where = f"element {element}, phase {position.phase}"
        if position.script:
            where += f", script {position.script}"
        raise VlxError(f"disk-image-create failed ({reason}) in {where}; full log: {log_path}",
                       "image build")

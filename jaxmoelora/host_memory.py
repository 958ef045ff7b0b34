"""Huge pages for the host memory XLA:CPU allocates every step.

XLA:CPU allocates a jitted call's temporary buffers afresh on every call, and glibc's malloc serves allocations above
32 MiB with new mmap'd regions, so each training step page-faults its whole working set again in 4 KiB pages (about
1.2 million faults, 4.7 GB, per SmolLM2-135M step at 8 x 256). glibc 2.35 and later can advise those regions to use
transparent huge pages (the `glibc.malloc.hugetlb=1` tunable), which cuts those faults about 400-fold (to about 3,000
per step). What that saves in step time varies with the machine (BENCHMARKS.md). Tunables are read only when a process
starts, so the `jaxmoelora` command starts itself once more with the tunable set. Set JAXMOELORA_KEEP_MALLOC=1 to turn
this off.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_VARIABLE = "JAXMOELORA_KEEP_MALLOC"
TRANSPARENT_HUGEPAGE_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MIN_GLIBC = (2, 35)


def glibc_version() -> tuple[int, ...] | None:
    """The running glibc's version, or None when the C library is not glibc."""
    library, version = platform.libc_ver()
    if library != "glibc" or not version:
        return None
    try:
        return tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None


def transparent_hugepages_available(setting_file: Path = TRANSPARENT_HUGEPAGE_SETTING) -> bool:
    """Whether the kernel grants transparent huge pages to regions that ask (mode `always` or `madvise`)."""
    try:
        return "[never]" not in setting_file.read_text()
    except OSError:
        return False


def hugepage_environment(environ: Mapping[str, str], *, glibc: tuple[int, ...] | None,
                         hugepages_available: bool) -> dict[str, str] | None:
    """The environment to restart the process with, or None when it should run as it is."""
    if environ.get(OPT_OUT_VARIABLE, "") not in ("", "0"):
        return None
    if glibc is None or glibc < MIN_GLIBC or not hugepages_available:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None  # already set, by us or by the user
    restarted = dict(environ)
    restarted["GLIBC_TUNABLES"] = f"{tunables}:{HUGETLB_TUNABLE}" if tunables else HUGETLB_TUNABLE
    return restarted


def restart_with_hugepage_malloc() -> None:
    """Replaces this process by the same command with the hugetlb tunable set, when it helps; otherwise returns.

    Call it first thing in a command-line entry point, never from library code or an interactive session."""
    if sys.platform != "linux":
        return
    environ = hugepage_environment(os.environ, glibc=glibc_version(),
                                   hugepages_available=transparent_hugepages_available())
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    except OSError:
        return  # run on with the default allocator

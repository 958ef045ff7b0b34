"""The command line restarts itself once with glibc's huge-page malloc tunable, and only when that can help."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxmoelora.host_memory import (HUGETLB_TUNABLE, OPT_OUT_VARIABLE, glibc_version, hugepage_environment,
                                    transparent_hugepages_available)

SUPPORTED = dict(glibc=(2, 36), hugepages_available=True)


def test_sets_the_tunable_and_keeps_the_rest_of_the_environment():
    environ = hugepage_environment({"PATH": "/bin"}, **SUPPORTED)
    assert environ == {"PATH": "/bin", "GLIBC_TUNABLES": HUGETLB_TUNABLE}


def test_appends_to_tunables_the_user_set():
    environ = hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **SUPPORTED)
    assert environ["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGETLB_TUNABLE}"


@pytest.mark.parametrize("environ, support", [
    ({"GLIBC_TUNABLES": HUGETLB_TUNABLE}, SUPPORTED),  # already restarted: no loop
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, SUPPORTED),  # the user's own choice wins
    ({OPT_OUT_VARIABLE: "1"}, SUPPORTED),
    ({}, dict(glibc=(2, 31), hugepages_available=True)),  # tunable unknown before glibc 2.35
    ({}, dict(glibc=None, hugepages_available=True)),  # musl, macOS
    ({}, dict(glibc=(2, 36), hugepages_available=False)),  # transparent huge pages off in the kernel
])
def test_runs_unchanged_when_it_cannot_help_or_was_asked_not_to(environ, support):
    assert hugepage_environment(environ, **support) is None


def test_reads_the_kernel_setting(tmp_path: Path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert transparent_hugepages_available(setting)
    setting.write_text("always madvise [never]\n")
    assert not transparent_hugepages_available(setting)
    assert not transparent_hugepages_available(tmp_path / "missing")


PRINT_AFTER_RESTART = ("from jaxmoelora.host_memory import restart_with_hugepage_malloc\n"
                       "restart_with_hugepage_malloc()\n"
                       "import os, sys\n"
                       "print(repr(os.environ.get('GLIBC_TUNABLES')), sys.argv[1:])\n")


def run_restarting_script(extra_env: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT_VARIABLE)} | extra_env
    done = subprocess.run([sys.executable, "-c", PRINT_AFTER_RESTART, "--flag", "value"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(sys.platform != "linux" or (glibc_version() or (0,)) < (2, 35)
                    or not transparent_hugepages_available(),
                    reason="needs Linux with glibc >= 2.35 and transparent huge pages")
def test_the_process_restarts_once_with_its_arguments():
    assert run_restarting_script({}).strip() == f"'{HUGETLB_TUNABLE}' ['--flag', 'value']"
    assert run_restarting_script({OPT_OUT_VARIABLE: "1"}).strip() == "None ['--flag', 'value']"

"""The `jtok` program keeps freed memory in glibc's allocator (jtok.allocator)."""

import os
import subprocess
import sys
import textwrap

import pytest

from jtok import allocator
from jtok.cli import main


class FakeLibc:
    def __init__(self, answer: int = 1):
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


@pytest.fixture(autouse=True)
def _keep_setting(monkeypatch):
    # The rules below are tested with a fake libc; the module's record is restored after.
    monkeypatch.setattr(allocator, "_setting", allocator._setting)


def test_keeps_freed_memory_by_default():
    libc = FakeLibc()
    setting = allocator.keep_freed_memory(environ={}, libc=libc)
    assert libc.calls == [(-4, 0), (-1, 2**31 - 1)]  # M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB
    assert "freed memory kept" in setting
    assert allocator.allocator_setting() == setting


@pytest.mark.parametrize("environ, named", [
    ({"JTOK_SYSTEM_MALLOC": "1"}, "JTOK_SYSTEM_MALLOC"),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "MALLOC_TRIM_THRESHOLD_"),
    ({"MALLOC_MMAP_MAX_": "65536"}, "MALLOC_MMAP_MAX_"),
    ({"MALLOC_TOP_PAD_": "0"}, "MALLOC_TOP_PAD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}, "GLIBC_TUNABLES"),
])  # fmt: skip
def test_the_users_choice_stands(environ, named):
    libc = FakeLibc()
    setting = allocator.keep_freed_memory(environ=environ, libc=libc)
    assert libc.calls == []
    assert named in setting


def test_other_malloc_variables_and_opt_out_zero_do_not_stop_it():
    libc = FakeLibc()
    environ = {"MALLOC_ARENA_MAX": "2", "MALLOC_PERTURB_": "7", "JTOK_SYSTEM_MALLOC": "0",
               "GLIBC_TUNABLES": "glibc.pthread.rseq=0"}  # fmt: skip
    assert "freed memory kept" in allocator.keep_freed_memory(environ=environ, libc=libc)
    assert len(libc.calls) == 2


def test_a_refusal_and_a_preloaded_allocator_are_reported():
    assert "refused" in allocator.keep_freed_memory(environ={}, libc=FakeLibc(answer=0))
    setting = allocator.keep_freed_memory(environ={"LD_PRELOAD": "libjemalloc.so.2"},
                                          libc=FakeLibc())  # fmt: skip
    assert "LD_PRELOAD=libjemalloc.so.2" in setting


def test_a_c_library_without_mallopt_is_left_alone():
    assert "no mallopt" in allocator.keep_freed_memory(environ={}, libc=object())


def test_main_with_an_argv_leaves_the_allocator_alone(monkeypatch, capsys):
    called = []
    monkeypatch.setattr("jtok.cli.keep_freed_memory", lambda: called.append(1))
    assert main(["info", "--preset", "tiny"]) == 0
    assert called == []


_PROBE = textwrap.dedent("""
    import resource, sys
    import torch
    sys.argv = ["jtok", "info", "--preset", "tiny"]
    from jtok.cli import main
    from jtok.allocator import allocator_setting
    assert main() == 0
    def faults_of_a_64mib_buffer():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = torch.ones(16 * 2**20)  # 64 MiB, every page written
        del buffer
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults = [faults_of_a_64mib_buffer() for _ in range(24)]
    print(allocator_setting(), "|", sum(faults[-6:]))
""")


@pytest.mark.skipif(not (os.confstr_names.get("CS_GNU_LIBC_VERSION")
                         and "glibc" in os.confstr("CS_GNU_LIBC_VERSION")),
                    reason="glibc only")  # fmt: skip
@pytest.mark.parametrize("opt_out", [False, True])
def test_the_program_reuses_freed_buffers_without_page_faults(opt_out):
    # A 64 MiB block is above glibc's largest mmap threshold: by default every one is
    # mapped afresh and each of its pages faults. Kept, the heap settles after a few
    # rounds (the aligned requests fragment it a little) and the pages are reused.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    if opt_out:
        env["JTOK_SYSTEM_MALLOC"] = "1"
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    setting, faults = done.stdout.strip().rsplit("|", 1)
    pages = 6 * 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")  # of the last six buffers
    if opt_out:
        assert "JTOK_SYSTEM_MALLOC" in setting
        assert int(faults) >= pages // 2
    else:
        assert "freed memory kept" in setting
        assert int(faults) < pages // 100

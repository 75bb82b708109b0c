"""Benchmarks record the C allocator's setting (jtok.allocator)."""

import pytest

from jtok import allocator

GLIBC = allocator.glibc_version()


@pytest.mark.skipif(GLIBC is None, reason="glibc only")
def test_glibc_defaults_and_the_environments_settings_are_named():
    assert allocator.allocator_setting({}) == f"{GLIBC} defaults"
    environ = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184",
               "MALLOC_ARENA_MAX": "2", "MALLOC_PERTURB_": "7"}  # fmt: skip
    # Only what decides whether freed memory is kept; arenas and debugging are not named.
    assert allocator.allocator_setting(environ) == (
        f"{GLIBC} with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184")


@pytest.mark.skipif(GLIBC is None, reason="glibc only")
def test_tunables_and_a_preloaded_allocator_are_named():
    environ = {"GLIBC_TUNABLES": "glibc.pthread.rseq=0:glibc.malloc.mmap_max=0",
               "LD_PRELOAD": "libjemalloc.so.2"}  # fmt: skip
    setting = allocator.allocator_setting(environ)
    assert setting == (f"{GLIBC} with GLIBC_TUNABLES=glibc.malloc.mmap_max=0; "
                       "LD_PRELOAD=libjemalloc.so.2 may replace malloc")  # fmt: skip


def test_another_c_library_is_named(monkeypatch):
    monkeypatch.setattr(allocator, "glibc_version", lambda: None)
    assert allocator.allocator_setting({}) == "the platform's (not glibc)"


def test_the_training_step_benchmark_records_the_setting(monkeypatch):
    from jtok.bench.train_step import format_report, train_step_benchmark
    from jtok.presets import preset

    monkeypatch.setenv("MALLOC_TOP_PAD_", "1048576")
    result = train_step_benchmark(preset("tiny"), ["jtokm"], batch=2, seq_len=16, steps=1,
                                  reps=1, warmup=0, threads=1, optimizer="sparse")  # fmt: skip
    assert result["allocator"] == allocator.allocator_setting()
    if GLIBC is not None:
        assert "MALLOC_TOP_PAD_=1048576" in result["allocator"]
    assert f"host allocator: {result['allocator']}" in format_report(result)

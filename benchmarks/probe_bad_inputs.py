#!/usr/bin/env python3
"""Probe every `jtok` subcommand with bad inputs and faults, as a demanding user would.

    python3 benchmarks/probe_bad_inputs.py            # table + summary line
    python3 benchmarks/probe_bad_inputs.py --json     # one JSON object with every case
    python3 benchmarks/probe_bad_inputs.py --exec     # each case in a fresh `python -m jtok`
    python3 benchmarks/probe_bad_inputs.py --only 'resume/*' --keep

Everything is built in a temporary directory: a tiny prepared dataset (`jtok data prepare`
on a generated ~300 KB text, --vocab-size 300), a second one with another fingerprint, and a
tiny trained run (`jtok train --preset tiny ... steps=4 save_every=2`). Then each case runs
one `jtok` command line and is judged:

- expect "fail" (a bad input or a fault): handled well when the exit status is non-zero,
  stderr is exactly one line that starts with `jtok` and holds no `Traceback`, no case
  times out, and every protected file (the data directories, the run directories'
  config.json / run.json / metrics.jsonl / checkpoints, the case's own targets) has the same
  sha256 afterwards, with no file added or removed (a `.jtok.lock` file is ignored).
  An exit status other than 2 is noted (2 is the CLI's status for a user mistake).
- expect "ok" (unicode and spaces in paths, a torn last line of metrics.jsonl on resume, a
  torn last line of results.jsonl for fit, ...): handled well when the exit status is 0,
  stderr holds no `Traceback`, the shared fixtures are unchanged and the case's own check
  of its outputs passes.
- expect "either" (an input jtok may reasonably accept or refuse): handled well when it
  succeeds or refuses in one line, without a traceback, and its protected files survive.

How a case runs. By default the probe imports jtok (and torch) once, then forks one child
per case that runs `jtok.cli.main(argv)` exactly as the `jtok` console script does (stdout
and stderr to files, stdin from /dev/null, its own working directory; an uncaught
exception prints the interpreter's traceback and exits 1, as an uncaught exception would),
so that some 250 cases fit in about three minutes on two loaded CPU cores. `--exec` runs
each case as a separate `python -m jtok` process instead (slower: torch is imported every
time); the two modes should give the same verdicts. The fixtures are always built with
real `python -m jtok` processes.

Every child runs with OMP_NUM_THREADS=1, JTOK_CACHE pointing into the temporary directory
(nothing touches the user's cache), an address-space limit (so a size check that fails to
refuse an impossible model cannot take the machine's memory) and a per-case timeout (a
case that hangs is killed, with its process group, and counted as not handled).

Standard library + the installed jtok only. The probe changes nothing outside its
temporary directory.
"""

from __future__ import annotations

import argparse
import atexit
import fnmatch
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONIOENCODING": "utf-8",
}
DROP_ENV = ("JTOK_NO_MEMORY_CHECK", "WORLD_SIZE", "RANK", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES")
HUGE = ["--set", "d_model=65536", "--set", "n_layers=512"]  # terabytes of parameters
UNICODE_DIR = "dätä ü 文本 dir"  # unicode and spaces: must work
LOCK_NAME = ".jtok.lock"


# ---- small helpers ------------------------------------------------------------------------


def write(path: Path, content: bytes | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def generated_text(n_bytes: int, seed: int) -> str:
    """Deterministic English-like text in paragraphs (documents), about n_bytes long."""
    rng = random.Random(seed)
    words = ("the of and to in is was that for on with as by at from his her they which "
             "king queen lord night day love death sword crown heart blood time world "
             "speak come go know think make give take see hear stand fall rise keep "
             "gentle noble sweet fair dark cold true false good ill great little old "
             "young ROMEO JULIET HAMLET MACBETH what where when why how thou thee thy "
             "hath doth shall will must may would could should not never ever").split()
    out, size = [], 0
    while size < n_bytes:
        para = []
        for _ in range(rng.randint(2, 8)):
            sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
            para.append(sentence[0].upper() + sentence[1:] + rng.choice(".!?"))
        text = " ".join(para)
        out.append(text)
        size += len(text) + 2
    return "\n\n".join(out) + "\n"


def patch_json(path: Path, fn: Callable[[dict], None]) -> None:
    data = json.loads(Path(path).read_text())
    fn(data)
    Path(path).write_text(json.dumps(data, indent=2))


def truncate(path: Path, keep: int | float) -> None:
    raw = Path(path).read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else keep
    Path(path).write_bytes(raw[:n])


def nan_safetensors(path: Path) -> None:
    """Overwrite every floating-point tensor of a safetensors file with NaN (stdlib only)."""
    raw = bytearray(Path(path).read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    patterns = {"F32": struct.pack("<f", float("nan")), "F64": struct.pack("<d", float("nan")),
                "F16": b"\x00\x7e", "BF16": b"\xc0\x7f"}
    for name, info in header.items():
        if name == "__metadata__" or info.get("dtype") not in patterns:
            continue
        start, end = info["data_offsets"]
        pat = patterns[info["dtype"]]
        raw[base + start:base + end] = pat * ((end - start) // len(pat))
    Path(path).write_bytes(bytes(raw))


def checkpoints(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir())


def latest(run: Path) -> Path:
    return checkpoints(run)[-1]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(LOCK_NAME))
    return dst


_hash_cache: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _hash_cache:
        _hash_cache[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _hash_cache[key]


def snapshot(paths: list[Path]) -> dict[str, str | None]:
    """path -> sha256 (files), "dir" (folders), None (absent); lock files ignored."""
    snap: dict[str, str | None] = {}
    for root in paths:
        root = Path(root)
        if not root.exists():
            snap[str(root)] = None
        elif root.is_file():
            snap[str(root)] = file_digest(root)
        else:
            snap[str(root) + "/"] = "dir"
            for p in sorted(root.rglob("*")):
                if p.name == LOCK_NAME:
                    continue
                if p.is_symlink() or p.is_file():
                    snap[str(p)] = file_digest(p) if p.is_file() else "link"
                elif p.is_dir():
                    snap[str(p) + "/"] = "dir"
    return snap


def diff(before: dict, after: dict, top: Path) -> list[str]:
    out = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        rel = os.path.relpath(key, top) if key.startswith(str(top)) else key
        if a is None:
            out.append(f"added {rel}")
        elif b is None:
            out.append(f"removed {rel}")
        else:
            out.append(f"modified {rel}")
    return out


# ---- running one command line -------------------------------------------------------------


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool


def _memory_limit() -> int:
    try:
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        vm = 4 << 30
    return vm + (10 << 30)  # the interpreter as it is + 10 GiB


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    env.update(CHILD_ENV)
    return env


class Runner:
    def __init__(self, tmp: Path, use_exec: bool):
        self.use_exec = use_exec
        self.tmp = tmp
        self.env = _child_env()
        self.env["JTOK_CACHE"] = str(tmp / "jtok-cache")
        self.counter = 0
        self.main = None
        if not use_exec:
            self._preload()
        self.mem_limit = _memory_limit()

    def _preload(self) -> None:
        """Import jtok and every submodule (torch, tokenizers, yaml, ...) once, in this
        process, so each forked case starts warm. Nothing runs: imports only."""
        os.environ.update(CHILD_ENV)
        os.environ["JTOK_CACHE"] = self.env["JTOK_CACHE"]
        import importlib
        import pkgutil

        import jtok
        import jtok.cli

        for mod in pkgutil.walk_packages(jtok.__path__, "jtok."):
            if mod.name.endswith("__main__"):
                continue
            try:
                importlib.import_module(mod.name)
            except Exception:  # noqa: BLE001 - an optional module that does not import
                pass
        self.main = jtok.cli.main

    def run(self, argv: list[str], cwd: Path, timeout: float) -> Result:
        self.counter += 1
        out_path = self.tmp / "io" / f"{self.counter:04d}.out"
        err_path = self.tmp / "io" / f"{self.counter:04d}.err"
        out_path.parent.mkdir(exist_ok=True)
        t0 = time.monotonic()
        if self.use_exec:
            rc, timed_out = self._run_exec(argv, cwd, timeout, out_path, err_path)
        else:
            rc, timed_out = self._run_fork(argv, cwd, timeout, out_path, err_path)
        seconds = time.monotonic() - t0
        read = lambda p: p.read_bytes().decode("utf-8", "replace")  # noqa: E731
        return Result(rc, read(out_path), read(err_path), seconds, timed_out)

    def _limit(self) -> None:
        try:
            resource.setrlimit(resource.RLIMIT_AS, (self.mem_limit, self.mem_limit))
        except (ValueError, OSError):
            pass

    def _run_exec(self, argv, cwd, timeout, out_path, err_path):
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "jtok", *argv], cwd=cwd,
                                    env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True,
                                    preexec_fn=self._limit)  # fmt: skip
            try:
                return proc.wait(timeout=timeout), False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return proc.returncode, True

    def _run_fork(self, argv, cwd, timeout, out_path, err_path):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: become `jtok ARGV`
            code = 70
            try:
                os.setpgid(0, 0)
                fd = os.open(os.devnull, os.O_RDONLY)
                os.dup2(fd, 0)
                fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 2)
                os.chdir(cwd)
                os.environ.clear()
                os.environ.update(self.env)
                self._limit()
                # Fresh string objects, as the interpreter makes them from the real argv:
                # argparse compares a value with its default by identity (a literal "val"
                # here would be the very object of a default "val").
                argv = [os.fsdecode(os.fsencode(a)) for a in argv]
                sys.argv = ["jtok", *argv]
                code = self._as_console_script(argv)
            finally:
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid:
                return os.waitstatus_to_exitcode(status), False
            if time.monotonic() > deadline:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _, status = os.waitpid(pid, 0)
                return os.waitstatus_to_exitcode(status), True
            time.sleep(0.005)

    def _as_console_script(self, argv: list[str]) -> int:
        """`sys.exit(jtok.cli.main())` with the interpreter's handling of what escapes it."""
        try:
            code = self.main(argv)
        except SystemExit as done:
            code = done.code
        except BaseException:  # noqa: BLE001 - what the interpreter would print
            traceback.print_exc()
            code = 1
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        try:
            atexit._run_exitfuncs()
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        try:
            sys.stdout.flush()
        except BaseException:  # noqa: BLE001 - the interpreter: "Exception ignored ..." + 120
            traceback.print_exc()
            code = 120
        try:
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            pass
        return code & 0xFF


# ---- the cases ----------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    category: str
    argv: Callable[[Path], list[str]]
    expect: str = "fail"  # "fail", "ok", or "either" (a one-line refusal or a success)
    setup: Callable[[Path], None] | None = None
    protect: Callable[[Path], list[Path]] | None = None
    check: Callable[[Path, Result], str | None] | None = None
    timeout: float = 90.0
    fresh: Callable[[Path], list[Path]] | None = None  # outputs a failure should not leave
    cwd: Callable[[Path], Path] | None = None


@dataclass
class Outcome:
    case: Case
    command: str
    rc: int
    one_line: bool | None  # None: not asked of an expected success
    unchanged: bool
    good: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stderr: str = ""
    stdout_tail: str = ""
    seconds: float = 0.0


class Fixtures:
    """The shared inputs every case may read (and must not change)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.files = tmp / "files"
        self.corpus = self.files / "corpus.txt"
        self.small = self.files / "small.txt"
        self.other = self.files / "other.txt"
        self.binary = self.files / "binary.bin"
        self.latin1 = self.files / "latin1.txt"
        self.empty = self.files / "empty.txt"
        self.a_dir = self.files / "a_dir"
        self.missing = self.files / "does-not-exist"
        self.D = tmp / "data"
        self.D2 = tmp / "data2"
        self.R = tmp / "run"
        self.NANRUN = tmp / "nanrun"
        self.FD = tmp / "fitdir"
        self.cfg = tmp / "configs"

    def shared(self) -> list[Path]:
        return [self.D, self.D2, self.R, self.NANRUN, self.FD, self.files, self.cfg]

    def build(self, log) -> None:
        t0 = time.monotonic()
        write(self.corpus, generated_text(300_000, seed=1))
        write(self.small, generated_text(30_000, seed=2))
        write(self.other, generated_text(60_000, seed=3))
        write(self.binary, b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 64)
        write(self.latin1, ("Caf\xe9 na\xefve r\xe9sum\xe9, \xe0 la carte.\n" * 800)
              .encode("latin-1"))  # fmt: skip
        write(self.empty, b"")
        self.a_dir.mkdir(parents=True)
        write(self.a_dir / "notes.txt", "a folder, not a file\n")
        self._config_files()
        jt = [sys.executable, "-m", "jtok"]
        env = _child_env()
        env["JTOK_CACHE"] = str(self.tmp / "jtok-cache")

        def sh(*argv: str) -> None:
            done = subprocess.run([*jt, *argv], cwd=self.tmp, env=env, capture_output=True,
                                  text=True, timeout=600)  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"fixture failed: jtok {' '.join(argv)}\n{done.stderr}")

        sh("data", "prepare", str(self.corpus), "--out", str(self.D), "--vocab-size", "300",
           "--no-progress")
        sh("data", "prepare", str(self.other), "--out", str(self.D2), "--vocab-size", "300",
           "--no-progress")  # its own tokenizer: another fingerprint and tokenization
        sh("train", "--preset", "tiny", "--data", str(self.D), "--set", "seq_len=32", "--set",
           "steps=4", "--set", "save_every=2", "--set", "eval_every=2", "--set",
           "batch_size=4", "--out", str(self.R), "--no-progress")
        copy_tree(self.R, self.NANRUN)
        for ckpt in checkpoints(self.NANRUN):
            nan_safetensors(ckpt / "model.safetensors")
        self._fit_dir()
        log(f"fixtures built in {time.monotonic() - t0:.1f}s under {self.tmp}")

    def _config_files(self) -> None:
        c = self.cfg
        write(c / "binary.yaml", b"\x00\x01PK\x03\x04" + bytes(range(256)))
        write(c / "latin1.yaml", "d_model: 64\n# caf\xe9 r\xe9sum\xe9\n".encode("latin-1"))
        write(c / "invalid.yaml", "d_model: 64\n  n_layers: [2, 3\nn_heads: 4\n")
        write(c / "list.yaml", "- d_model\n- 64\n")
        write(c / "scalar.yaml", "64\n")
        write(c / "empty.yaml", "")
        write(c / "unknown.yaml", "d_model: 64\nn_layers: 2\nn_heads: 4\nn_kv_heads: 2\n"
              "ffn_hidden: 192\ndmodel_typo: 96\n")  # fmt: skip
        write(c / "wrongtype.yaml", "d_model: sixty-four\n")
        write(c / "bool.yaml", "d_model: true\n")
        write(c / "float_int.yaml", "d_model: 64.5\n")
        write(c / "nan.yaml", "init_std: .nan\n")
        write(c / "inf.yaml", "rope_base: .inf\n")
        write(c / "json_nan.json", '{"vocab_size": 300, "norm_eps": NaN}')
        write(c / "negative.yaml", "n_layers: -2\n")
        write(c / "tokmod_str.yaml", "tokmod: jtokm\n")
        write(c / "deep.yaml", "[" * 20000 + "]" * 20000)
        write(c / "run_train_list.yaml", "model: {d_model: 64, n_heads: 4, n_kv_heads: 2}\n"
              "train: [1, 2]\n")  # fmt: skip
        write(c / "run_lr_str.yaml", "model: {vocab_size: 300, d_model: 64, n_heads: 4, "
              "n_kv_heads: 2}\ntrain: {lr: fast}\n")  # fmt: skip
        write(c / "run_lr_nan.yaml", "model: {vocab_size: 300, d_model: 64, n_heads: 4, "
              "n_kv_heads: 2}\ntrain: {lr: .nan}\n")  # fmt: skip
        write(c / "run_unknown_section.yaml", "model: {d_model: 64}\noptim: {lr: 1.0}\n")
        write(c / "heads.yaml", "d_model: 64\nn_heads: 3\n")
        write(c / UNICODE_DIR / "my cfg ü.yaml", "vocab_size: 300\nd_model: 64\nn_layers: 2\n"
              "n_heads: 4\nn_kv_heads: 2\nffn_hidden: 192\nmax_seq_len: 128\n")  # fmt: skip

    def _fit_dir(self) -> None:
        """A synthetic, valid results.jsonl (2 variants x 4 sizes x 2 FLOP budgets)."""
        records = []
        for variant in ("baseline", "jtokm"):
            for d, layers in ((64, 2), (96, 3), (128, 4), (160, 5)):
                n_c = 12 * d * d * layers
                n_n = 0 if variant == "baseline" else 5 * 300 * d * layers
                for budget in (1e12, 3e12):
                    tokens = budget / (6 * n_c)
                    loss = 1.5 + 400 / n_c**0.3 + 300 / tokens**0.3
                    loss -= 0.03 if variant == "jtokm" else 0.0
                    records.append({
                        "name": f"{variant}__d{d}__C{budget:g}", "variant": variant,
                        "backbone": f"d{d}-L{layers}", "budget": budget, "N_c": n_c,
                        "N_c_total": n_c, "N_n": n_n, "eta": n_n / n_c,
                        "rho": 0.0 if variant == "baseline" else 0.4, "tokens": int(tokens),
                        "flops": budget, "final_val_loss": loss, "best_val_loss": loss,
                        "curve": [[1, int(tokens), loss]], "config": {},
                        "labels": {"variant": variant, "backbone": f"d{d}-L{layers}"},
                    })  # fmt: skip
        self.FD.mkdir()
        write(self.FD / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def build_cases(fx: Fixtures) -> list[Case]:  # noqa: C901 - a long list, on purpose
    cases: list[Case] = []
    D, D2, R, NANRUN, FD, cfg = (str(fx.D), str(fx.D2), str(fx.R), str(fx.NANRUN), fx.FD,
                                 fx.cfg)  # fmt: skip
    small, binary, latin1, empty = str(fx.small), str(fx.binary), str(fx.latin1), str(fx.empty)
    a_dir, missing = str(fx.a_dir), str(fx.missing)
    a_file = small

    def add(name, category, argv, expect="fail", **kw):
        if not callable(argv):
            fixed = list(argv)
            argv = lambda cd, fixed=fixed: fixed  # noqa: E731
        cases.append(Case(name, category, argv, expect, **kw))

    # A fresh output folder inside the case's directory; a train command small enough
    # that a bad input which slips through costs a second, not minutes.
    def tiny_train(out: str, *extra: str) -> list[str]:
        return ["train", "--preset", "tiny", "--data", D, "--set", "seq_len=32", "--set",
                "steps=2", "--set", "batch_size=2", "--set", "eval_every=2", "--set",
                "save_every=2", "--no-progress", "--out", out, *extra]  # fmt: skip

    def run_copy(cd: Path) -> Path:
        return cd / "run"

    def with_run_copy(mutate: Callable[[Path], None] | None = None):
        def setup(cd: Path) -> None:
            copy_tree(fx.R, run_copy(cd))
            if mutate is not None:
                mutate(run_copy(cd))
        return setup

    prot_run = lambda cd: [run_copy(cd)]  # noqa: E731
    fresh_out = lambda cd: [cd / "out"]  # noqa: E731
    BENCH = ["--preset", "tiny", "--batch", "1", "--seq-len", "8", "--steps", "1", "--reps",
             "1", "--warmup", "0", "--variants", "baseline"]  # fmt: skip

    # ---- the command line itself -------------------------------------------------------
    add("cli/no-command", "cli", [])
    add("cli/unknown-command", "cli", ["trian"])
    add("cli/unknown-global-flag", "cli", ["--verbose", "info"])
    add("cli/version-with-value", "cli", ["--version=1"])
    add("cli/data-no-subcommand", "cli", ["data"])
    add("cli/data-unknown-subcommand", "cli", ["data", "split"])
    add("cli/info-unknown-flag", "cli", ["info", "--preset", "tiny", "--verbose"])
    add("cli/info-missing-value", "cli", ["info", "--preset", "tiny", "--seq-len"])
    add("cli/train-missing-out", "cli", ["train", "--preset", "tiny", "--data", D])
    add("cli/subcommand-version", "cli", ["info", "--version"])

    # ---- info --------------------------------------------------------------------------
    add("info/no-model", "set", ["info"])
    add("info/unknown-preset", "set", ["info", "--preset", "huge"])
    add("info/set-unknown-key", "set", ["info", "--preset", "tiny", "--set", "dmodel=96"])
    add("info/set-no-equals", "set", ["info", "--preset", "tiny", "--set", "d_model"])
    add("info/set-empty-key", "set", ["info", "--preset", "tiny", "--set", "=3"])
    add("info/set-not-int", "set", ["info", "--preset", "tiny", "--set", "d_model=abc"])
    add("info/set-float-for-int", "set", ["info", "--preset", "tiny", "--set", "d_model=64.5"])
    add("info/set-negative-d_model", "set", ["info", "--preset", "tiny", "--set",
                                             "d_model=-64"])  # fmt: skip
    add("info/set-zero-layers", "set", ["info", "--preset", "tiny", "--set", "n_layers=0"])
    add("info/set-zero-vocab", "set", ["info", "--preset", "tiny", "--set", "vocab_size=0"])
    add("info/set-nan-init_std", "set", ["info", "--preset", "tiny", "--set", "init_std=nan"])
    add("info/set-inf-rope_base", "set", ["info", "--preset", "tiny", "--set",
                                          "rope_base=inf"])  # fmt: skip
    add("info/set-negative-norm_eps", "set", ["info", "--preset", "tiny", "--set",
                                              "norm_eps=-1"])  # fmt: skip
    add("info/set-heads-not-dividing", "set", ["info", "--preset", "tiny", "--set",
                                               "n_heads=3"])  # fmt: skip
    add("info/set-kv-heads-not-dividing", "set", ["info", "--preset", "tiny", "--set",
                                                  "n_kv_heads=3"])  # fmt: skip
    add("info/set-odd-head-dim", "set", ["info", "--preset", "tiny", "--set", "d_model=60",
                                         "--set", "n_heads=4", "--set", "n_kv_heads=4"])
    add("info/set-tokmod-kind-bogus", "set", ["info", "--preset", "tiny", "--set",
                                              "tokmod.kind=jtokx"])  # fmt: skip
    add("info/set-tokmod-layer-out-of-range", "set", ["info", "--preset", "tiny", "--set",
        "tokmod.kind=jtok", "--set", "tokmod.layers=0,99"])  # fmt: skip
    add("info/set-tokmod-top_k-gt-n_e", "set", ["info", "--preset", "tiny", "--set",
        "tokmod.kind=jtokm", "--set", "tokmod.n_e=2", "--set", "tokmod.top_k=5"])
    add("info/set-moe-negative-experts", "set", ["info", "--preset", "tiny", "--set",
                                                 "moe.num_experts=-1"])  # fmt: skip
    add("info/set-moe-top_k-gt-experts", "set", ["info", "--preset", "tiny", "--set",
        "moe.num_experts=4", "--set", "moe.top_k=8", "--set", "moe.expert_hidden=32"])
    add("info/set-bool-bogus", "set", ["info", "--preset", "tiny", "--set",
                                       "tie_embeddings=maybe"])  # fmt: skip
    add("info/seq-len-zero", "set", ["info", "--preset", "tiny", "--seq-len", "0"])
    add("info/seq-len-negative", "set", ["info", "--preset", "tiny", "--seq-len", "-5"])
    add("info/config-missing", "paths", ["info", "--config", missing + ".yaml"])
    add("info/config-is-dir", "paths", ["info", "--config", a_dir])
    add("info/config-binary", "config", ["info", "--config", str(cfg / "binary.yaml")])
    add("info/config-latin1", "config", ["info", "--config", str(cfg / "latin1.yaml")])
    add("info/config-invalid-yaml", "config", ["info", "--config", str(cfg / "invalid.yaml")])
    add("info/config-list", "config", ["info", "--config", str(cfg / "list.yaml")])
    add("info/config-scalar", "config", ["info", "--config", str(cfg / "scalar.yaml")])
    add("info/config-empty", "config", ["info", "--config", str(cfg / "empty.yaml")])
    add("info/config-unknown-key", "config", ["info", "--config", str(cfg / "unknown.yaml")])
    add("info/config-wrong-type", "config", ["info", "--config", str(cfg / "wrongtype.yaml")])
    add("info/config-bool-for-int", "config", ["info", "--config", str(cfg / "bool.yaml")])
    add("info/config-float-for-int", "config", ["info", "--config",
                                                str(cfg / "float_int.yaml")])  # fmt: skip
    add("info/config-nan", "config", ["info", "--config", str(cfg / "nan.yaml")])
    add("info/config-inf", "config", ["info", "--config", str(cfg / "inf.yaml")])
    add("info/config-json-NaN", "config", ["info", "--config", str(cfg / "json_nan.json")])
    add("info/config-negative", "config", ["info", "--config", str(cfg / "negative.yaml")])
    add("info/config-tokmod-string", "config", ["info", "--config",
                                                str(cfg / "tokmod_str.yaml")])  # fmt: skip
    add("info/config-nested-20000-deep", "config", ["info", "--config", str(cfg / "deep.yaml")])
    add("info/config-inconsistent-heads", "config", ["info", "--config",
                                                     str(cfg / "heads.yaml")])  # fmt: skip
    add("info/config-dev-null", "config", ["info", "--config", "/dev/null"])
    add("info/huge-sizes-are-counted", "sizes", ["info", "--preset", "tiny", *HUGE, "--json"],
        expect="ok", check=lambda cd, r: None if '"backbone_params"' in r.stdout
        else "no JSON with backbone_params on stdout")  # fmt: skip
    add("info/unicode-config-path", "paths", ["info", "--config",
        str(cfg / UNICODE_DIR / "my cfg ü.yaml")], expect="ok")  # fmt: skip

    # ---- config ------------------------------------------------------------------------
    for key, value, label in [
        ("lr", "-1", "negative-lr"), ("lr", "nan", "nan-lr"), ("lr", "inf", "inf-lr"),
        ("steps", "0", "zero-steps"), ("batch_size", "-4", "negative-batch"),
        ("seq_len", "0", "zero-seq_len"), ("seq_len", "1000", "seq_len-over-context"),
        ("grad_accum", "0", "zero-grad_accum"), ("warmup_steps", "-1", "negative-warmup"),
        ("min_lr_ratio", "2", "min_lr_ratio-2"), ("beta1", "1.5", "beta1-1.5"),
        ("schedule", "linear-ish", "unknown-schedule"), ("device", "tpu", "unknown-device"),
        ("precision", "fp8", "unknown-precision"), ("compile", "maybe", "bool-maybe"),
        ("weight_decay", "nan", "nan-weight_decay"), ("grad_clip", "-1", "negative-grad_clip"),
        ("train.bogus", "1", "unknown-train-key"), ("lr_mult", "30", "unknown-bare-key"),
        ("model.tokmod.bogus", "1", "unknown-tokmod-key"),
    ]:
        add(f"config/set-{label}", "set", ["config", "--preset", "tiny", "--set",
                                           f"{key}={value}"])  # fmt: skip
    add("config/run-config-train-list", "config", ["config", "--config",
        str(cfg / "run_train_list.yaml")])  # fmt: skip
    add("config/run-config-lr-string", "config", ["config", "--config",
        str(cfg / "run_lr_str.yaml")])  # fmt: skip
    add("config/run-config-lr-nan", "config", ["config", "--config",
        str(cfg / "run_lr_nan.yaml")])  # fmt: skip
    add("config/run-config-unknown-section", "config", ["config", "--config",
        str(cfg / "run_unknown_section.yaml")])  # fmt: skip
    add("config/binary", "config", ["config", "--config", str(cfg / "binary.yaml")])
    add("config/unicode-config-path", "paths", ["config", "--config",
        str(cfg / UNICODE_DIR / "my cfg ü.yaml"), "--json"], expect="ok")  # fmt: skip

    # ---- bench -------------------------------------------------------------------------
    add("bench/reps-0", "bench", ["bench", *BENCH, "--reps", "0"])
    add("bench/reps-negative", "bench", ["bench", *BENCH, "--reps", "-1"])
    add("bench/steps-0", "bench", ["bench", *BENCH, "--steps", "0"])
    add("bench/batch-0", "bench", ["bench", *BENCH, "--batch", "0"])
    add("bench/warmup-negative", "bench", ["bench", *BENCH, "--warmup", "-1"])
    add("bench/placements-bogus", "bench", ["bench", *BENCH, "--placements", "gpu"])
    add("bench/placements-host-with-adamw", "bench", ["bench", *BENCH, "--placements", "host",
                                                      "--optimizer", "adamw"])  # fmt: skip
    DECODE = ["bench", "decode", "--preset", "tiny", "--reps", "1", "--new-tokens", "2",
              "--prompt-len", "4"]  # fmt: skip
    add("bench/decode-batches-0", "bench", [*DECODE, "--batches", "0"])
    add("bench/decode-batches-words", "bench", [*DECODE, "--batches", "one,two"])
    add("bench/decode-too-long", "bench", [*DECODE, "--new-tokens", "100000"])
    add("bench/decode-with-train-option", "bench", [*DECODE, "--steps", "3"])
    add("bench/train-with-decode-option", "bench", ["bench", *BENCH, "--batches", "1"])
    add("bench/threads-0", "bench", ["bench", *BENCH, "--threads", "0"])
    add("bench/threads-over-cpus", "bench", ["bench", *BENCH, "--threads", "100000"])
    add("bench/seq-len-over-context", "bench", ["bench", *BENCH, "--seq-len", "100000"])
    add("bench/device-bogus", "bench", ["bench", *BENCH, "--device", "tpu"])
    import torch

    if not torch.cuda.is_available():  # where CUDA is, these run on it
        add("bench/device-cuda-without-cuda", "bench", ["bench", *BENCH, "--device", "cuda"])
        add("bench/decode-device-cuda-without-cuda", "bench", [*DECODE, "--device", "cuda"])
    add("bench/variants-bogus", "bench", ["bench", *BENCH, "--variants", "bogus"])
    add("bench/variants-empty", "bench", ["bench", *BENCH, "--variants", ""])
    add("bench/variants-commas", "bench", ["bench", *BENCH, "--variants", ",,"])
    add("bench/optimizer-sgd", "bench", ["bench", *BENCH, "--optimizer", "sgd"])
    add("bench/out-is-dir", "bench", ["bench", *BENCH, "--out", a_dir])
    add("bench/out-missing-parent", "paths", ["bench", *BENCH, "--out",
                                              missing + "/result.json"])  # fmt: skip
    add("bench/out-parent-is-file", "paths", ["bench", *BENCH, "--out", a_file + "/r.json"])
    add("bench/out-proc", "paths", ["bench", *BENCH, "--out", "/proc/jtok_probe.json"])
    add("bench/out-sys", "paths", ["bench", *BENCH, "--out", "/sys/jtok_probe.json"])
    add("bench/config-binary", "config", ["bench", *BENCH[2:], "--config",
                                          str(cfg / "binary.yaml")])  # fmt: skip
    add("bench/set-nan", "set", ["bench", *BENCH, "--set", "init_std=nan"])
    add("bench/impossible-size", "sizes", ["bench", *BENCH, *HUGE], timeout=60)
    add("bench/impossible-activations", "sizes", ["bench", *BENCH, "--batch", "10000000",
                                                  "--seq-len", "128"], timeout=60)  # fmt: skip
    add("bench/impossible-moe", "sizes", ["bench", *BENCH, "--set", "moe.num_experts=100000",
        "--set", "moe.expert_hidden=8192", "--set", "moe.top_k=2"], timeout=60)  # fmt: skip
    add("bench/unicode-out-path", "paths",
        lambda cd: ["bench", *BENCH, "--json", "--out", str(cd / UNICODE_DIR / "rés ü.json")],
        expect="ok", setup=lambda cd: (cd / UNICODE_DIR).mkdir(parents=True),
        check=lambda cd, r: None if (cd / UNICODE_DIR / "rés ü.json").is_file()
        else "the --out file was not written")  # fmt: skip

    # ---- data prepare ------------------------------------------------------------------
    def prep(*args: str, out: Callable[[Path], str] | None = None):
        out = out or (lambda cd: str(cd / "out"))
        # A given tokenizer sets the vocabulary (--vocab-size beside it is refused).
        size = [] if "--tokenizer" in args else ["--vocab-size", "300"]
        return lambda cd: ["data", "prepare", *args, "--out", out(cd), *size, "--no-progress"]

    add("data/input-missing", "paths", prep(missing + ".txt"), fresh=fresh_out)
    add("data/input-glob-matches-nothing", "paths", prep(str(fx.files / "nomatch*.txt")),
        fresh=fresh_out)
    add("data/input-is-dir", "paths", prep(a_dir), fresh=fresh_out)
    add("data/input-binary", "data", prep(binary), fresh=fresh_out)
    add("data/input-latin1-no-encoding", "data", prep(latin1), fresh=fresh_out)
    add("data/input-empty", "data", prep(empty), fresh=fresh_out)
    add("data/encoding-bogus", "data", prep(small, "--encoding", "utf-9"), fresh=fresh_out)
    add("data/errors-bogus", "data", prep(small, "--errors", "ignore"), fresh=fresh_out)
    add("data/val-and-val-fraction", "data", prep(small, "--val", str(fx.other),
                                                  "--val-fraction", "0.1"), fresh=fresh_out)
    add("data/val-same-as-input", "data", prep(small, "--val", small), fresh=fresh_out)
    add("data/val-missing", "paths", prep(small, "--val", missing), fresh=fresh_out)
    add("data/val-fraction-1.5", "data", prep(small, "--val-fraction", "1.5"), fresh=fresh_out)
    add("data/val-fraction-nan", "data", prep(small, "--val-fraction", "nan"), fresh=fresh_out)
    add("data/val-fraction-negative", "data", prep(small, "--val-fraction", "-0.1"),
        fresh=fresh_out)
    add("data/vocab-size-0", "data", lambda cd: prep(small)(cd) + ["--vocab-size", "0"],
        fresh=fresh_out)
    add("data/vocab-size-100", "data", lambda cd: prep(small)(cd) + ["--vocab-size", "100"],
        fresh=fresh_out)
    add("data/vocab-size-abc", "data", lambda cd: prep(small)(cd) + ["--vocab-size", "abc"],
        fresh=fresh_out)
    add("data/vocab-size-over-uint32", "data",
        lambda cd: prep(small)(cd) + ["--vocab-size", str(2**33)], fresh=fresh_out)
    add("data/tokenizer-missing", "paths", prep(small, "--tokenizer", missing + ".json"),
        fresh=fresh_out)
    add("data/tokenizer-binary", "data", prep(small, "--tokenizer", binary), fresh=fresh_out)
    add("data/tokenizer-not-a-tokenizer", "data", prep(small, "--tokenizer",
        str(fx.R / "config.json")), fresh=fresh_out)  # fmt: skip
    add("data/jsonl-corrupt-line", "data", lambda cd: prep(str(cd / "in.jsonl"))(cd),
        fresh=fresh_out,
        setup=lambda cd: write(cd / "in.jsonl", '{"text": "hello there"}\n{"text": oops\n'
                               '{"text": "bye"}\n'))  # fmt: skip
    add("data/jsonl-field-missing", "data", lambda cd: prep(str(cd / "in.jsonl"), "--field",
        "body")(cd), fresh=fresh_out, setup=lambda cd: write(cd / "in.jsonl",
        "".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(50))))
    add("data/out-is-file", "paths", prep(small, out=lambda cd: a_file))
    add("data/out-parent-is-file", "paths", prep(small, out=lambda cd: a_file + "/sub"))
    add("data/out-proc", "paths", prep(small, out=lambda cd: "/proc/jtok_probe_data"))
    add("data/out-sys", "paths", prep(small, out=lambda cd: "/sys/jtok_probe_data"))
    add("data/out-existing-no-overwrite", "data", prep(small, out=lambda cd: D))
    add("data/overwrite-binary-input-keeps-old", "data",
        lambda cd: prep(binary, "--overwrite", out=lambda c: str(c / "data"))(cd),
        setup=lambda cd: copy_tree(fx.D, cd / "data"), protect=lambda cd: [cd / "data"])
    add("data/overwrite-missing-input-keeps-old", "data",
        lambda cd: prep(missing + ".txt", "--overwrite", out=lambda c: str(c / "data"))(cd),
        setup=lambda cd: copy_tree(fx.D, cd / "data"), protect=lambda cd: [cd / "data"])
    add("data/overwrite-latin1-input-keeps-old", "data",
        lambda cd: prep(latin1, "--overwrite", out=lambda c: str(c / "data"))(cd),
        setup=lambda cd: copy_tree(fx.D, cd / "data"), protect=lambda cd: [cd / "data"])
    add("data/overwrite-bad-vocab-keeps-old", "data",
        lambda cd: prep(small, "--overwrite", out=lambda c: str(c / "data"))(cd)
        + ["--vocab-size", "10"],
        setup=lambda cd: copy_tree(fx.D, cd / "data"), protect=lambda cd: [cd / "data"])
    add("data/overwrite-a-run-dir", "data", prep(small, "--overwrite", out=lambda cd: R))
    add("data/overwrite-folder-with-user-files", "data",
        lambda cd: prep(small, "--overwrite", out=lambda c: str(c / "mine"))(cd),
        setup=lambda cd: write(cd / "mine" / "thesis.tex", "precious\n"),
        protect=lambda cd: [cd / "mine"])
    add("data/unicode-space-paths", "paths",
        lambda cd: ["data", "prepare", str(cd / UNICODE_DIR / "my corpus ü.txt"), "--out",
                    str(cd / UNICODE_DIR / "out dätä"), "--vocab-size", "300",
                    "--no-progress"], expect="ok",
        setup=lambda cd: write(cd / UNICODE_DIR / "my corpus ü.txt", fx.small.read_text()),
        check=lambda cd, r: None if (cd / UNICODE_DIR / "out dätä" / "manifest.json").is_file()
        else "no manifest.json written")  # fmt: skip
    add("data/latin1-with-encoding", "data", lambda cd: prep(latin1, "--encoding",
        "latin-1")(cd), expect="ok",
        check=lambda cd, r: None if (cd / "out" / "manifest.json").is_file()
        else "no manifest.json written")  # fmt: skip

    # ---- data corpus -------------------------------------------------------------------
    add("corpus/unknown-name", "cli", ["data", "corpus", "docs-fr", "--out", missing])
    add("corpus/no-out", "cli", ["data", "corpus", "docs-en"])
    add("corpus/out-is-file", "paths", ["data", "corpus", "docs-en", "--out", a_file])
    add("corpus/out-parent-is-file", "paths", ["data", "corpus", "docs-en", "--out",
                                               a_file + "/sub"])  # fmt: skip
    add("corpus/out-proc", "paths", ["data", "corpus", "docs-en", "--out",
                                     "/proc/jtok_probe_corpus"])  # fmt: skip
    add("corpus/out-sys", "paths", ["data", "corpus", "docs-en", "--out",
                                    "/sys/jtok_probe_corpus"])  # fmt: skip
    add("corpus/half-built-target", "paths", lambda cd: ["data", "corpus", "docs-en", "--out",
        str(cd / "c")], setup=lambda cd: write(cd / "c" / "docs-en" / "train.txt", "partial\n"),
        protect=lambda cd: [cd / "c"])  # fmt: skip

    # ---- train -------------------------------------------------------------------------
    def train_case(name, category, *extra, **kw):
        kw.setdefault("fresh", fresh_out)
        add(name, category, lambda cd: tiny_train(str(cd / "out"), *extra), **kw)

    add("train/no-data", "paths", lambda cd: ["train", "--preset", "tiny", "--out",
        str(cd / "out"), "--set", "steps=2", "--no-progress"], fresh=fresh_out)  # fmt: skip
    add("train/data-missing", "paths",
        lambda cd: [a if a != D else missing for a in tiny_train(str(cd / "out"))],
        fresh=fresh_out)
    add("train/data-is-file", "paths",
        lambda cd: [a if a != D else a_file for a in tiny_train(str(cd / "out"))],
        fresh=fresh_out)
    add("train/data-not-prepared", "paths",
        lambda cd: [a if a != D else a_dir for a in tiny_train(str(cd / "out"))],
        fresh=fresh_out)
    add("train/data-truncated-train-bin", "data",
        lambda cd: [a if a != D else str(cd / "d") for a in tiny_train(str(cd / "out"))],
        setup=lambda cd: (copy_tree(fx.D, cd / "d"), truncate(cd / "d" / "train.bin", 0.5)),
        protect=lambda cd: [cd / "d"], fresh=fresh_out)
    add("train/data-manifest-garbage", "data",
        lambda cd: [a if a != D else str(cd / "d") for a in tiny_train(str(cd / "out"))],
        setup=lambda cd: (copy_tree(fx.D, cd / "d"), write(cd / "d" / "manifest.json",
                                                            b"\x00\xffnot json")),
        protect=lambda cd: [cd / "d"], fresh=fresh_out)
    add("train/out-is-file", "paths", tiny_train(a_file))
    add("train/out-parent-is-file", "paths", tiny_train(a_file + "/run"))
    add("train/out-proc", "paths", tiny_train("/proc/jtok_probe_run"))
    add("train/out-sys", "paths", tiny_train("/sys/jtok_probe_run"))
    add("train/out-existing-run-no-flag", "paths", tiny_train(R))
    add("train/out-is-data-dir", "paths", tiny_train(D))
    for label, file in [("missing", missing + ".yaml"), ("dir", a_dir),
                        ("binary", str(cfg / "binary.yaml")),
                        ("latin1", str(cfg / "latin1.yaml")),
                        ("invalid-yaml", str(cfg / "invalid.yaml")),
                        ("list", str(cfg / "list.yaml")),
                        ("unknown-key", str(cfg / "unknown.yaml")),
                        ("wrong-type", str(cfg / "wrongtype.yaml")),
                        ("nan", str(cfg / "nan.yaml")), ("inf", str(cfg / "inf.yaml")),
                        ("run-lr-nan", str(cfg / "run_lr_nan.yaml")),
                        ("run-lr-string", str(cfg / "run_lr_str.yaml"))]:
        add(f"train/config-{label}", "paths" if label in ("missing", "dir") else "config",
            lambda cd, file=file: ["train", "--config", file, "--data", D, "--out",
                                   str(cd / "out"), "--set", "steps=2", "--no-progress"],
            fresh=fresh_out)  # fmt: skip
    for label, sets in [
        ("unknown-key", ["dmodel=96"]), ("bad-value", ["batch_size=four"]),
        ("lr-nan", ["lr=nan"]), ("lr-inf", ["lr=inf"]), ("lr-negative", ["lr=-0.001"]),
        ("steps-negative", ["steps=-1"]), ("batch-zero", ["batch_size=0"]),
        ("seq_len-zero", ["seq_len=0"]), ("seq_len-negative", ["seq_len=-32"]),
        ("seq_len-over-context", ["seq_len=4096"]), ("d_model-negative", ["d_model=-64"]),
        ("heads-not-dividing", ["n_heads=3"]), ("kv-heads-not-dividing", ["n_kv_heads=3"]),
        ("vocab-smaller-than-data", ["vocab_size=100"]), ("tokmod-n_e-zero",
        ["tokmod.kind=jtokm", "tokmod.n_e=0"]), ("precision-fp8", ["precision=fp8"]),
        ("compile-maybe", ["compile=maybe"]), ("eval_every-negative", ["eval_every=-1"]),
        ("keep_checkpoints-negative", ["keep_checkpoints=-1"]),
    ]:
        train_case(f"train/set-{label}", "set", *[x for s in sets for x in ("--set", s)])
    add("train/set-data-empty-string", "set", lambda cd: [a for a in tiny_train(
        str(cd / "out"), "--set", "data=") if a not in ("--data", D)], fresh=fresh_out)
    train_case("train/impossible-size", "sizes", *HUGE, timeout=60)
    train_case("train/impossible-layers", "sizes", "--set", "n_layers=1000000", timeout=60)
    train_case("train/impossible-batch", "sizes", "--set", "batch_size=100000000",
               "--set", "seq_len=128", timeout=60)  # fmt: skip
    train_case("train/impossible-moe", "sizes", "--set", "moe.num_experts=100000", "--set",
               "moe.expert_hidden=8192", "--set", "moe.top_k=2", timeout=60)  # fmt: skip
    train_case("train/device-cuda", "device", "--set", "device=cuda")
    train_case("train/device-cuda-1", "device", "--set", "device=cuda:1")
    train_case("train/device-mps", "device", "--set", "device=mps")
    train_case("train/precision-bf16-on-cpu-nonsense", "device", "--set", "precision=fp16")
    train_case("train/allow-change-without-resume", "resume", "--allow-change", "lr")
    # A retrofit start (jtok.hf.retrofit_run) from what is not a Hugging Face directory.
    for label, hf_dir in (("missing", missing), ("is-file", a_file), ("not-hf", a_dir)):
        add(f"train/init-from-hf-{label}", "paths", lambda cd, hf_dir=hf_dir: [
            "train", "--init-from-hf", hf_dir, "--data", D, "--set", "tokmod.kind=jtokm",
            "--out", str(cd / "out"), "--no-progress"], fresh=fresh_out)  # fmt: skip
    train_case("train/freeze-backbone-native", "config", "--set", "freeze_backbone=true")
    add("train/resume-with-preset", "resume", lambda cd: ["train", "--preset", "tiny", "--out",
        str(run_copy(cd)), "--resume", "--no-progress"], setup=with_run_copy(),
        protect=prot_run)  # fmt: skip
    add("train/resume-and-overwrite", "resume", lambda cd: ["train", "--out", str(run_copy(cd)),
        "--resume", "--overwrite", "--no-progress"], setup=with_run_copy(),
        protect=prot_run)  # fmt: skip
    add("train/unicode-space-out", "paths", lambda cd: tiny_train(str(cd / UNICODE_DIR /
        "my run ü")), expect="ok", check=lambda cd, r: None if (cd / UNICODE_DIR / "my run ü" /
        "config.json").is_file() else "no config.json in the run directory")  # fmt: skip

    # ---- train --resume ----------------------------------------------------------------
    def resume_case(name, *extra, mutate=None, category="resume", **kw):
        kw.setdefault("protect", prot_run)
        add(name, category, lambda cd: ["train", "--out", str(run_copy(cd)), "--resume",
                                        "--no-progress", *extra],
            setup=with_run_copy(mutate), **kw)  # fmt: skip

    def state(fn):
        return lambda run: patch_json(latest(run) / "state.json", fn)

    add("resume/missing-dir", "resume", ["train", "--out", missing, "--resume"])
    add("resume/empty-dir", "resume", lambda cd: ["train", "--out", str(cd / "empty"),
        "--resume", "--no-progress"], setup=lambda cd: (cd / "empty").mkdir(),
        protect=lambda cd: [cd / "empty"])  # fmt: skip
    add("resume/out-is-file", "resume", ["train", "--out", a_file, "--resume"])
    add("resume/data-dir-as-run", "resume", ["train", "--out", D, "--resume"])
    resume_case("resume/change-d_model", "--set", "d_model=128", "--set", "steps=6")
    resume_case("resume/change-d_model-allowed", "--set", "d_model=128", "--set", "steps=6",
                "--allow-change", "d_model")  # fmt: skip
    resume_case("resume/change-lr-without-allow", "--set", "lr=1e-3")
    resume_case("resume/change-seed-without-allow", "--set", "seed=7", "--set", "steps=6")
    resume_case("resume/allow-change-unchanged-key", "--allow-change", "lr", "--set",
                "steps=6")  # fmt: skip
    resume_case("resume/allow-change-unknown-key", "--allow-change", "bogus.key", "--set",
                "steps=6")  # fmt: skip
    resume_case("resume/steps-before-checkpoint", "--set", "steps=1")
    resume_case("resume/set-lr-nan", "--set", "lr=nan", "--allow-change", "lr")
    resume_case("resume/set-unknown-key", "--set", "dmodel=96")
    resume_case("resume/data-missing", "--data", missing, "--set", "steps=6")
    resume_case("resume/data-other-fingerprint", "--data", D2, "--set", "steps=6")
    resume_case("resume/device-cuda", "--set", "device=cuda", "--set", "steps=6",
                category="device")  # fmt: skip
    resume_case("resume/impossible-size-allowed", *HUGE, "--allow-change", "d_model",
                "--allow-change", "n_layers", "--set", "steps=6", category="sizes",
                timeout=60)  # fmt: skip
    resume_case("resume/truncated-optimizer", "--set", "steps=6",
                mutate=lambda run: truncate(latest(run) / "optimizer.safetensors", 0.5))
    resume_case("resume/optimizer-missing", "--set", "steps=6",
                mutate=lambda run: (latest(run) / "optimizer.safetensors").unlink())
    resume_case("resume/truncated-model", "--set", "steps=6",
                mutate=lambda run: truncate(latest(run) / "model.safetensors", 100))
    resume_case("resume/model-header-garbage", "--set", "steps=6",
                mutate=lambda run: write(latest(run) / "model.safetensors",
                                         b"\xff" * 8 + b"garbage" * 100))  # fmt: skip
    resume_case("resume/state-missing-step", "--set", "steps=6",
                mutate=state(lambda s: s.pop("step")))
    resume_case("resume/state-missing-rng", "--set", "steps=6",
                mutate=state(lambda s: s.pop("rng")))
    resume_case("resume/state-missing-optimizer", "--set", "steps=6",
                mutate=state(lambda s: s.pop("optimizer")))
    resume_case("resume/state-step-string", "--set", "steps=6",
                mutate=state(lambda s: s.update(step="four")))
    resume_case("resume/state-garbage", "--set", "steps=6",
                mutate=lambda run: write(latest(run) / "state.json", b"{not json"))
    resume_case("resume/config-garbage", "--set", "steps=6",
                mutate=lambda run: write(run / "config.json", b"\x00\xff\xfegarbage"))
    resume_case("resume/config-list", "--set", "steps=6",
                mutate=lambda run: write(run / "config.json", "[1, 2, 3]"))
    resume_case("resume/config-lr-nan", "--set", "steps=6",
                mutate=lambda run: patch_json(run / "config.json",
                                              lambda c: c["train"].update(lr=float("nan"))))
    resume_case("resume/config-unknown-key", "--set", "steps=6",
                mutate=lambda run: patch_json(run / "config.json",
                                              lambda c: c["model"].update(d_modle=64)))
    resume_case("resume/config-missing", "--set", "steps=6",
                mutate=lambda run: (run / "config.json").unlink())
    resume_case("resume/run-json-garbage", "--set", "steps=6",
                mutate=lambda run: write(run / "run.json", b"\x00garbage"))
    resume_case("resume/metrics-corrupt-middle-line", "--set", "steps=6",
                mutate=lambda run: write(run / "metrics.jsonl", run.joinpath(
                    "metrics.jsonl").read_text().replace('"step": 4, "loss"',
                                                         '"step": 4, loss', 1)))  # fmt: skip

    def torn_metrics(run: Path) -> None:
        with open(run / "metrics.jsonl", "ab") as f:
            f.write(b'{"step": 5, "loss": 5.7, "lr": 0.00')  # a writer died mid-line

    def metrics_whole(cd: Path, r: Result) -> str | None:
        lines = (run_copy(cd) / "metrics.jsonl").read_bytes().split(b"\n")
        if lines[-1] != b"":
            return "metrics.jsonl does not end with a newline afterwards"
        try:
            records = [json.loads(x) for x in lines if x.strip()]
        except ValueError:
            return "metrics.jsonl still holds a line that is not JSON"
        if max(rec.get("step", 0) for rec in records) != 6:
            return "the resumed run did not log step 6"
        return None

    add("resume/torn-last-metrics-line", "resume", lambda cd: ["train", "--out",
        str(run_copy(cd)), "--resume", "--no-progress", "--set", "steps=6"], expect="ok",
        setup=with_run_copy(torn_metrics), check=metrics_whole)  # fmt: skip

    # ---- train --overwrite -------------------------------------------------------------
    def overwrite_case(name, *extra, category="overwrite", **kw):
        kw.setdefault("protect", prot_run)
        add(name, category, lambda cd: tiny_train(str(run_copy(cd)), "--overwrite", *extra),
            setup=with_run_copy(), **kw)

    overwrite_case("overwrite/bad-set-keeps-run", "--set", "batch_size=zero")
    overwrite_case("overwrite/nan-lr-keeps-run", "--set", "lr=nan")
    overwrite_case("overwrite/unknown-key-keeps-run", "--set", "dmodel=96")
    overwrite_case("overwrite/impossible-size-keeps-run", *HUGE, category="sizes", timeout=60)
    overwrite_case("overwrite/device-cuda-keeps-run", "--set", "device=cuda",
                   category="device")  # fmt: skip
    add("overwrite/missing-data-keeps-run", "overwrite", lambda cd: [a if a != D else missing
        for a in tiny_train(str(run_copy(cd)), "--overwrite")], setup=with_run_copy(),
        protect=prot_run)  # fmt: skip
    add("overwrite/config-binary-keeps-run", "overwrite", lambda cd: ["train", "--config",
        str(cfg / "binary.yaml"), "--data", D, "--out", str(run_copy(cd)), "--overwrite",
        "--no-progress"], setup=with_run_copy(), protect=prot_run)  # fmt: skip
    # Training into a folder that is not a run is a choice --overwrite may accept; the user's
    # own file must survive either way.
    add("overwrite/folder-with-user-files", "overwrite", lambda cd: tiny_train(
        str(cd / "mine"), "--overwrite"), expect="either",
        setup=lambda cd: write(cd / "mine" / "thesis.tex", "precious\n"),
        protect=lambda cd: [cd / "mine" / "thesis.tex"])  # fmt: skip
    add("overwrite/the-data-dir", "overwrite", tiny_train(D, "--overwrite"))
    add("overwrite/out-is-file", "overwrite", tiny_train(a_file, "--overwrite"))

    # ---- eval --------------------------------------------------------------------------
    add("eval/run-missing", "paths", ["eval", "--run", missing])
    add("eval/run-is-file", "paths", ["eval", "--run", a_file])
    add("eval/run-empty-dir", "paths", lambda cd: ["eval", "--run", str(cd / "e")],
        setup=lambda cd: (cd / "e").mkdir())
    add("eval/run-is-data-dir", "paths", ["eval", "--run", D])
    add("eval/checkpoint-missing", "paths", ["eval", "--run", R, "--checkpoint", missing])
    add("eval/checkpoint-is-file", "paths", ["eval", "--run", R, "--checkpoint",
                                             str(fx.R / "config.json")])  # fmt: skip
    add("eval/checkpoint-not-a-checkpoint", "paths", ["eval", "--run", R, "--checkpoint",
                                                      a_dir])  # fmt: skip
    add("eval/split-unknown", "eval", ["eval", "--run", R, "--split", "test"])
    add("eval/split-empty", "eval", ["eval", "--run", R, "--split", ""])
    add("eval/text-missing", "eval", ["eval", "--run", R, "--text", missing + ".txt"])
    add("eval/text-binary", "eval", ["eval", "--run", R, "--text", binary])
    add("eval/text-latin1", "eval", ["eval", "--run", R, "--text", latin1])
    add("eval/text-is-dir", "eval", ["eval", "--run", R, "--text", a_dir])
    add("eval/text-empty", "eval", ["eval", "--run", R, "--text", empty])
    add("eval/text-shorter-than-a-window", "eval", lambda cd: ["eval", "--run", R, "--text",
        str(cd / "short.txt")], expect="ok", setup=lambda cd: write(cd / "short.txt", "Hi."))
    add("eval/max-tokens-0", "eval", ["eval", "--run", R, "--max-tokens", "0"])
    add("eval/max-tokens-negative", "eval", ["eval", "--run", R, "--max-tokens", "-5"])
    add("eval/max-tokens-abc", "eval", ["eval", "--run", R, "--max-tokens", "abc"])
    add("eval/text-and-split", "eval", ["eval", "--run", R, "--text", small, "--split", "val"])
    add("eval/nan-checkpoint", "eval", ["eval", "--run", NANRUN])
    add("eval/nan-checkpoint-json", "eval", ["eval", "--run", NANRUN, "--json"])
    add("eval/nan-checkpoint-text", "eval", ["eval", "--run", NANRUN, "--text", small])
    add("eval/data-missing", "paths", ["eval", "--run", R, "--data", missing])
    add("eval/data-other-tokenization", "eval", ["eval", "--run", R, "--data", D2])
    add("eval/data-is-file", "paths", ["eval", "--run", R, "--data", a_file])
    add("eval/truncated-model", "eval", lambda cd: ["eval", "--run", str(run_copy(cd))],
        setup=with_run_copy(lambda run: truncate(latest(run) / "model.safetensors", 0.5)),
        protect=prot_run)
    add("eval/config-garbage", "eval", lambda cd: ["eval", "--run", str(run_copy(cd))],
        setup=with_run_copy(lambda run: write(run / "config.json", b"\x00\xffgarbage")),
        protect=prot_run)
    add("eval/tokenizer-missing-text", "eval", lambda cd: ["eval", "--run", str(run_copy(cd)),
        "--text", small], setup=with_run_copy(lambda run: (run / "tokenizer.json").unlink()),
        protect=prot_run)  # fmt: skip
    add("eval/device-cuda-run", "device", lambda cd: ["eval", "--run", str(run_copy(cd))],
        setup=with_run_copy(lambda run: patch_json(run / "config.json",
                                                   lambda c: c["train"].update(device="cuda"))),
        protect=prot_run)  # fmt: skip
    add("eval/unicode-space-paths", "paths", lambda cd: ["eval", "--run",
        str(cd / UNICODE_DIR / "my run"), "--text", str(cd / UNICODE_DIR / "held out ü.txt"),
        "--json"], expect="ok", setup=lambda cd: (copy_tree(fx.R, cd / UNICODE_DIR / "my run"),
        write(cd / UNICODE_DIR / "held out ü.txt", fx.small.read_text()[:4000])))

    # ---- sample ------------------------------------------------------------------------
    def sample(*extra: str, run: str = R) -> list[str]:
        return ["sample", "--run", run, "--prompt", "ROMEO:", "--max-tokens", "4", *extra]

    add("sample/temperature-nan", "sample", sample("--temperature", "nan"))
    add("sample/temperature-negative", "sample", sample("--temperature", "-1"))
    add("sample/temperature-inf", "sample", sample("--temperature", "inf"))
    add("sample/temperature-abc", "sample", sample("--temperature", "hot"))
    add("sample/top-p-0", "sample", sample("--top-p", "0"))
    add("sample/top-p-2", "sample", sample("--top-p", "2"))
    add("sample/top-p-nan", "sample", sample("--top-p", "nan"))
    add("sample/top-k-negative", "sample", sample("--top-k", "-1"))
    add("sample/max-tokens-0", "sample", sample("--max-tokens", "0"))
    add("sample/max-tokens-negative", "sample", sample("--max-tokens", "-3"))
    add("sample/prompt-empty", "sample", ["sample", "--run", R, "--prompt", "",
                                          "--max-tokens", "4"])  # fmt: skip
    add("sample/prompt-longer-than-context", "sample", ["sample", "--run", R, "--prompt",
        "the king " * 400, "--max-tokens", "4"])  # fmt: skip
    add("sample/seed-abc", "sample", sample("--seed", "abc"))
    add("sample/no-prompt", "cli", ["sample", "--run", R])
    add("sample/run-missing", "paths", sample(run=missing))
    add("sample/run-is-file", "paths", sample(run=a_file))
    add("sample/checkpoint-missing", "paths", sample("--checkpoint", missing))
    add("sample/checkpoint-not-a-checkpoint", "paths", sample("--checkpoint", a_dir))
    add("sample/nan-checkpoint", "sample", sample(run=NANRUN))
    add("sample/nan-checkpoint-greedy", "sample", sample("--temperature", "0", run=NANRUN))
    add("sample/truncated-model", "sample", lambda cd: sample(run=str(run_copy(cd))),
        setup=with_run_copy(lambda run: truncate(latest(run) / "model.safetensors", 0.5)),
        protect=prot_run)
    add("sample/tokenizer-garbage", "sample", lambda cd: sample(run=str(run_copy(cd))),
        setup=with_run_copy(lambda run: write(run / "tokenizer.json", b"\x00garbage")),
        protect=prot_run)
    add("sample/unicode-space-paths", "paths", lambda cd: ["sample", "--run",
        str(cd / UNICODE_DIR / "my run"), "--prompt", "Ünïcödé prompt — “quoted”",
        "--max-tokens", "4"], expect="ok",
        setup=lambda cd: copy_tree(fx.R, cd / UNICODE_DIR / "my run"))  # fmt: skip

    # ---- sweep -------------------------------------------------------------------------
    base_spec = (
        "name: probe\n"
        f"base:\n  preset: tiny\n  train: {{data: {json.dumps(D)}, seq_len: 32, "
        "batch_size: 2, eval_tokens: 256}\n"
    )
    axes = "axes:\n  variant:\n    baseline: {}\n    jtok: {model.tokmod.kind: jtok}\n"
    budget = "budget: {tokens: [128]}\n"

    def sweep_case(name, spec_text, *extra, dry=True, category="sweep", **kw):
        def argv(cd: Path) -> list[str]:
            return ["sweep", str(cd / "spec.yaml"), "--out", str(cd / "sw"), "--no-progress",
                    *(["--dry-run"] if dry else []), *extra]

        kw.setdefault("fresh", lambda cd: [cd / "sw"])
        add(name, category, argv, setup=lambda cd: write(cd / "spec.yaml", spec_text), **kw)

    good_spec = base_spec + axes + budget
    sweep_case("sweep/axes-as-list", base_spec + "axes: [baseline, jtok]\n" + budget)
    sweep_case("sweep/axis-values-as-list", base_spec + "axes:\n  variant: [baseline, jtok]\n"
               + budget)  # fmt: skip
    sweep_case("sweep/axis-value-overrides-string", base_spec + "axes:\n  variant:\n"
               "    jtok: model.tokmod.kind=jtok\n" + budget)  # fmt: skip
    sweep_case("sweep/budget-string", base_spec + axes + "budget: '1e5 tokens'\n")
    sweep_case("sweep/budget-tokens-string", base_spec + axes + "budget: {tokens: '128'}\n")
    sweep_case("sweep/budget-scalar", base_spec + axes + "budget: {tokens: 128}\n")
    sweep_case("sweep/budget-nan", base_spec + axes + "budget: {tokens: [.nan]}\n")
    sweep_case("sweep/budget-inf", base_spec + axes + "budget: {tokens: [.inf]}\n")
    sweep_case("sweep/budget-zero", base_spec + axes + "budget: {tokens: [0]}\n")
    sweep_case("sweep/budget-negative", base_spec + axes + "budget: {tokens: [-128]}\n")
    sweep_case("sweep/budget-empty-list", base_spec + axes + "budget: {tokens: []}\n")
    sweep_case("sweep/budget-bool", base_spec + axes + "budget: {tokens: [true]}\n")
    sweep_case("sweep/budget-unknown-kind", base_spec + axes + "budget: {steps: [10]}\n")
    sweep_case("sweep/budget-two-kinds", base_spec + axes
               + "budget: {tokens: [128], flops: [1e9]}\n")  # fmt: skip
    sweep_case("sweep/budget-missing", base_spec + axes)
    sweep_case("sweep/unknown-top-level-key", good_spec + "repeats: 3\n")
    sweep_case("sweep/preset-does-not-exist", good_spec.replace("preset: tiny",
                                                                "preset: tiny-xl"))
    sweep_case("sweep/base-unknown-key", good_spec.replace("  preset: tiny\n",
                                                           "  preset: tiny\n  optim: {}\n"))
    sweep_case("sweep/base-model-unknown-key", good_spec.replace(
        "  preset: tiny\n", "  preset: tiny\n  model: {dmodel: 96}\n"))  # fmt: skip
    sweep_case("sweep/base-train-lr-nan", good_spec.replace("seq_len: 32,",
                                                            "seq_len: 32, lr: .nan,"))
    sweep_case("sweep/axis-unknown-key", base_spec + "axes:\n  variant:\n"
               "    jtok: {model.tokmod.kindd: jtok}\n" + budget)  # fmt: skip
    sweep_case("sweep/axis-bad-value", base_spec + "axes:\n  size:\n"
               "    neg: {model.d_model: -64}\n" + budget)  # fmt: skip
    sweep_case("sweep/warmup-fraction-2", good_spec + "warmup_fraction: 2\n")
    sweep_case("sweep/evals-per-run-0", good_spec + "evals_per_run: 0\n")
    sweep_case("sweep/evals-per-run-2.5", good_spec + "evals_per_run: 2.5\n")
    sweep_case("sweep/exclude-unknown-axis", good_spec + "exclude:\n  - {size: small}\n")
    sweep_case("sweep/exclude-not-a-list", good_spec + "exclude: {variant: jtok}\n")
    sweep_case("sweep/spec-binary", "\x00\x01\x02binary")
    sweep_case("sweep/spec-invalid-yaml", good_spec + "axes: [\n")
    sweep_case("sweep/spec-a-list", "- name\n- base\n")
    sweep_case("sweep/shard-3-of-2", good_spec, "--shard", "3/2")
    sweep_case("sweep/shard-abc", good_spec, "--shard", "abc")
    sweep_case("sweep/shard-0-of-0", good_spec, "--shard", "0/0")
    add("sweep/spec-missing", "paths", lambda cd: ["sweep", missing + ".yaml", "--out",
        str(cd / "sw"), "--dry-run"], fresh=lambda cd: [cd / "sw"])  # fmt: skip
    add("sweep/spec-is-dir", "paths", lambda cd: ["sweep", a_dir, "--out", str(cd / "sw"),
                                                  "--dry-run"])  # fmt: skip
    add("sweep/out-is-file", "paths", lambda cd: ["sweep", str(cd / "spec.yaml"), "--out",
        a_file, "--no-progress"], setup=lambda cd: write(cd / "spec.yaml", good_spec))
    add("sweep/out-proc", "paths", lambda cd: ["sweep", str(cd / "spec.yaml"), "--out",
        "/proc/jtok_probe_sweep", "--no-progress"],
        setup=lambda cd: write(cd / "spec.yaml", good_spec))  # fmt: skip
    sweep_case("sweep/data-missing-run", good_spec.replace(json.dumps(D), json.dumps(missing)),
               dry=False)
    sweep_case("sweep/impossible-size-run", base_spec + "axes:\n  size:\n    huge: "
               "{model.d_model: 65536, model.n_layers: 512}\n" + budget, dry=False,
               category="sizes", timeout=60)  # fmt: skip
    sweep_case("sweep/device-cuda-run", good_spec.replace("seq_len: 32,",
               "seq_len: 32, device: cuda,"), dry=False, category="device")  # fmt: skip
    add("sweep/unicode-space-paths", "paths", lambda cd: ["sweep",
        str(cd / UNICODE_DIR / "my spec ü.yaml"), "--out", str(cd / UNICODE_DIR / "sw ü"),
        "--dry-run"], expect="ok",
        setup=lambda cd: write(cd / UNICODE_DIR / "my spec ü.yaml", good_spec))  # fmt: skip

    # ---- fit ---------------------------------------------------------------------------
    def fit_case(name, *extra, mutate=None, category="fit", **kw):
        def setup(cd: Path) -> None:
            copy_tree(FD, cd / "fit")
            if mutate is not None:
                mutate(cd / "fit")

        kw.setdefault("protect", lambda cd: [cd / "fit"])
        add(name, category, lambda cd: ["fit", str(cd / "fit"), "--bootstrap", "20",
                                        "--no-plots", *extra], setup=setup, **kw)

    def lines_of(fit: Path) -> list[str]:
        return (fit / "results.jsonl").read_text().splitlines(keepends=True)

    def set_line(i: int, text: str):
        def mutate(fit: Path) -> None:
            lines = lines_of(fit)
            lines[i] = text
            write(fit / "results.jsonl", "".join(lines))
        return mutate

    def edit_record(i: int, fn):
        def mutate(fit: Path) -> None:
            lines = lines_of(fit)
            rec = json.loads(lines[i])
            fn(rec)
            lines[i] = json.dumps(rec) + "\n"
            write(fit / "results.jsonl", "".join(lines))
        return mutate

    add("fit/dir-missing", "paths", ["fit", missing])
    add("fit/dir-is-file", "paths", ["fit", binary])
    fit_case("fit/no-results-jsonl", mutate=lambda fit: (fit / "results.jsonl").unlink())
    fit_case("fit/results-jsonl-is-dir", mutate=lambda fit: ((fit / "results.jsonl").unlink(),
                                                             (fit / "results.jsonl").mkdir()))
    fit_case("fit/results-empty", mutate=lambda fit: write(fit / "results.jsonl", ""))
    fit_case("fit/corrupt-middle-line", mutate=set_line(5, '{"name": "x", "variant": \n'))
    fit_case("fit/binary-middle-line", mutate=set_line(5, "\x00\x01\x02\n"))
    fit_case("fit/non-object-line", mutate=set_line(5, "[1, 2, 3]\n"))
    fit_case("fit/record-missing-field", mutate=edit_record(3, lambda r: r.pop("N_c")))
    fit_case("fit/record-string-loss", mutate=edit_record(3, lambda r: r.update(
        final_val_loss="low")))  # fmt: skip
    fit_case("fit/record-negative-tokens", mutate=edit_record(3, lambda r: r.update(
        tokens=-5)))  # fmt: skip
    fit_case("fit/only-one-record", mutate=lambda fit: write(fit / "results.jsonl",
                                                             lines_of(fit)[0]))
    fit_case("fit/bootstrap-negative", "--bootstrap", "-1")
    fit_case("fit/window-2", "--window", "2")
    fit_case("fit/window-0", "--window", "0")
    fit_case("fit/noise-nan", "--noise", "nan")
    fit_case("fit/noise-negative", "--noise", "-0.1")
    fit_case("fit/noise-inf", "--noise", "inf")
    fit_case("fit/loss-bogus", "--loss", "val_loss")
    fit_case("fit/variants-commas", "--variants", ",")
    fit_case("fit/variants-unknown", "--variants", "baseline,jtokx")
    fit_case("fit/baseline-unknown", "--baseline", "dense")
    fit_case("fit/treatment-unknown", "--treatment", "jtokx")
    fit_case("fit/out-is-file", "--out", a_file, category="paths")
    fit_case("fit/out-proc", "--out", "/proc/jtok_probe_fit", category="paths")
    fit_case("fit/torn-last-line", expect="ok", protect=lambda cd: [],
             mutate=lambda fit: write(fit / "results.jsonl", "".join(lines_of(fit))
                                      + '{"name": "half-writ'),
             check=lambda cd, r: None if (cd / "fit" / "fit.json").is_file()
             else "no fit.json written")  # fmt: skip
    add("fit/unicode-space-paths", "paths", lambda cd: ["fit", str(cd / UNICODE_DIR / "my fit"),
        "--bootstrap", "20", "--no-plots"], expect="ok",
        setup=lambda cd: copy_tree(FD, cd / UNICODE_DIR / "my fit"),
        check=lambda cd, r: None if (cd / UNICODE_DIR / "my fit" / "fit.json").is_file()
        else "no fit.json written")  # fmt: skip

    # ---- demo --------------------------------------------------------------------------
    add("demo/no-out", "cli", ["demo"])
    add("demo/out-is-file", "paths", ["demo", "--out", a_file, "--steps", "2"])
    add("demo/out-parent-is-file", "paths", ["demo", "--out", a_file + "/d", "--steps", "2"])
    add("demo/out-proc", "paths", ["demo", "--out", "/proc/jtok_probe_demo", "--steps", "2"])
    add("demo/out-sys", "paths", ["demo", "--out", "/sys/jtok_probe_demo", "--steps", "2"])
    add("demo/steps-0", "demo", lambda cd: ["demo", "--out", str(cd / "demo"), "--steps", "0"],
        fresh=lambda cd: [cd / "demo"])
    add("demo/steps-negative", "demo", lambda cd: ["demo", "--out", str(cd / "demo"),
        "--steps", "-3"], fresh=lambda cd: [cd / "demo"])  # fmt: skip
    add("demo/steps-abc", "demo", lambda cd: ["demo", "--out", str(cd / "demo"), "--steps",
                                              "many"])  # fmt: skip
    add("demo/out-holds-foreign-run", "demo", lambda cd: ["demo", "--out", str(cd / "demo"),
        "--steps", "2", "--no-progress"], setup=lambda cd: (copy_tree(fx.R, cd / "demo" /
        "runs" / "baseline"), copy_tree(fx.D, cd / "demo" / "data")),
        protect=lambda cd: [cd / "demo"])  # fmt: skip
    return cases


# ---- judging ------------------------------------------------------------------------------


def judge(case: Case, cd: Path, result: Result, changes: list[str], fresh_left: list[str],
          command: str) -> Outcome:  # fmt: skip
    err = result.stderr
    lines = err.rstrip("\n").split("\n") if err.strip() else []
    one_line = len(lines) == 1 and lines[0].startswith("jtok")
    traceback_seen = "Traceback" in err
    problems, notes = [], []
    if result.timed_out:
        problems.append(f"timed out after {case.timeout:.0f}s (killed)")
    if case.expect == "fail":
        if result.rc == 0:
            problems.append("exit status 0 (accepted)")
        elif result.rc not in (2,) and not result.timed_out:
            notes.append(f"exit status {result.rc}, not 2")
        if not lines:
            problems.append("nothing on stderr")
        elif len(lines) != 1:
            problems.append(f"stderr has {len(lines)} lines")
        elif not lines[0].startswith("jtok"):
            problems.append("stderr does not start with 'jtok'")
    elif case.expect == "either":  # refuse in one line, or succeed; never a traceback
        if result.rc != 0 and not (len(lines) == 1 and lines[0].startswith("jtok")):
            problems.append(f"exit status {result.rc} and stderr of {len(lines)} lines")
    else:
        if result.rc != 0:
            problems.append(f"exit status {result.rc} (expected success)")
        elif case.check is not None:
            why = case.check(cd, result)
            if why:
                problems.append(why)
    if traceback_seen:
        problems.append("Traceback on stderr")
    if changes:
        problems.append("protected files changed: " + ", ".join(changes[:6])
                        + (f" (+{len(changes) - 6} more)" if len(changes) > 6 else ""))
    if fresh_left:
        notes.append("left behind: " + ", ".join(fresh_left))
    good = not problems
    stdout_lines = result.stdout.strip().splitlines()
    asked = case.expect == "fail" or (case.expect == "either" and result.rc != 0)
    return Outcome(case, command, result.rc, one_line if asked else None,
                   not changes, good, problems, notes, err, "\n".join(stdout_lines[-3:]),
                   result.seconds)  # fmt: skip


def _yes_no(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "NO")


def source_state() -> dict:
    """Which jtok was probed: its folder, git HEAD, whether jtok/ has uncommitted changes,
    and a sha256 over its .py sources (the tree may change between two probes)."""
    import importlib.util

    spec = importlib.util.find_spec("jtok")
    root = Path(spec.origin).parent if spec and spec.origin else None
    state: dict = {"jtok": str(root) if root else None}
    if root is None:
        return state
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    state["sources_sha256"] = digest.hexdigest()[:16]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10)  # fmt: skip
        if head.returncode == 0:
            state["git_head"] = head.stdout.strip()
            state["uncommitted_changes"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return state


def last_traceback_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    if "Traceback" in err:
        return lines[-1] if lines else ""
    return " | ".join(lines[:3])[:300]


def shell_quote(argv: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in argv)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object with all cases")
    ap.add_argument("--exec", dest="use_exec", action="store_true",
                    help="run each case as a separate `python -m jtok` process (slower)")
    ap.add_argument("--only", action="append", metavar="GLOB",
                    help="run only cases whose name matches (repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--list", action="store_true", help="list the cases and stop")
    args = ap.parse_args()

    t_start = time.monotonic()
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="jtok-probe-"))
    # Resolve symlinks (e.g. /tmp -> /private/tmp) so that paths compare as printed.
    tmp = tmp.resolve()
    try:
        fx = Fixtures(tmp)
        cases = build_cases(fx)
        names = [c.name for c in cases]
        assert len(set(names)) == len(names), "duplicate case names"
        if args.only:
            cases = [c for c in cases if any(fnmatch.fnmatch(c.name, g) for g in args.only)]
        if args.list:
            for c in cases:
                print(f"{c.name:50s} {c.category:10s} {c.expect}")
            return 0
        tree = source_state()
        fx.build(log)
        runner = Runner(tmp, args.use_exec)
        outcomes: list[Outcome] = []
        shared = fx.shared()
        for i, case in enumerate(cases):
            cd = tmp / "cases" / f"{i:03d}"
            cd.mkdir(parents=True)
            if case.setup is not None:
                case.setup(cd)
            argv = case.argv(cd)
            protected = shared + (case.protect(cd) if case.protect else [])
            fresh = case.fresh(cd) if case.fresh else []
            before = snapshot(protected)
            cwd = case.cwd(cd) if case.cwd else cd
            result = runner.run(argv, cwd, case.timeout)
            after = snapshot(protected)
            changes = diff(before, after, tmp)
            left = [os.path.relpath(p, tmp) for p in fresh if p.exists()]
            outcome = judge(case, cd, result, changes, left, "jtok " + shell_quote(argv))
            outcomes.append(outcome)
            if not args.json:
                mark = "ok " if outcome.good else "BAD"
                log(f"  [{i + 1:3d}/{len(cases)}] {mark} {case.name} ({result.seconds:.1f}s)")
        total_s = time.monotonic() - t_start
        n_good = sum(o.good for o in outcomes)
        n_bad = len(outcomes) - n_good
        summary = (f"{len(outcomes)} cases, {n_good} handled well (one line, non-zero exit, "
                   f"nothing changed), {n_bad} not")  # fmt: skip
        if args.json:
            print(json.dumps({
                "summary": summary, "cases_total": len(outcomes), "handled_well": n_good,
                "not_handled": n_bad, "seconds": round(total_s, 1),
                "mode": "exec" if args.use_exec else "fork", "source": tree,
                "tmp": str(tmp) if args.keep else None,
                "cases": [{
                    "name": o.case.name, "category": o.case.category,
                    "expect": o.case.expect, "command": o.command.replace(str(tmp), "$TMP"),
                    "exit": o.rc, "one_line": o.one_line, "unchanged": o.unchanged,
                    "good": o.good, "problems": [p.replace(str(tmp), "$TMP")
                                                 for p in o.problems],
                    "notes": [n.replace(str(tmp), "$TMP") for n in o.notes],
                    "stderr": o.stderr.replace(str(tmp), "$TMP"),
                    "stdout_tail": o.stdout_tail.replace(str(tmp), "$TMP"),
                    "seconds": round(o.seconds, 2),
                } for o in outcomes],
            }, indent=1, ensure_ascii=False))  # fmt: skip
        else:
            w = max(len(o.case.name) for o in outcomes)
            print(f"{'case':{w}s}  {'category':9s}  {'expect':6s}  exit  one-line?  "
                  f"unchanged?  verdict")  # fmt: skip
            for o in outcomes:
                print(f"{o.case.name:{w}s}  {o.case.category:9s}  {o.case.expect:6s}  "
                      f"{o.rc:4d}  {_yes_no(o.one_line):9s}  "
                      f"{'yes' if o.unchanged else 'NO':10s}  "
                      f"{'good' if o.good else 'NOT HANDLED'}")  # fmt: skip
            bad = [o for o in outcomes if not o.good]
            if bad:
                print("\nNot handled well:")
                for o in bad:
                    print(f"- {o.case.name}: {'; '.join(o.problems)}")
                    print(f"    $ {o.command.replace(str(tmp), '$TMP')}")
                    print(f"    stderr: {last_traceback_line(o.stderr).replace(str(tmp), '$TMP')}")
            noted = [o for o in outcomes if o.notes]
            if noted:
                print("\nNotes (not counted):")
                for o in noted:
                    print(f"- {o.case.name}: {'; '.join(o.notes)}")
            where = ", ".join(f"{k} {v}" for k, v in tree.items() if k != "jtok")
            print(f"\n({total_s:.0f}s, {'exec' if args.use_exec else 'fork'} mode; {where})")
            print(summary)
        return 0
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

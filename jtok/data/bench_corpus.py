"""The benchmark corpus docs-en: technical English prose from two Debian documentation packages.

`build_docs_en(out)` writes, under `out/docs-en/`:

    train.txt      documents joined by blank lines, ending with one newline
    val.txt        the same for the held-out documents (about 2% of the files)
    manifest.json  packages (and the .deb files fetched, with their versions), the file
                   patterns and val rule, and per split: files, documents, bytes

Sources: `apt-get download` fetches (never installs) linux-doc-6.1 and python3.11-doc,
`dpkg-deb -x` unpacks them, and the corpus is the kernel's reStructuredText
(Documentation/**/*.rst*, gzip-compressed when the name ends in .gz) and the Python
docs' reST sources (html/_sources/**/*.txt). Files are taken in sorted path order; a
file goes to val when int(sha1(its path relative to the unpacked root), 16) % 50 == 0,
so the split is the same on every machine. Each file is decoded as UTF-8 with undecodable
bytes replaced by U+FFFD (these are upstream docs, not user data) and stripped; an empty
file contributes nothing to the text. About 35 MB in all. Licences: GPL-2 (kernel docs)
and PSF (Python docs): use it for local benchmarks, do not redistribute.

The corpus is built in a scratch directory inside `out` and renamed into place when
complete, so `out/docs-en/manifest.json` existing means the corpus is there: building
again reports that and does nothing.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jtok.data.format import DataError
from jtok.io import fsync_dir, read_json, write_json_atomic

DOCS_EN = "docs-en"
DOCS_EN_PACKAGES = ("linux-doc-6.1", "python3.11-doc")
DOCS_EN_PATTERNS = (  # relative to the unpacked packages' root
    "usr/share/doc/linux-doc-6.1/Documentation/**/*.rst*",
    "usr/share/doc/python3.11/html/_sources/**/*.txt",
)
VAL_MODULUS = 50  # one file in 50 (by path hash) is held out
CORPUS_MANIFEST = "manifest.json"  # written last: its presence means the corpus is complete


def split_of(relative_path: str) -> str:
    """'val' for about one path in VAL_MODULUS (by sha1 of the path), else 'train'."""
    digest = hashlib.sha1(relative_path.encode("utf-8")).hexdigest()
    return "val" if int(digest, 16) % VAL_MODULUS == 0 else "train"


def corpus_files(root: str | os.PathLike) -> list[str]:
    """The corpus files under an unpacked root, as sorted paths relative to it."""
    root = str(root)
    found: set[str] = set()
    for pattern in DOCS_EN_PATTERNS:
        for path in glob.glob(os.path.join(root, pattern), recursive=True):
            if os.path.isfile(path):
                found.add(os.path.relpath(path, root))
    return sorted(found)


def read_document(path: str | os.PathLike) -> str:
    """One file's text: gunzipped when it ends in .gz, UTF-8 with replacement, stripped."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as file:
        return file.read().decode("utf-8", "replace").strip()


def write_corpus(root: str | os.PathLike, target: str | os.PathLike,
                 debs: list[str]) -> dict:  # fmt: skip
    """Write train.txt, val.txt and manifest.json of the files under `root` into `target`.

    Streams one document at a time; returns the manifest.
    """
    target = Path(target)
    splits: dict[str, dict[str, int]] = {}
    sinks = {name: open(target / f"{name}.txt", "wb") for name in ("train", "val")}
    try:
        for name in sinks:
            splits[name] = {"files": 0, "documents": 0, "bytes": 0}
        for relative in corpus_files(root):
            name = split_of(relative)
            text = read_document(os.path.join(root, relative))
            splits[name]["files"] += 1
            if not text:
                continue
            data = (b"\n\n" if splits[name]["documents"] else b"") + text.encode("utf-8")
            sinks[name].write(data)
            splits[name]["documents"] += 1
            splits[name]["bytes"] += len(data)
        for name, sink in sinks.items():
            sink.write(b"\n")
            splits[name]["bytes"] += 1
            sink.flush()
            os.fsync(sink.fileno())
    finally:
        for sink in sinks.values():
            sink.close()
    manifest = {"name": DOCS_EN, "packages": list(DOCS_EN_PACKAGES), "debs": debs,
                "patterns": list(DOCS_EN_PATTERNS),
                "val_rule": f"int(sha1(relative path), 16) % {VAL_MODULUS} == 0",
                "splits": splits}  # fmt: skip
    write_json_atomic(target / CORPUS_MANIFEST, manifest)
    return manifest


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True)


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or [f"exit status {done.returncode}"])[-1].strip()


def _require(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise DataError(f"building {DOCS_EN} needs {tool} (a Debian or Ubuntu system), "
                            "which is not on PATH")  # fmt: skip


def fetch_packages(workdir: Path, log: Callable[[str], Any] = print) -> list[Path]:
    """`apt-get download` the packages into `workdir` (after `apt-get update` on failure)."""
    _require("apt-get")
    command = ["apt-get", "download", *DOCS_EN_PACKAGES]
    log(f"downloading {', '.join(DOCS_EN_PACKAGES)} with apt-get")
    done = _run(command, workdir)
    if done.returncode != 0:
        log("apt-get download failed; running apt-get update and trying once more")
        _run(["apt-get", "update"], workdir)
        done = _run(command, workdir)
    if done.returncode != 0:
        raise DataError(f"apt-get download {' '.join(DOCS_EN_PACKAGES)} failed: "
                        f"{_last_line(done)}")  # fmt: skip
    debs = sorted(workdir.glob("*.deb"))
    if len(debs) != len(DOCS_EN_PACKAGES):
        raise DataError(f"apt-get download gave {len(debs)} .deb files, expected "
                        f"{len(DOCS_EN_PACKAGES)}")  # fmt: skip
    return debs


def _check_built(target: Path) -> None:
    """A built corpus's split files have the sizes its manifest records (a truncated or
    deleted file is not "already built")."""
    manifest = read_json(target / CORPUS_MANIFEST, "corpus manifest")
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(splits, dict):
        raise DataError(f"{target / CORPUS_MANIFEST} is damaged (no splits); move {target} "
                        "away to build it again")  # fmt: skip
    for name, split in splits.items():
        path = target / f"{name}.txt"
        size = path.stat().st_size if path.is_file() else None
        recorded = split.get("bytes") if isinstance(split, dict) else None
        if not isinstance(recorded, int) or size != recorded:
            found = "is missing" if size is None else f"has {size:,} bytes"
            raise DataError(f"{path} {found}, the manifest records {recorded!r} bytes; move "
                            f"{target} away to build it again")  # fmt: skip


def build_docs_en(out: str | os.PathLike, log: Callable[[str], Any] = print, *,
                  fetch: Callable[[Path], list[Path]] | None = None) -> dict | None:  # fmt: skip
    """Build `out/docs-en` (see the module docstring); return its manifest.

    Returns None, after saying so, when the corpus is already there. `fetch(workdir)`
    (default: `fetch_packages`) puts the .deb files into `workdir` and returns them.
    """
    # Absolute: dpkg-deb runs in the scratch folder, where a relative path would not resolve.
    out = Path(out).absolute()
    target = out / DOCS_EN
    if (target / CORPUS_MANIFEST).is_file():
        _check_built(target)
        log(f"{DOCS_EN} is already built in {target}; nothing to do")
        return None
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError(f"{target} exists but holds no manifest.json (an interrupted build?); "
                        "move it away or pick another --out")  # fmt: skip
    _require(*(("apt-get",) if fetch is None else ()), "dpkg-deb")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=out, prefix=f".{DOCS_EN}.build-"))
    except OSError as err:
        raise DataError(f"cannot write in {out}: {err.strerror}") from None
    manifest = None
    try:
        debs = (fetch or (lambda d: fetch_packages(d, log)))(scratch)
        root = scratch / "root"
        for deb in debs:
            done = _run(["dpkg-deb", "-x", str(deb), str(root)], scratch)
            if done.returncode != 0:
                raise DataError(f"dpkg-deb -x {deb.name} failed: {_last_line(done)}")
        built = scratch / DOCS_EN
        built.mkdir()
        log(f"writing {DOCS_EN} from {len(corpus_files(root))} files")
        manifest = write_corpus(root, built, [deb.name for deb in debs])
        os.chmod(built, 0o755)
        if target.exists():
            target.rmdir()  # checked empty above
        os.rename(built, target)
        fsync_dir(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if manifest is None and created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: leave nothing behind that we made
    for name, split in manifest["splits"].items():
        log(f"{name}: {split['documents']:,} documents, {split['bytes']:,} bytes -> "
            f"{target / (name + '.txt')}")  # fmt: skip
    return manifest

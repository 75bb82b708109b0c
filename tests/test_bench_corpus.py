"""`jtok data corpus docs-en`: the benchmark corpus built from documentation packages
(selection, the path-hash split, unpacking, and its one-line errors)."""

import gzip
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_data_safety import assert_one_line_error, cli, snapshot

import jtok.data.bench_corpus as bench

LINUX = "usr/share/doc/linux-doc-6.1/Documentation"
PYTHON = "usr/share/doc/python3.11/html/_sources"


def val_name(prefix, suffix):
    """A file name under `prefix` that the path hash sends to val."""
    return next(f"{prefix}/v{i}{suffix}" for i in range(10_000)
                if bench.split_of(f"{prefix}/v{i}{suffix}") == "val")  # fmt: skip


def fake_tree(root):
    """A small unpacked-packages tree; returns {relative path: expected document}."""
    files = {  # relative path: (bytes, the document expected, or None: not selected)
        f"{LINUX}/admin-guide/intro.rst": (b"  Intro to the kernel.\n\n", "Intro to the kernel."),
        f"{LINUX}/process/howto.rst.gz": (gzip.compress(b"How to \xff?\n"), "How to \ufffd?"),
        f"{LINUX}/empty.rst": (b"   \n", ""),
        f"{PYTHON}/library/os.rst.txt": ("os — Misc\n".encode(), "os — Misc"),
        f"{PYTHON}/tutorial/index.txt": (b"The Python Tutorial", "The Python Tutorial"),
        val_name(f"{PYTHON}/faq", ".txt"): (b"A held-out FAQ page.", "A held-out FAQ page."),
        f"{LINUX}/notes.html": (b"not prose", None),  # matches no pattern
        f"{LINUX}/.hidden.rst": (b"hidden", None),  # glob skips dot files
        "usr/share/doc/python3.11/html/index.html": (b"not a source", None),
    }
    for relative, (data, _) in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return {relative: doc for relative, (_, doc) in files.items() if doc is not None}


def test_corpus_selection_split_and_writing_on_a_fake_tree(tmp_path):
    expected = fake_tree(tmp_path / "root")
    assert bench.corpus_files(tmp_path / "root") == sorted(expected)
    splits = {"train": [], "val": []}
    for relative in sorted(expected):
        splits[bench.split_of(relative)].append(expected[relative])
    assert len(splits["val"]) == 1 and len(splits["train"]) == 5
    (tmp_path / "out").mkdir()
    manifest = bench.write_corpus(tmp_path / "root", tmp_path / "out", ["a.deb"])
    for name, docs in splits.items():
        text = "\n\n".join(d for d in docs if d) + "\n"
        assert (tmp_path / "out" / f"{name}.txt").read_bytes() == text.encode()
        assert manifest["splits"][name] == {"files": len(docs), "documents": sum(map(bool, docs)),
                                            "bytes": len(text.encode())}  # fmt: skip
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    # The split rule itself: sha1 of the relative path, one in 50.
    assert [bench.split_of(f"p{i}") for i in range(200)].count("val") == sum(
        int(hashlib.sha1(f"p{i}".encode()).hexdigest(), 16) % 50 == 0 for i in range(200))


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_build_docs_en_unpacks_debs_then_does_nothing_when_built(tmp_path, monkeypatch):
    expected = fake_tree(tmp_path / "pkg")
    (tmp_path / "pkg" / "DEBIAN").mkdir()
    (tmp_path / "pkg" / "DEBIAN" / "control").write_text(
        "Package: fake-doc\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\n"
        "Description: fake\n")  # fmt: skip
    deb = tmp_path / "fake-doc_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tmp_path / "pkg"),
                    str(deb)], check=True, capture_output=True)  # fmt: skip

    def fetch(workdir):
        return [Path(shutil.copy(deb, workdir))]

    messages = []
    monkeypatch.chdir(tmp_path)  # a relative --out (dpkg-deb runs in the scratch folder)
    manifest = bench.build_docs_en("out", messages.append, fetch=fetch)
    target = tmp_path / "out" / "docs-en"
    assert manifest["debs"] == [deb.name] and manifest["splits"]["val"]["documents"] == 1
    assert (target / "val.txt").read_text() == expected[val_name(f"{PYTHON}/faq", ".txt")] + "\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["docs-en"]
    before = snapshot(target)
    assert bench.build_docs_en(tmp_path / "out", messages.append, fetch=fetch) is None
    assert "already built" in messages[-1] and snapshot(target) == before
    # A damaged corpus is not "already built": a truncated or deleted split is named.
    (target / "val.txt").unlink()
    with pytest.raises(bench.DataError, match=r"val.txt is missing, the manifest records \d+ "):
        bench.build_docs_en(tmp_path / "out", messages.append, fetch=fetch)
    with open(target / "train.txt", "r+b") as f:
        f.truncate(3)
    with pytest.raises(bench.DataError, match=r"train.txt has 3 bytes, the manifest records \d+ "):
        bench.build_docs_en(tmp_path / "out", messages.append, fetch=fetch)


def test_corpus_without_apt_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "")
    result = cli(capsys, "data", "corpus", "docs-en", "--out", tmp_path / "c")
    assert_one_line_error(result, r"needs apt-get .*not on PATH", command="data corpus")
    assert not (tmp_path / "c").exists()


def test_a_failed_download_updates_retries_once_then_is_one_line(tmp_path, capsys, monkeypatch):
    calls = []

    def apt(command, cwd):
        calls.append(command[:2])
        return subprocess.CompletedProcess(command, 100, "", "E: Unable to locate package x\n")

    monkeypatch.setattr(bench.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(bench, "_run", apt)
    result = cli(capsys, "data", "corpus", "docs-en", "--out", tmp_path / "c")
    assert_one_line_error(result, r"apt-get download linux-doc-6\.1 python3\.11-doc failed: "
                                  r"E: Unable to locate package x", command="data corpus")
    assert calls == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]
    assert not (tmp_path / "c").exists()

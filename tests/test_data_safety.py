"""Data safety: manifest paths, verification on open, decoding, --val, staged --overwrite,
and the docs-en benchmark corpus. User mistakes end in one line and exit 2; protected
files keep their sha256."""

import codecs
import gzip
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import jtok.data.build as build
import jtok.data.manifest as manifest_module
import jtok.data.outdir as outdir
from jtok.cli import main
from jtok.data import DataError, check_vocab, load_manifest, load_tokenizer, open_split, prepare
from jtok.data.format import OUTPUT_FILES
from jtok.data.manifest import verify_data_dir

TEXT = "".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog; sphinx of black "
               "quartz.\n\n" for i in range(60))  # fmt: skip


def run_prepare(inputs, out, **kwargs):
    kwargs = {"vocab_size": 300, "progress": False, "log": lambda _: None, **kwargs}
    return prepare([str(i) for i in inputs], out, **kwargs)


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def prepare_cli(capsys, *argv):
    return cli(capsys, "data", "prepare", "--vocab-size", "300", "--no-progress", *argv)


def assert_one_line_error(result, pattern, command="data prepare"):
    code, _, err = result
    assert code == 2
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith(f"jtok {command}: error: ")
    assert re.search(pattern, lines[0]), lines[0]


def snapshot(folder):
    """sha256 of every file under `folder` (and its entries), to prove nothing changed."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def siblings(path):
    return sorted(p.name for p in Path(path).parent.iterdir())


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def prepared(tmp_path, text_file):
    out = tmp_path / "data"
    run_prepare([text_file], out, val_fraction=0.1)
    return out


def edit_manifest(folder, change):
    path = Path(folder) / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ---- 1. manifest paths stay inside the data directory -----------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(tokenizer="/etc/passwd"), r"field 'tokenizer' is the absolute path"),
        (lambda m: m["splits"]["train"].update(file="../in.txt"),
         r"field 'splits\.train\.file' = '\.\./in\.txt' leaves the data directory"),
        (lambda m: m["splits"]["val"].update(file="sub/../../in.txt"),
         r"field 'splits\.val\.file' .* leaves the data directory"),
        (lambda m: m["splits"]["val"].update(file=""), r"field 'splits\.val\.file' must be"),
        (lambda m: m["splits"]["val"].update(file=7), r"field 'splits\.val\.file' must be"),
        (lambda m: m.update(dtype="object"), r"field 'dtype' must be uint16 or uint32"),
    ],
)  # fmt: skip
def test_manifest_paths_outside_the_data_dir_are_refused_naming_the_field(prepared, change,
                                                                          message):  # fmt: skip
    edit_manifest(prepared, change)
    with pytest.raises(DataError, match=message) as caught:
        load_manifest(prepared)
    assert "\n" not in str(caught.value)
    with pytest.raises(DataError, match=message):
        open_split(prepared, "train")


def test_a_symlink_that_leads_out_of_the_data_dir_is_refused(prepared, tmp_path):
    outside = tmp_path / "elsewhere.bin"
    shutil.copyfile(prepared / "train.bin", outside)
    (prepared / "train.bin").unlink()
    (prepared / "train.bin").symlink_to(outside)
    with pytest.raises(DataError, match=r"'splits\.train\.file' = 'train\.bin' resolves to "
                                        r".*elsewhere\.bin, outside the data directory"):
        load_manifest(prepared)
    # A symlink that stays inside is fine.
    (prepared / "train.bin").unlink()
    shutil.move(outside, prepared / "real-train.bin")
    (prepared / "train.bin").symlink_to("real-train.bin")
    assert verify_data_dir(prepared)["splits"]["train"]["file"] == "train.bin"


# ---- 2. the tokenizer's sha256 is verified on open --------------------------------------


def test_a_changed_tokenizer_is_refused_when_the_data_is_opened(prepared):
    manifest = verify_data_dir(prepared)
    assert manifest["tokenizer_sha256"] == hashlib.sha256(
        (prepared / "tokenizer.json").read_bytes()).hexdigest()  # fmt: skip
    with (prepared / "tokenizer.json").open("a") as file:
        file.write(" ")
    load_manifest(prepared)  # the cheap reader does not hash
    with pytest.raises(DataError, match=r"tokenizer\.json has sha256 .* but manifest\.json "
                                        r"records .*changed after"):
        verify_data_dir(prepared)
    (prepared / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"tokenizer\.json is missing"):
        verify_data_dir(prepared)


# ---- 3. ids against the vocabulary ------------------------------------------------------


def test_prepare_records_each_splits_largest_id_and_check_vocab_uses_it(prepared, monkeypatch):
    manifest = load_manifest(prepared)
    for split in ("train", "val"):
        ids = np.fromfile(prepared / f"{split}.bin", dtype="<u2")
        assert manifest["splits"][split]["max_token_id"] == int(ids.max())
        assert manifest["splits"][split]["sample_sha256"] == manifest_module.sample_sha256(
            prepared / f"{split}.bin")  # fmt: skip

    def no_scan(*args, **kwargs):
        raise AssertionError("check_vocab scanned a split")

    monkeypatch.setattr(manifest_module, "max_token_id", no_scan)
    check_vocab(prepared, 300)
    largest = max(s["max_token_id"] for s in manifest["splits"].values())
    edit_manifest(prepared, lambda m: m.update(vocab_size=largest))  # smaller than an id
    with pytest.raises(DataError, match=rf"holds token id {largest} but vocab_size is {largest}"):
        check_vocab(prepared, 300)


def test_an_old_manifest_is_scanned_once_and_a_too_small_vocab_is_a_clear_error(prepared,
                                                                                 monkeypatch):
    def old(m):
        for info in m["splits"].values():
            del info["max_token_id"], info["sample_sha256"]

    edit_manifest(prepared, old)
    scans = []
    real = manifest_module.max_token_id
    monkeypatch.setattr(manifest_module, "max_token_id",
                        lambda tokens: scans.append(len(tokens)) or real(tokens))  # fmt: skip
    manifest = verify_data_dir(prepared)
    assert len(scans) == 2 and "max_token_id" in manifest["splits"]["val"]
    check_vocab(manifest, 300)
    check_vocab(prepared, 300)
    assert len(scans) == 2  # the scan happens once per unchanged file

    ids = np.fromfile(prepared / "val.bin", dtype="<u2")
    ids[-2] = 4000
    ids.tofile(prepared / "val.bin")
    with pytest.raises(DataError, match=r"val\.bin holds token id 4000 but manifest\.json says "
                                        r"vocab_size is 300"):
        check_vocab(prepared, 5000)  # the model could look it up; the manifest is wrong


def test_the_split_fingerprint_samples_a_large_file(tmp_path):
    size = 40 << 20
    ranges = manifest_module._sample_ranges(size)
    assert ranges[0] == (0, 1 << 20) and ranges[-1] == (size - (1 << 20), 1 << 20)
    assert len(ranges) == 34 and sum(n for _, n in ranges) == (2 << 20) + 32 * (64 << 10)
    assert all(a + n <= b for (a, n), (b, _) in zip(ranges, ranges[1:], strict=False))
    assert manifest_module._sample_ranges(1000) == [(0, 1000)]

    path = tmp_path / "big.bin"
    data = np.random.default_rng(0).integers(0, 300, size // 2, dtype=np.uint16)
    data.tofile(path)
    before = manifest_module.sample_sha256(path)
    assert all(offset % 4 == 0 for offset, _ in ranges)  # blocks hold whole ids
    middle = ranges[10][0] // 2 + 100  # an id inside a sampled block
    data[middle] += 1
    data.tofile(path)
    assert manifest_module.sample_sha256(path) != before


# ---- 4. encodings and binary input ------------------------------------------------------


def test_latin1_text_with_its_encoding_and_strict_utf8_naming_the_offset(tmp_path, capsys):
    text = "Crème brûlée à la façon de Noël.\n\n" * 20
    path = tmp_path / "latin.txt"
    path.write_bytes(text.encode("latin-1"))
    assert_one_line_error(prepare_cli(capsys, path, "--out", tmp_path / "a"),
                          r"latin\.txt: byte offset 2 \(0xe8\) is not valid utf-8; pass the "
                          r"right --encoding, or --errors replace")  # fmt: skip
    assert not (tmp_path / "a").exists()

    code, out, _ = prepare_cli(capsys, path, "--out", tmp_path / "b", "--encoding", "latin-1")
    assert code == 0
    manifest = load_manifest(tmp_path / "b")
    assert manifest["encoding"] == "iso8859-1" and manifest["undecodable_bytes_replaced"] == 0
    tokenizer = load_tokenizer(tmp_path / "b")
    decoded = tokenizer.decode(open_split(tmp_path / "b", "train").tolist())
    assert "Crème brûlée à la façon de Noël." in decoded

    code, out, _ = prepare_cli(capsys, path, "--out", tmp_path / "c", "--errors", "replace")
    accented = sum(ord(c) > 127 for c in text)  # one byte each in latin-1
    assert code == 0 and f"undecodable bytes replaced with U+FFFD: {accented}" in out
    assert load_manifest(tmp_path / "c")["undecodable_bytes_replaced"] == accented

    assert_one_line_error(prepare_cli(capsys, path, "--out", tmp_path / "d", "--encoding",
                                      "klingon"), r"unknown encoding 'klingon'")  # fmt: skip


def test_a_utf8_byte_order_mark_is_dropped_not_tokenized(tmp_path):
    text = "The opening words of a file.\n\n" * 30
    (tmp_path / "bom.txt").write_bytes(codecs.BOM_UTF8 + text.encode())
    rows = b'{"text": "first row"}\n{"text": "second row"}\n' * 5
    (tmp_path / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + rows)
    for name, first in (("bom.txt", "The opening words"), ("bom.jsonl", "first row")):
        out = tmp_path / f"out-{name}"
        run_prepare([tmp_path / name], out, val_fraction=0.2)
        tokenizer = load_tokenizer(out)
        train = tokenizer.decode(open_split(out, "train").tolist())  # document 0 trains
        val = tokenizer.decode(open_split(out, "val").tolist())
        assert train.startswith(first) and "\ufeff" not in train + val
    # Offsets in errors still count the file's bytes, the mark included.
    (tmp_path / "bad.txt").write_bytes(codecs.BOM_UTF8 + b"ab\xe9")
    with pytest.raises(DataError, match=r"bad\.txt: byte offset 5 \(0xe9\)"):
        run_prepare([tmp_path / "bad.txt"], tmp_path / "never")
    (tmp_path / "bad.jsonl").write_bytes(codecs.BOM_UTF8 + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: byte offset 16 \(0xe9\)"):
        run_prepare([tmp_path / "bad.jsonl"], tmp_path / "never")


def test_strict_jsonl_names_the_line_and_offset(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:2: byte offset 30 \(0xe9\) is not valid"):
        run_prepare([path], tmp_path / "out")
    path.write_bytes(b'{"text": "fine"}\n{"text": "lone \\ud800"}\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:2: .* lone surrogate"):
        run_prepare([path], tmp_path / "out")
    assert not (tmp_path / "out").exists()


BINARIES = {
    "nul.txt": b"looks like text at first" + b"\0" * 10 + b"more",
    "archive.txt.gz": gzip.compress(TEXT.encode()),
    "bundle.zip": b"PK\x03\x04" + b"\0" * 40,
    "image.png": b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR",
    "program": b"\x7fELF\x02\x01\x01" + b"\0" * 9,
    "utf16.txt": "text in utf-16".encode("utf-16"),
}


@pytest.mark.parametrize("name", sorted(BINARIES))
def test_binary_input_is_refused_in_one_line(tmp_path, capsys, name, prepared):
    path = tmp_path / name
    path.write_bytes(BINARIES[name])
    before = snapshot(prepared)
    result = prepare_cli(capsys, path, "--out", prepared, "--overwrite")
    kind = {"archive.txt.gz": "is a gzip file", "bundle.zip": "is a zip file",
            "image.png": "is a PNG file", "program": "is an ELF file"}  # fmt: skip
    assert_one_line_error(result, rf"{re.escape(name)} {kind.get(name, 'looks binary')}")
    assert snapshot(prepared) == before
    if name == "utf16.txt":
        assert "try --encoding utf-16" in result[2]
        code, _, _ = prepare_cli(capsys, path, "--out", tmp_path / "u16", "--encoding", "utf-16")
        assert code == 0


# ---- 5. an explicit validation set ------------------------------------------------------


def test_val_files_are_the_val_split_and_the_tokenizer_never_sees_them(tmp_path, monkeypatch,
                                                                       text_file):  # fmt: skip
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    (val_dir / "a.txt").write_text("Held out zebra quagga okapi.\n")
    (val_dir / "b.jsonl").write_text('{"text": "A second held-out row."}\n')
    seen = []
    real_train = build._train_tokenizer
    monkeypatch.setattr(build, "_train_tokenizer",
                        lambda texts, *a: real_train(seen.extend(texts) or iter(seen), *a))
    out = tmp_path / "out"
    manifest = run_prepare([text_file], out, val=[str(val_dir / "*.txt"), val_dir / "b.jsonl"])
    assert "".join(seen) == TEXT and not any("zebra" in t for t in seen)
    tokenizer = load_tokenizer(out)
    val_text = tokenizer.decode(open_split(out, "val").tolist())
    assert val_text.startswith("Held out zebra quagga okapi.\n") and "second held-out" in val_text
    assert manifest["splits"]["val"]["documents"] == 2 and manifest["val_fraction"] is None
    assert [s["path"] for s in manifest["val_sources"]] == [str(val_dir / "a.txt"),
                                                            str(val_dir / "b.jsonl")]
    assert tokenizer.decode(open_split(out, "train").tolist()) == TEXT


def test_val_and_val_fraction_together_or_a_shared_file_are_refused(tmp_path, capsys, text_file):
    assert_one_line_error(prepare_cli(capsys, text_file, "--out", tmp_path / "o", "--val",
                                      text_file, "--val-fraction", "0.1"),
                          r"give --val FILE\.\.\. or --val-fraction, not both")  # fmt: skip
    assert_one_line_error(prepare_cli(capsys, text_file, "--out", tmp_path / "o", "--val",
                                      text_file), r"in\.txt is both a training input and")
    assert_one_line_error(prepare_cli(capsys, text_file, "--out", tmp_path / "o", "--val",
                                      tmp_path / "nope.txt"), r"input file not found")
    with pytest.raises(DataError, match="not both"):
        run_prepare([text_file], tmp_path / "o", val=[str(text_file)], val_fraction=0.01)
    assert not (tmp_path / "o").exists()


def test_a_vocab_size_with_a_given_tokenizer_is_refused_not_ignored(tmp_path, capsys, text_file,
                                                                    prepared):  # fmt: skip
    tokenizer = prepared / "tokenizer.json"
    assert_one_line_error(prepare_cli(capsys, text_file, "--out", tmp_path / "o", "--tokenizer",
                                      tokenizer), r"--vocab-size .* with --tokenizer")
    assert not (tmp_path / "o").exists()
    code, _, _ = cli(capsys, "data", "prepare", "--no-progress", text_file, "--out",
                     tmp_path / "o", "--tokenizer", tokenizer, "--val-fraction", "0.2")
    assert code == 0 and load_manifest(tmp_path / "o")["vocab_size"] == 300


# ---- 6. --overwrite swaps in a complete directory ---------------------------------------


def test_overwrite_replaces_the_directory_only_when_the_new_one_is_complete(tmp_path, prepared,
                                                                            capsys):  # fmt: skip
    other = tmp_path / "other.txt"
    other.write_text("Completely different words now.\n\n" * 30)
    old_manifest = load_manifest(prepared)
    code, _, _ = prepare_cli(capsys, other, "--out", prepared, "--overwrite")
    assert code == 0
    new_manifest = verify_data_dir(prepared)
    assert new_manifest["sources"][0]["path"] == str(other)
    assert new_manifest["tokenizer_sha256"] != old_manifest["tokenizer_sha256"]
    assert siblings(prepared) == ["data", "in.txt", "other.txt"]


def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where, error", [("manifest", OSError), ("encoding", KeyboardInterrupt),
                                          ("swap", DataError)])  # fmt: skip
def test_a_failure_at_any_point_leaves_the_old_directory_byte_identical(tmp_path, prepared,
                                                                        monkeypatch, where, error):
    other = tmp_path / "other.txt"
    other.write_text("Completely different words now.\n\n" * 30)
    before, entries = snapshot(prepared), siblings(prepared)
    renames, real_rename = [], os.rename

    def rename(src, dst):  # the old directory goes aside, then moving the new one in fails
        if ".making-" in str(src):  # the stage taking its name, once locked
            return real_rename(src, dst)
        renames.append(src)
        return no_space() if len(renames) == 2 else real_rename(src, dst)

    monkeypatch.setattr(*{"manifest": (build, "write_json_atomic", no_space),
                          "encoding": (build, "_encode", interrupt),
                          "swap": (outdir.os, "rename", rename)}[where])  # fmt: skip
    with pytest.raises(error):
        run_prepare([other], prepared, overwrite=True)
    assert len(renames) == (3 if where == "swap" else 0)  # aside, (failed) in, back
    assert snapshot(prepared) == before
    assert siblings(prepared) == entries  # no staging or set-aside directory left behind


def test_a_bad_later_input_leaves_the_old_directory_byte_identical(tmp_path, prepared, capsys):
    good, bad = tmp_path / "good.txt", tmp_path / "zz-bad.txt"
    good.write_text(TEXT)
    bad.write_bytes(b"fine text\n" * 100 + b"\xff\xfe broken")
    before = snapshot(prepared)
    assert_one_line_error(prepare_cli(capsys, good, bad, "--out", prepared, "--overwrite"),
                          r"zz-bad\.txt: byte offset 1000 \(0xff\)")
    assert snapshot(prepared) == before
    assert siblings(prepared) == ["data", "good.txt", "in.txt", "zz-bad.txt"]


def test_bad_out_paths_are_one_line_errors(tmp_path, capsys, text_file):
    a_file = tmp_path / "a file.txt"
    a_file.write_text("keep me")
    assert_one_line_error(prepare_cli(capsys, text_file, "--out", a_file),
                          r"a file\.txt exists and is not a directory")
    assert_one_line_error(prepare_cli(capsys, text_file, "--out", a_file / "sub"),
                          r"is not a directory")
    assert a_file.read_text() == "keep me"
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            assert_one_line_error(prepare_cli(capsys, text_file, "--out", locked / "d"),
                                  r"cannot write in .*locked")
            assert_one_line_error(prepare_cli(capsys, text_file, "--out", locked,
                                              "--overwrite"), r"locked is not writable")
        finally:
            locked.chmod(0o755)
    elif Path("/sys/kernel").is_dir():  # a directory even root cannot create entries in
        assert_one_line_error(prepare_cli(capsys, text_file, "--out", "/sys/kernel/jtok-out"),
                              r"cannot (write in|create) /sys/kernel")


def test_an_empty_out_dir_is_filled_in_place_and_the_current_dir_never_swapped(
        tmp_path, text_file, monkeypatch, capsys):  # fmt: skip
    out = tmp_path / "empty"
    out.mkdir()
    inode = out.stat().st_ino
    run_prepare([text_file], out)
    assert out.stat().st_ino == inode  # kept (a mount point stays one), not replaced
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    assert siblings(out) == ["empty", "in.txt"]
    monkeypatch.chdir(out)
    before = snapshot(out)
    assert_one_line_error(prepare_cli(capsys, text_file, "--out", ".", "--overwrite"),
                          r"holds the current directory; --overwrite replaces it whole")
    assert snapshot(out) == before and out.stat().st_ino == inode


def test_paths_with_spaces_and_unicode_work(tmp_path, capsys):
    folder = tmp_path / "my dätä ✓"
    folder.mkdir()
    (folder / "café notes.txt").write_text(TEXT)
    out = folder / "out dir ü"
    code, out_text, _ = prepare_cli(capsys, folder / "café notes.txt", "--out", out)
    assert code == 0 and str(out) in out_text
    assert verify_data_dir(out)["sources"][0]["path"] == str(folder / "café notes.txt")
    code, _, _ = prepare_cli(capsys, folder / "*.txt", "--out", out, "--overwrite")
    assert code == 0 and siblings(out) == ["café notes.txt", "out dir ü"]


def test_a_run_keeps_validating_on_the_data_it_opened_when_the_directory_is_replaced(tmp_path):
    """`jtok data prepare --overwrite` during a run must not swap the run's validation text
    (the trainer opens the val split once, `open_validation`)."""
    from jtok.training.evaluate import open_validation

    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text(TEXT)
    second.write_text(TEXT.replace("fox", "cat").upper())
    out = tmp_path / "data"
    run_prepare([first], out, val_fraction=0.2)
    tokens, split_info = open_validation(out)
    before = np.array(tokens)
    run_prepare([second], out, val_fraction=0.3, overwrite=True)
    assert not np.array_equal(np.array(open_split(out, "val")), before)  # the new data differs
    assert np.array_equal(np.array(tokens), before)  # what the run opened does not
    assert split_info["tokens"] == len(before)  # and its manifest entry is the old one


def test_stages_of_killed_prepares_are_removed_and_live_ones_kept(tmp_path):
    """A killed prepare leaves its `.NAME.new-*` stage; the next prepare of NAME deletes
    the stages no live process holds (their flock died with their writer)."""
    text = tmp_path / "a.txt"
    text.write_text(TEXT)
    out = tmp_path / "data"
    stale, live = tmp_path / ".data.new-killed", tmp_path / ".data.new-working"
    for stage in (stale, live):
        stage.mkdir()
        (stage / "train.bin").write_bytes(b"partial")
    other = tmp_path / ".elsewhere.new-x"  # another output's stage: not ours
    other.mkdir()
    held = outdir._locked(live)  # a prepare still writing it
    try:
        messages = []
        run_prepare([text], out, log=messages.append)
    finally:
        os.close(held)
    assert not stale.exists() and live.is_dir() and other.is_dir()
    assert any(".data.new-killed" in m and "interrupted prepare" in m for m in messages)
    assert load_manifest(out)["splits"]["train"]["tokens"] > 0


def test_an_output_name_holding_the_stage_marker_gets_a_matching_stage(tmp_path, monkeypatch):
    """The stage's name is built from --out's name, not by replacing the marker in it:
    `.a.making-b.making-XXXX` must become `.a.making-b.new-XXXX` (what the stale-stage sweep
    of `a.making-b` looks for), not `.a.new-b.making-XXXX`."""
    text = tmp_path / "a.txt"
    text.write_text(TEXT)
    out = tmp_path / "a.making-b"
    stages, real_swap = [], outdir._swap_in

    def swap(stage, target, log):
        stages.append(stage.name)
        return real_swap(stage, target, log)

    monkeypatch.setattr(outdir, "_swap_in", swap)
    run_prepare([text], out)
    assert len(stages) == 1 and stages[0].startswith(".a.making-b.new-"), stages
    assert load_manifest(out)["splits"]["train"]["tokens"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.making-b", "a.txt"]

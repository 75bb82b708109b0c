"""How `jtok data prepare` splits documents into train and val (`--val-fraction`): by a hash
of (seed, index), and when nothing is drawn, from the last document without letting val take
most of the data."""

import pytest
from test_data import PARAGRAPHS, decoded_documents, run_prepare, write_jsonl

from jtok.data.build import MIN_CUT_VAL_CHARS


def test_the_split_is_a_function_of_seed_and_both_splits_are_never_empty(tmp_path):
    rows = [{"text": f"document number {i}. {PARAGRAPHS[i % 3]}"} for i in range(200)]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    first = run_prepare([path], tmp_path / "a", val_fraction=0.1, seed=3)
    again = run_prepare([path], tmp_path / "b", val_fraction=0.1, seed=3)
    other = run_prepare([path], tmp_path / "c", val_fraction=0.1, seed=4)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first["splits"] == again["splits"]
    assert set(decoded_documents(tmp_path / "a", "val")) != set(
        decoded_documents(tmp_path / "c", "val"))  # fmt: skip
    for manifest in (first, other):
        assert 5 <= manifest["splits"]["val"]["documents"] <= 40  # ~20 expected

    # No document draws val at fraction 0, and the last is short: it is held out whole.
    few = write_jsonl(tmp_path / "few.jsonl", rows[:3])
    manifest = run_prepare([few], tmp_path / "d", val_fraction=0.0)
    assert manifest["splits"]["train"]["documents"] == 2
    assert decoded_documents(tmp_path / "d", "val") == [rows[2]["text"]]


def test_a_long_last_document_is_cut_so_val_stays_near_the_asked_fraction(tmp_path):
    # Two documents, the second 1,000x the first: holding the second out whole would put
    # 99.9% of the text in val. No document draws val here (only document 1 could, at 3%).
    short = "A short opening note."
    long = " ".join(PARAGRAPHS[i % 3] for i in range(1000))
    path = write_jsonl(tmp_path / "two.jsonl", [{"text": short}, {"text": long}])
    manifest = run_prepare([path], tmp_path / "out", val_fraction=0.03, seed=0)
    share = round((len(short) + len(long)) * 0.03)
    assert share > MIN_CUT_VAL_CHARS
    (val,) = decoded_documents(tmp_path / "out", "val")
    cut = len(long) - share
    cut = max(long.rfind(" ", 0, cut), long.rfind("\n", 0, cut)) + 1  # back to a word start
    assert val == long[cut:] and share <= len(val) < share + 20
    assert decoded_documents(tmp_path / "out", "train") == [short, long[:cut]]
    assert manifest["splits"]["val"]["documents"] == 1
    # A last document no longer than twice the asked share goes to val whole.
    path = write_jsonl(tmp_path / "even.jsonl", [{"text": long}, {"text": short}])
    run_prepare([path], tmp_path / "whole", val_fraction=0.03, seed=0)
    assert decoded_documents(tmp_path / "whole", "val") == [short]


@pytest.mark.parametrize("case", ["no spaces", "trailing whitespace", "lone, no spaces"])
def test_a_cut_without_nearby_spaces_or_before_trailing_space_keeps_the_share(case):
    from jtok.data.build import MAX_WORD_BACKOFF, _assign_splits

    body = "标题 " + "字" * 60_000  # one space, far before the cut
    docs = {"no spaces": ["第一篇短文。", body],
            "trailing whitespace": ["short doc", "word " * 4000 + "\n" * 1500],
            "lone, no spaces": [body]}[case]
    (*train, val) = list(_assign_splits(iter(docs), seed=0, val_fraction=0.03))
    assert [s for s, _ in train] == ["train"] * len(train) and val[0] == "val"
    assert "".join(t for _, t in train) + val[1] == "".join(docs)  # nothing lost or doubled
    total = sum(map(len, docs))
    share = len(docs[-1]) * 0.03 if len(docs) == 1 else max(MIN_CUT_VAL_CHARS, total * 0.03)
    kept = val[1].rstrip()
    assert kept.strip() and abs(len(kept) - share) <= MAX_WORD_BACKOFF + 1, len(kept)
    assert train[-1][1].strip()

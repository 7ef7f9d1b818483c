"""Your own text as train.bin / val.bin token files (same format as data/shakespeare).

    python data/text/prepare.py --input notes.txt
    python data/text/prepare.py --input books/ more/extra.txt --out_dir data/mybooks --model checkpoints/my-model

Each file is one document: [bos] ids <|endoftext|>. Directories are searched recursively for files
matching --pattern. With two or more documents, whole documents are held out for validation, taken
from the end of the list (files in the order given, directories sorted) until they hold
--val_fraction of the characters; with one document, its last --val_fraction (cut at a line break)
is the validation text.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: find the project modules
import assets
from convert import ensure_default_model
from errors import ArgumentParser, UserError, cli
from tokenizer import Tokenizer


def find_files(inputs, pattern="*.txt") -> list[Path]:
    files = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(f for f in p.rglob(pattern) if f.is_file())
            if not found:
                raise UserError(f"no files matching {pattern!r} in {p}; pass files directly or set --pattern")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"input {p} not found; pass existing text files or directories with --input")
    return files


def read_documents(files) -> dict[str, str]:
    docs = {}
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{f} is not UTF-8 text (byte {e.start}); convert it, e.g. iconv -t UTF-8") from None
        if text.strip():
            docs[str(f)] = text
        else:
            print(f"skipping empty file {f}")
    if not docs:
        raise UserError("all input files are empty")
    return docs


def split_documents(docs: dict[str, str], val_fraction: float) -> tuple[dict[str, str], dict[str, str]]:
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    names = list(docs)
    if len(names) == 1:
        name, text = names[0], docs[names[0]]
        cut = text.find("\n", int(len(text) * (1 - val_fraction)))
        cut = int(len(text) * (1 - val_fraction)) if cut < 0 else cut + 1
        if cut <= 0 or cut >= len(text):
            raise UserError(f"{name} is too short to split into training and validation text")
        return {f"{name} (start)": text[:cut]}, {f"{name} (end)": text[cut:]}
    # whole documents for validation, from the end, at least one and never all
    total, val_chars, n_val = sum(map(len, docs.values())), 0, 0
    while n_val < len(names) - 1 and val_chars < val_fraction * total:
        n_val += 1
        val_chars += len(docs[names[-n_val]])
    return {n: docs[n] for n in names[:-n_val]}, {n: docs[n] for n in names[-n_val:]}


def prepare(tokenizer, inputs, out_dir=Path(__file__).resolve().parent, val_fraction=0.1, pattern="*.txt") -> dict:
    t0 = time.time()
    train, val = split_documents(read_documents(find_files(inputs, pattern)), val_fraction)
    meta = assets.write_dataset(out_dir, tokenizer, train, val, train_docs=list(train), val_docs=list(val),
                                source=[str(p) for p in inputs])
    print(f"{len(train)} training document(s), {len(val)} validation document(s): {', '.join(val)}")
    print(f"tokenizer {tokenizer.name} ({tokenizer.fingerprint}), {meta['dtype']} ids")
    print(f"train has {meta['train_tokens']:,} tokens, val has {meta['val_tokens']:,} tokens")
    print(f"wrote train.bin, val.bin and meta.json to {os.path.relpath(out_dir)} in {time.time() - t0:.1f} s")
    return meta


def main():
    parser = ArgumentParser(__doc__)
    parser.add_argument("--input", nargs="+", required=True, help="text files and/or directories of text files")
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parent,
                        help="where train.bin, val.bin and meta.json go (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=assets.DEFAULT_MODEL_DIR,
                        help="converted model directory whose tokenizer to use (default: %(default)s)")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share of the text held out for validation")
    parser.add_argument("--pattern", default="*.txt", help="which files to take from directories (default: %(default)s)")
    args = parser.parse_args()
    # wrong arguments fail now, before any model is loaded or converted
    find_files(args.input, args.pattern)
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if args.model.resolve() == assets.DEFAULT_MODEL_DIR:
        ensure_default_model()
    prepare(Tokenizer.load(args.model), args.input, args.out_dir, args.val_fraction, args.pattern)


if __name__ == "__main__":
    cli(main)

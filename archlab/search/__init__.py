"""The literature search engine of lesson 4 card 5, as archlab's application layer.

A query and every document are embedded into one space by archlab's BERT with the real all-MiniLM-L6-v2
weights; an ANN index (FAISS: exact, HNSW or IVF-PQ) returns the top ``K``; BM25 (bm25s) can be fused
in (reciprocal rank fusion); a cross-encoder re-ranks; a small decoder explains::

    corpus.py     documents and evaluation sets (BEIR layout, JSONL, text; the built-in stdlib corpus)
    encode.py     document vectors, batched, resumable and shardable over torchrun processes
    index.py      FAISS indexes and the index folder's manifest
    lexical.py    BM25 through bm25s
    fuse.py       reciprocal rank fusion
    evaluate.py   nDCG@10, recall@100, MRR@10 through ir-measures; TREC run files
    engine.py     SearchEngine: opens an index folder and runs the stages
    rerank.py     cross-encoder re-ranking          explain.py  evidence + decoder explanations
    serve.py      the web page                      cli.py      ``archlab search ...``

Importing this package is cheap; FAISS, bm25s and the models load when first used.
"""

from archlab.search.corpus import Document
from archlab.search.engine import Hit, SearchEngine, SearchResult

__all__ = ["Document", "Hit", "SearchEngine", "SearchResult"]

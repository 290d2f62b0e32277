"""PanFoMa's data room: everything between raw single-cell files and the tokenized cells a training loop consumes.

It owns the PanFoMaBench dataset builder (study table, reader, quality control, splits, writer), the one loader of a
built dataset (in memory or streamed, sharded per process), the one synthetic-data generator used by tests, the demo
and benchmarks, and readers of external stores. The model (``panfoma``) and the gene tokenizer
(``panfoma.tokenization``) know nothing about files; this package knows nothing about models.
"""

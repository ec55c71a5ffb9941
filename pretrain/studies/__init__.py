"""Studies behind the scripts of the same names in scripts/: each ``main(argv)`` runs one protocol end to end.

``objectives`` (compare_objectives.py: MLM vs SpanBERT vs ELECTRA) and ``archs`` (compare_archs.py: BERT vs RoBERTa
vs ModernBERT), both tables of arms run by ``arms`` (the shared machinery), ``ewc`` (compare_ewc.py: continued
pretraining with EWC), ``decoupling`` (compare_decoupling.py: DESIGN.md §4 quality protocol), ``demo_check``
(demo_check.py: a run's export loaded through stock transformers).
"""

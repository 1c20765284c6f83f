"""Text and facts: where the words come from, how they are cut, and how a model is scored on them.

    corpus      text sources: Debian handbook, a text file, wikitext2, c4 (load_text)
    windows     tokenising and disjoint calibration / evaluation windows (split_corpus)
    facts       cloze facts: offline, JSONL, FreebaseQA (load_facts)
    knowledge   answer-balanced retention and accuracy, majority-answer baselines
    evaluation  perplexity, per-window NLL, fact scoring, retention

`python -m prune_env.data fetch [SOURCE]` fills the text cache once (`make setup` runs it).
"""

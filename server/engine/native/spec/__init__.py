"""Speculative decoding for the native engine: `config.py` (--speculative-config), `proposer.py`
(the interface drafting methods implement), `ngram.py` and `draft_model.py` (proposers),
`rejection.py` (verification: greedy and sampled rejection sampling), `engine.py` (the glue the
engine core calls)."""

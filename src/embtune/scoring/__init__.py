"""Teacher scores for distillation: `embtune score` adds ``pos_scores`` / ``neg_scores``.

* ``teachers.py``: the two teacher kinds (a cross-encoder, a bi-encoder) behind one call,
  ``score_pairs(queries, passages)``, and the choice of kind from a model folder;
* ``cache.py``: every computed score kept in SQLite, keyed by teacher and texts;
* ``pairs.py``: the distinct pairs of the rows scored in length-sorted batches through it;
* ``rows.py``: the rows read (every field kept, in order) and written back with scores.
"""

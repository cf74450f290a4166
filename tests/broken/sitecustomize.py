"""A deliberately broken app for negative tests, in child processes only: a test puts this folder on
PYTHONPATH and names the breakage in FEDLORA_TEST_BREAK.

same-half: every training process trains on rank 0's part of each batch (app.model.batch_part), so
a node's training processes together see half of every batch, twice.
"""

import os

if os.environ.get("FEDLORA_TEST_BREAK") == "same-half":
    from app import model

    _part = model.batch_part
    model.batch_part = lambda batch_size, processes, rank: _part(batch_size, processes, 0)

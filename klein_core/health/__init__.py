"""Training health: the run history stored in run.json, preview image statistics, collapse detection, advice,
the best checkpoint, the checkpoint monitor, likeness scores and the training report.
"""

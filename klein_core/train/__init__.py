"""The training layer: the training configuration, the flow-matching objective, the training loop and its run
folder, the dose planner (repeats per image) and the memory/time estimate.
"""

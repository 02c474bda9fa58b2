"""Pruning models too large to hold twice: one decoder layer at a time, straight from a checkpoint.

The plan is made on a model built on the ``meta`` device (the dependency graph needs shapes, not
values); the values come from the checkpoint's safetensors shards only when a stage needs them:
calibration statistics one layer at a time (:mod:`.layer_loop`), scores one tensor at a time
(:mod:`.session`), and the surgery and verification one layer at a time again (:mod:`.surgery`),
written shard by shard (:mod:`.writer`). :func:`prune_pretrained` wires it together.
"""

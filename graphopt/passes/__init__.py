"""Graph rewrite passes that consume a Plan (one pass per file).

Empty for now: the only rewrite, splitting the joint graph with the chosen saved set,
is `torch_private.split_joint_graph`. Offload/quantize lowering, sparse-backward pruning
and reordering will live here.
"""

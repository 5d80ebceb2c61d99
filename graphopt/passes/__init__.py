"""Graph rewrite passes (one pass per file).

- `prune_frozen`: drops what only frozen parameters/channels needed from the joint graph
  (``trainable=``), before analysis.
- `optimizer_in_backward`: the in-backward parameter updates (``optimizer=``) and their
  place in each split.
- `lower_saves` with `quantize` and `offload`: lowers the plan's quantize/offload
  decisions into a copy of the joint graph before the split.
- `reorder`: memory-aware order of the split graphs (``reorder=True``).

Splitting the joint graph with the chosen saved set is `torch_private.split_joint_graph`.
"""

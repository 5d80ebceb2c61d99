"""Chunk the head and its cross-entropy: rewrite a Dynamo graph's ``linear -> cross_entropy``
region into ``chunked_linear_cross_entropy`` (graphopt/ops), so the logits never exist whole.

Recognised (in the graph Dynamo captures, before AOTAutograd):

    logits = linear(hidden, weight[, bias])           # torch.nn.functional.linear / nn.Linear
    logits = logits[..., :-1, :]                      # any slicing that leaves the last dim whole
    logits = logits.float() / .to(dtype) / .contiguous()
    logits = logits.view(-1, vocab) / .reshape(...)   # to (tokens, vocab)
    loss = cross_entropy(logits, labels, ignore_index=..., reduction="mean" | "sum")

in any order of the middle steps, each reading only the previous one. Hugging Face's
causal LMs (``ForCausalLMLoss``: upcast, ``view(-1, V)``, shifted labels) and the
hand-written losses of examples/ match. Not recognised: class weights, label smoothing,
``reduction="none"``, ``log_softmax`` + ``nll_loss``, a head written as ``h @ W.T``, logits
of more than two dimensions given to the loss (``(batch, vocab, seq)``), and regions
whose logits are read by anything besides the loss (a model that returns its logits, as
a Hugging Face model's output does): the logits exist whole there anyway
(``LossRegion.unchunkable``).

The pass only rewrites; how many chunks (if any) is the planner's decision
(graphopt/chunking.py).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode

from .. import torch_private
from ..ops.chunked_cross_entropy import chunked_linear_cross_entropy

_CROSS_ENTROPY = (torch.nn.functional.cross_entropy,)
_DTYPE_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}
_VIEW_METHODS = ("view", "reshape")


@dataclasses.dataclass(frozen=True)
class LossRegion:
    """One recognised head + cross-entropy, by node names of the graph it was found in."""

    loss: str  # the cross_entropy node
    linear: str  # the head's linear node
    hidden: str
    weight: str
    bias: str | None
    labels: str
    slicing: tuple[object, ...]  # getitem indices applied to the logits, in order
    ignore_index: int
    reduction: str
    logits_dtype: torch.dtype  # of the logits the loss reads
    tokens: int  # rows of the loss
    vocab: int
    hidden_size: int
    weight_dtype: torch.dtype
    module: str  # the head's module path, for the plan ("lm_head")
    unchunkable: str | None = None  # why it cannot be chunked, or None

    @property
    def logits_bytes(self) -> int:
        """Bytes of the logits the loss reads (after any upcast): the tensor chunking splits."""
        return self.tokens * self.vocab * self.logits_dtype.itemsize

    @property
    def label(self) -> str:
        return f"{self.module or self.linear}+cross_entropy"


@dataclasses.dataclass(frozen=True)
class ChunkLossResult:
    """A rewritten copy of the graph and the regions it chunked (name -> chunks)."""

    graph_module: fx.GraphModule
    chunked: dict[str, int]


def find_loss_regions(graph_module: fx.GraphModule) -> list[LossRegion]:
    """Every head + cross-entropy region of a Dynamo graph, chunkable or not."""
    regions = []
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in _CROSS_ENTROPY:
            region = _region_of(node)
            if region is not None:
                regions.append(region)
    return regions


def chunk_loss(graph_module: fx.GraphModule, chunks: Mapping[str, int]) -> ChunkLossResult:
    """A copy of `graph_module` with each region named in `chunks` (by its loss node)
    computed in that many chunks; regions with 1 chunk, or unchunkable, are left as they are."""
    rewritten, by_name = torch_private.copy_dynamo_graph_module(graph_module)
    graph = rewritten.graph
    done = {}
    for region in find_loss_regions(graph_module):
        count = chunks.get(region.loss, 1)
        if count <= 1 or region.unchunkable:
            continue
        _rewrite(graph, by_name, region, count)
        done[region.loss] = count
    graph.eliminate_dead_code()
    rewritten.recompile()
    return ChunkLossResult(rewritten, done)


def _rewrite(graph: fx.Graph, by_name: dict[str, fx.Node], region: LossRegion, chunks: int) -> None:
    loss = by_name[region.loss]
    linear = by_name[region.linear]
    with graph.inserting_before(loss):
        hidden = by_name[region.hidden]
        for index in region.slicing:  # the head acts on the last dim: slicing commutes with it
            hidden = graph.call_function(operator.getitem, (hidden, index))
            hidden.meta = dict(linear.meta)
        bias = by_name[region.bias] if region.bias is not None else None
        chunked = graph.call_function(
            chunked_linear_cross_entropy,
            (hidden, by_name[region.weight], bias, by_name[region.labels]),
            {
                "chunks": chunks,
                "ignore_index": region.ignore_index,
                "reduction": region.reduction,
                "logits_dtype": region.logits_dtype,
            },
        )
    chunked.meta = {**loss.meta, **{k: v for k, v in linear.meta.items() if k in ("nn_module_stack", "stack_trace")}}
    loss.replace_all_uses_with(chunked)
    graph.erase_node(loss)


def _region_of(loss: fx.Node) -> LossRegion | None:
    """The region ending in `loss`, or None when its input is not a head's logits."""
    if len(loss.args) < 2 or not isinstance(loss.args[0], fx.Node) or not isinstance(loss.args[1], fx.Node):
        return None
    options = _cross_entropy_options(loss)
    chain = []  # loss input back to the linear
    node = loss.args[0]
    slicing = []
    while not (torch_private.is_linear_call(node)):
        step = _step_input(node)
        if step is None:
            return None
        chain.append(node)
        if node.target is operator.getitem:
            slicing.append(node.args[1])
        node = step
    linear = node
    chain.append(linear)
    hidden, weight = linear.args[0], linear.args[1]
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    if not all(isinstance(n, fx.Node) for n in (hidden, weight)) or not (bias is None or isinstance(bias, fx.Node)):
        return None
    logits = _example(loss.args[0])
    labels = _example(loss.args[1])
    if _example(weight) is None or _example(weight).dim() != 2:
        return None
    if logits is None or labels is None or logits.dim() != 2 or labels.numel() != logits.shape[0]:
        return None
    unchunkable = options.pop("unchunkable", None) or _escapes(chain, loss)
    return LossRegion(
        loss=loss.name,
        linear=linear.name,
        hidden=hidden.name,
        weight=weight.name,
        bias=bias.name if bias is not None else None,
        labels=loss.args[1].name,
        slicing=tuple(reversed(slicing)),
        ignore_index=options["ignore_index"],
        reduction=options["reduction"],
        logits_dtype=logits.dtype,
        tokens=int(logits.shape[0]),
        vocab=int(logits.shape[1]),
        hidden_size=int(_example(weight).shape[-1]),
        weight_dtype=_example(weight).dtype,
        module=_module_path(linear),
        unchunkable=unchunkable,
    )


def _cross_entropy_options(loss: fx.Node) -> dict:
    """ignore_index and reduction of a cross_entropy call, and why it cannot be chunked
    (class weights, label smoothing, a reduction other than mean or sum)."""
    names = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
    given = {**dict(zip(names, loss.args)), **loss.kwargs}
    options = {"ignore_index": int(given.get("ignore_index", -100)), "reduction": given.get("reduction", "mean")}
    if given.get("weight") is not None:
        options["unchunkable"] = "the loss has class weights"
    elif given.get("label_smoothing", 0.0):
        options["unchunkable"] = "the loss smooths its labels"
    elif given.get("size_average") is not None or given.get("reduce") is not None:
        options["unchunkable"] = "the loss uses the deprecated size_average/reduce arguments"
    elif options["reduction"] not in ("mean", "sum"):
        options["unchunkable"] = f"reduction={options['reduction']!r} (only mean and sum are chunked)"
    return options


def _step_input(node: fx.Node) -> fx.Node | None:
    """What a cast, view or slice of the logits reads, or None for any other op."""
    if node.op == "call_method" and node.args and isinstance(node.args[0], fx.Node):
        if node.target in _DTYPE_METHODS or node.target == "contiguous":
            return node.args[0]
        if node.target == "to" and _is_cast(node):
            return node.args[0]
        if node.target in _VIEW_METHODS and _keeps_last_dim(node):
            return node.args[0]
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        if _slices_leading_dims(node):
            return node.args[0]
    return None


def _is_cast(node: fx.Node) -> bool:
    """``.to(dtype)`` with nothing else (no device, no copy flags)."""
    values = list(node.args[1:]) + list(node.kwargs.values())
    return len(values) == 1 and isinstance(values[0], torch.dtype)


def _keeps_last_dim(node: fx.Node) -> bool:
    before, after = _example(node.args[0]), _example(node)
    return before is not None and after is not None and after.dim() >= 1 and after.shape[-1] == before.shape[-1]


def _slices_leading_dims(node: fx.Node) -> bool:
    """A getitem of slices (at most one Ellipsis) that leaves the last dim whole."""
    before, after = _example(node.args[0]), _example(node)
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if before is None or after is None or after.dim() != before.dim():
        return False
    if not all(isinstance(i, slice) or i is Ellipsis for i in index) or sum(i is Ellipsis for i in index) > 1:
        return False
    explicit = [i for i in index if i is not Ellipsis]
    if len(explicit) > before.dim():
        return False
    filler = [slice(None)] * (before.dim() - len(explicit))
    if Ellipsis in index:
        at = index.index(Ellipsis)
        per_dim = list(index[:at]) + filler + list(index[at + 1 :])
    else:
        per_dim = explicit + filler
    last = per_dim[-1]
    return last.start in (None, 0) and last.stop is None and last.step in (None, 1) and after.shape[-1] == before.shape[-1]


def _escapes(chain: list[fx.Node], loss: fx.Node) -> str | None:
    """Why the logits cannot be chunked away: a step of the chain read besides the loss."""
    readers = {node: [user for user in node.users] for node in chain}
    for node in chain:
        expected = loss if node is chain[0] else chain[chain.index(node) - 1]
        others = [user for user in readers[node] if user is not expected]
        if others:
            if any(user.op == "output" for user in others):
                return (
                    "the logits are also returned by the model (a Hugging Face model's output holds them), "
                    "so they exist whole anyway; return only the loss to let graphopt chunk them"
                )
            return f"the logits are also read by {others[0].name}"
    return None


def _example(node: object) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _module_path(node: fx.Node) -> str:
    from ..planner import module_path  # the plan's naming of modules

    return module_path(node)


# ----------------------------------------------------------------------------- offline tracing


@dataclasses.dataclass(frozen=True)
class _Head:
    """A tensor computed from a head's linear by casts, views and slices (the logits)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    slicing: tuple[object, ...]


_TENSOR_STEPS = {torch.Tensor.float, torch.Tensor.to, torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.contiguous, torch.Tensor.__getitem__}


class ChunkLossMode(TorchFunctionMode):
    """The same rewrite where there is no Dynamo graph (``graphopt plan`` traces the model
    itself on fake tensors): while the model runs, a ``cross_entropy`` whose input is a
    head's logits, by the steps this module's docstring lists, runs as
    ``chunked_linear_cross_entropy`` in `chunks` chunks. With ``chunks=1`` nothing is
    rewritten; either way ``regions`` lists what was found. The head's own matmul still
    runs, unread, and dead-code elimination drops it. Logits read by anything besides
    the loss would stay whole; the step ``graphopt plan`` traces returns only the loss,
    so only a model that reads its own logits elsewhere does that (not detected here)."""

    def __init__(self, chunks: int, parameter_names: Mapping[int, str]):
        super().__init__()
        self.chunks = chunks
        self.regions: list[LossRegion] = []
        self._parameter_names = parameter_names  # id of a parameter tensor -> its name
        self._heads: dict[int, tuple[torch.Tensor, _Head]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CROSS_ENTROPY and args and id(args[0]) in self._heads:
            rewritten = self._cross_entropy(args, kwargs)
            if rewritten is not None:
                return rewritten
        result = func(*args, **kwargs)
        if torch_private.is_linear_function(func) and isinstance(result, torch.Tensor):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            self._track(result, _Head(args[0], args[1], bias, ()))
        elif func in _TENSOR_STEPS and args and id(args[0]) in self._heads and isinstance(result, torch.Tensor):
            self._step(func, args, kwargs, result)
        return result

    def _track(self, tensor: torch.Tensor, head: _Head) -> None:
        self._heads[id(tensor)] = (tensor, head)  # holding the tensor keeps its id unique

    def _step(self, func, args, kwargs, result: torch.Tensor) -> None:
        source, head = self._heads[id(args[0])]
        if result.shape[-1] != source.shape[-1]:
            return
        if func is torch.Tensor.__getitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if result.dim() != source.dim() or not all(isinstance(i, slice) or i is Ellipsis for i in index):
                return
            head = dataclasses.replace(head, slicing=head.slicing + (args[1],))
        elif func is torch.Tensor.to and not (len(args) + len(kwargs) == 2 and result.device == source.device):
            return
        self._track(result, head)

    def _cross_entropy(self, args, kwargs) -> torch.Tensor | None:
        logits, labels = args[0], args[1] if len(args) > 1 else kwargs.get("target")
        _, head = self._heads[id(logits)]
        names = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
        given = {**dict(zip(names, args)), **kwargs}
        unchunkable = (
            "class weights, label smoothing or an unchunked reduction"
            if given.get("weight") is not None or given.get("label_smoothing", 0.0) or given.get("size_average") is not None
            or given.get("reduce") is not None or given.get("reduction", "mean") not in ("mean", "sum")
            else None
        )
        if logits.dim() != 2 or not isinstance(labels, torch.Tensor) or labels.numel() != logits.shape[0]:
            return None
        name = self._parameter_names.get(id(head.weight), "")
        region = LossRegion(
            loss="cross_entropy", linear="linear", hidden="", weight=name, bias=None, labels="",
            slicing=head.slicing, ignore_index=int(given.get("ignore_index", -100)), reduction=given.get("reduction", "mean"),
            logits_dtype=logits.dtype, tokens=int(logits.shape[0]), vocab=int(logits.shape[1]),
            hidden_size=int(head.weight.shape[-1]), weight_dtype=head.weight.dtype,
            module=name.rpartition(".")[0], unchunkable=unchunkable,
        )  # fmt: skip
        self.regions.append(region)
        if self.chunks <= 1 or unchunkable:
            return None
        hidden = head.hidden
        for index in head.slicing:
            hidden = hidden[index]
        return chunked_linear_cross_entropy(
            hidden, head.weight, head.bias, labels, chunks=self.chunks, ignore_index=region.ignore_index,
            reduction=region.reduction, logits_dtype=logits.dtype,
        )  # fmt: skip


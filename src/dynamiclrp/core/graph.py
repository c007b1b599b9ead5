"""Read-only view of an autograd graph.

This is the only module that touches torch-private attributes of autograd nodes (``_saved_*`` fields,
``_input_metadata``, ``variable``, ``_forward_cls``, node class names). A new torch version that renames one of
them is fixed here.

Vocabulary
----------
node
    An autograd ``Node`` (``tensor.grad_fn`` or an ``AccumulateGrad`` leaf accumulator).
slot
    One forward *output* of a node, numbered globally. A node with ``k`` forward outputs (``Split``,
    ``Unbind``...) owns ``k`` consecutive slots. Relevance and forward values live on slots.
edge
    Input ``i`` of a node: the slot that produced that forward input, or ``None`` when the input did not
    require grad (a constant, a frozen parameter, integer indices...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import GraphFreedError

Node = Any  # torch.autograd.graph.Node; typed loosely because C++ node classes are generated per op
GradientEdge = torch.autograd.graph.GradientEdge

_FREED_MARKERS = ("backward through the graph a second time", "after they have already been freed")
_FREED_HELP = (
    "The saved tensors of this autograd graph were freed by an earlier backward() or autograd.grad() call "
    "made without retain_graph=True, so the forward values relevance rules need are gone. Explain before "
    "calling backward(), call backward(retain_graph=True), or run the forward pass again."
)


# ---------------------------------------------------------------------------------------------------------
# torch-private accessors
# ---------------------------------------------------------------------------------------------------------
def node_type(node: Node) -> str:
    """The autograd class name of ``node``, e.g. ``"AddmmBackward0"`` or ``"MyFunctionBackward"``."""
    return type(node).__name__


def forward_op_name(node: Node) -> str:
    """A readable name of the forward operation that created ``node``.

    For a custom ``torch.autograd.Function`` this is the function's qualified class name, otherwise the
    aten-style op name derived from the node type (``AddmmBackward0`` -> ``addmm``).
    """
    cls = getattr(node, "_forward_cls", None)
    if cls is not None:
        return f"{cls.__module__}.{cls.__qualname__} (a custom torch.autograd.Function)"
    name = node_type(node)
    base = name.split("Backward")[0] if "Backward" in name else name
    out = []
    for i, ch in enumerate(base):
        if ch.isupper() and i and base[i - 1].islower():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def forward_cls(node: Node) -> type | None:
    """The ``torch.autograd.Function`` class of a custom Function's node, ``None`` for built-in ops."""
    return getattr(node, "_forward_cls", None)


def view_base(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``t`` is a view of (``None`` when it is not a view)."""
    return t._base


def storage_key(t: torch.Tensor) -> int:
    """An identifier of ``t``'s storage (tensors that share memory share it)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # pragma: no cover - tensors without storage
        return -1


def wrapped_node(node: Node) -> Node | None:
    """The in-place op's own node that a ``CopySlices`` node applies to the written view (``None`` when this torch
    does not expose it)."""
    return getattr(node, "_wrapped_node", None)


def is_node(obj: Any) -> bool:
    """Whether ``obj`` is an autograd node (a ``grad_fn`` or an ``AccumulateGrad``)."""
    return hasattr(obj, "next_functions")


def function_attr(node: Node, name: str) -> Any:
    """An attribute a custom ``torch.autograd.Function`` stored on its context (``ctx.name = ...``)."""
    return getattr(node, name)


def is_custom_function(node: Node) -> bool:
    """Whether ``node`` belongs to a Python ``torch.autograd.Function``."""
    return getattr(node, "_forward_cls", None) is not None


def saved(node: Node, field: str) -> Any:
    """Return the saved field ``field`` of ``node`` (``None`` when autograd did not save it).

    Raises
    ------
    GraphFreedError
        When the graph's saved tensors were released by an earlier backward pass.

    Notes
    -----
    ``"saved_tensors.K"`` reads ``ctx.saved_tensors[K]`` of a custom ``torch.autograd.Function`` node (so registry
    rows for custom Functions can name their saved inputs like built-in fields).
    """
    if field.startswith("saved_tensors."):
        if not is_custom_function(node):
            return None
        tensors = custom_saved_tensors(node)
        k = int(field[len("saved_tensors."):])
        return tensors[k] if k < len(tensors) else None
    try:
        return _signed(getattr(node, "_saved_" + field))
    except RuntimeError as err:
        if any(marker in str(err) for marker in _FREED_MARKERS):
            raise GraphFreedError(_FREED_HELP) from None
        raise
    except AttributeError:
        return None


def _signed(v: Any) -> Any:
    # some integer fields (e.g. CatBackward0's dim) come back as unsigned 64-bit: -1 reads 2**64 - 1
    if isinstance(v, int) and not isinstance(v, bool) and v >= 2 ** 63:
        return v - 2 ** 64
    if isinstance(v, tuple) and v and isinstance(v[0], int):
        return tuple(_signed(x) for x in v)
    return v


def custom_saved_tensors(node: Node) -> tuple[torch.Tensor, ...]:
    """``ctx.saved_tensors`` of a custom autograd Function node."""
    try:
        return tuple(node.saved_tensors)
    except RuntimeError as err:
        if any(marker in str(err) for marker in _FREED_MARKERS):
            raise GraphFreedError(_FREED_HELP) from None
        raise


def leaf_tensor(node: Node) -> torch.Tensor:
    """The tensor an ``AccumulateGrad`` node accumulates into."""
    return node.variable


@dataclass(frozen=True)
class OutputMeta:
    """Shape, dtype and device of one forward output of a node."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


def output_meta(node: Node) -> tuple[OutputMeta, ...]:
    """Metadata of every forward output of ``node`` (autograd calls these the node's *input* metadata)."""
    return tuple(OutputMeta(torch.Size(m.shape), m.dtype, m.device) for m in node._input_metadata)


def next_edges(node: Node) -> tuple:
    """``node.next_functions``: one ``(child_node or None, output_nr)`` pair per forward input."""
    return node.next_functions


def call_backward(node: Node, grads: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
    """Apply ``node``'s own backward formula to ``grads`` (one per forward output).

    Calling a node directly runs its C++ (or Python) backward without the autograd engine: no hooks run and
    no saved tensor is released. Unlike the engine, a direct call does not reduce broadcast gradients or cast
    dtypes; callers reduce with :func:`fit_to`.
    """
    try:
        out = node.apply(*grads) if is_custom_function(node) else node(*grads)
    except RuntimeError as err:
        if any(marker in str(err) for marker in _FREED_MARKERS):
            raise GraphFreedError(_FREED_HELP) from None
        raise
    if isinstance(out, torch.Tensor) or out is None:
        return (out,)
    return tuple(out)


def gradient_edge(tensor: torch.Tensor) -> tuple[Node, int] | None:
    """The ``(node, output_nr)`` that produced ``tensor`` in the graph, or ``None`` if it is not in one."""
    if tensor.grad_fn is not None:
        return tensor.grad_fn, tensor.output_nr
    if not tensor.requires_grad:
        return None
    edge = torch.autograd.graph.get_gradient_edge(tensor)
    return edge.node, edge.output_nr


def _fingerprint(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype)
    if isinstance(v, (list, tuple)):
        return tuple(_fingerprint(x) for x in v)
    return v


def fit_to(t: torch.Tensor, shape: torch.Size, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum a broadcast tensor back to ``shape`` (and cast to ``dtype``), as the autograd engine does."""
    if t.shape != shape:
        t = t.sum_to_size(shape) if t.dim() >= len(shape) else t.expand(shape)
        if t.shape != shape:  # pragma: no cover - defensive
            t = t.reshape(shape)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t


# ---------------------------------------------------------------------------------------------------------
# Graph view
# ---------------------------------------------------------------------------------------------------------
class GraphView:
    """Adjacency, slots and a topological order of the graph reachable from ``roots``.

    Built iteratively (no recursion limit). Node ``i`` owns slots ``slot_base[i] .. slot_base[i] + n_out[i]``.

    Attributes
    ----------
    nodes : list
        Autograd nodes in discovery order.
    types : list of str
        ``node_type`` of each node.
    edges : list of tuple
        Per node, one entry per forward input: the producing slot id, or ``-1`` for a ``None`` edge.
    slot_node, slot_nr : list of int
        For each slot, the node that owns it and its output number.
    consumers : list of list of (int, int)
        For each slot, every ``(node, input position)`` that consumed it (with multiplicity).
    order : list of int
        Nodes in processing order for relevance: every consumer before its producers (Kahn's algorithm
        with a stack, the paper's depth-first traversal heuristic).
    """

    __slots__ = (
        "nodes", "types", "edges", "slot_base", "n_out", "slot_node", "slot_nr", "consumers", "order",
        "root_slots", "_index", "out_shapes",
    )

    def __init__(self, roots: Sequence[tuple[Node, int]]):
        index: dict[int, int] = {}
        nodes: list[Node] = []
        stack: list[Node] = []
        for node, _ in roots:
            if id(node) not in index:
                index[id(node)] = len(nodes)
                nodes.append(node)
                stack.append(node)
        edge_lists: dict[int, tuple] = {}
        while stack:
            node = stack.pop()
            nf = next_edges(node)
            edge_lists[id(node)] = nf
            for child, _ in nf:
                if child is not None and id(child) not in index:
                    index[id(child)] = len(nodes)
                    nodes.append(child)
                    stack.append(child)
        n = len(nodes)
        metas = [nd._input_metadata for nd in nodes]
        n_out = [len(m) for m in metas]
        self.out_shapes = tuple(tuple((tuple(x.shape), x.dtype) for x in m) for m in metas)
        slot_base = [0] * n
        total = 0
        for i in range(n):
            slot_base[i] = total
            total += max(n_out[i], 1)
        slot_node = [0] * total
        slot_nr = [0] * total
        for i in range(n):
            for k in range(max(n_out[i], 1)):
                slot_node[slot_base[i] + k] = i
                slot_nr[slot_base[i] + k] = k
        edges: list[tuple[int, ...]] = []
        consumers: list[list[tuple[int, int]]] = [[] for _ in range(total)]
        for i, nd in enumerate(nodes):
            row = []
            for pos, (child, nr) in enumerate(edge_lists[id(nd)]):
                if child is None:
                    row.append(-1)
                else:
                    s = slot_base[index[id(child)]] + nr
                    row.append(s)
                    consumers[s].append((i, pos))
            edges.append(tuple(row))
        self.nodes = nodes
        self.types = [node_type(nd) for nd in nodes]
        self.edges = edges
        self.slot_base = slot_base
        self.n_out = n_out
        self.slot_node = slot_node
        self.slot_nr = slot_nr
        self.consumers = consumers
        self._index = index
        self.root_slots = [slot_base[index[id(nd)]] + nr for nd, nr in roots]
        self.order = self._topological_order()

    # -----------------------------------------------------------------------------------------------------
    def _topological_order(self) -> list[int]:
        n = len(self.nodes)
        pending = [0] * n
        for i in range(n):
            for s in self.edges[i]:
                if s >= 0:
                    pending[self.slot_node[s]] += 1
        stack = [i for i in range(n - 1, -1, -1) if pending[i] == 0]
        order: list[int] = []
        while stack:
            v = stack.pop()
            order.append(v)
            for s in reversed(self.edges[v]):
                if s >= 0:
                    c = self.slot_node[s]
                    pending[c] -= 1
                    if pending[c] == 0:
                        stack.append(c)
        if len(order) != n:  # pragma: no cover - autograd graphs are acyclic
            raise RuntimeError("the autograd graph has a cycle; this should be impossible")
        return order

    def signature(self, static: Sequence[tuple[str, ...]] = ()) -> tuple:
        """A hashable description of the graph's structure: node types, edges, output shapes and dtypes, which
        leaves are parameters, and the values of the saved fields named in ``static`` (per node; non-tensor
        fields that rules read while planning). Two graphs with equal signatures get the same plan."""
        leaves = tuple(isinstance(leaf_tensor(nd), torch.nn.Parameter) if t == "AccumulateGrad" else None
                       for nd, t in zip(self.nodes, self.types))
        fields = tuple(tuple(_fingerprint(saved(nd, f)) for f in fs) if fs else ()
                       for nd, fs in zip(self.nodes, static)) if static else ()
        return (tuple(self.types), tuple(self.edges), self.out_shapes, leaves, fields, tuple(self.root_slots))

    def slot_of(self, node: Node, output_nr: int) -> int | None:
        """Slot id of output ``output_nr`` of ``node``, or ``None`` when the node is not in the graph."""
        i = self._index.get(id(node))
        return None if i is None else self.slot_base[i] + output_nr

    def meta(self, slot: int) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of the forward value of ``slot``."""
        return self.out_shapes[self.slot_node[slot]][self.slot_nr[slot]]

    def slots_of(self, i: int) -> range:
        """Slot ids owned by node ``i``."""
        return range(self.slot_base[i], self.slot_base[i] + max(self.n_out[i], 1))

    def __len__(self) -> int:
        return len(self.nodes)

    def describe(self, i: int) -> str:
        """``"AddmmBackward0#12"``: the node type and its index, for messages and ledgers."""
        return f"{self.types[i]}#{i}"


def find_lookups(outputs: Sequence[torch.Tensor], weight: torch.Tensor,
                 indices: torch.Tensor | None = None) -> list[Any]:
    """Where ``weight`` was read by an embedding lookup in the graph of ``outputs``.

    Returns ``torch.autograd.graph.GradientEdge`` objects (the lookups' outputs), in discovery order, optionally
    only those whose saved indices equal ``indices``. The model is not touched: this reads the graph only, so
    relevance can be requested at an embedding output the caller never held.
    """
    roots = [(t.grad_fn, t.output_nr) for t in outputs if t.grad_fn is not None]
    if not roots:
        return []
    view = GraphView(roots)
    found = []
    for i, t in enumerate(view.types):
        if t != "EmbeddingBackward0":
            continue
        e = view.edges[i][0] if view.edges[i] else -1
        if e < 0 or view.types[view.slot_node[e]] != "AccumulateGrad":
            continue
        if leaf_tensor(view.nodes[view.slot_node[e]]) is not weight:
            continue
        if indices is not None:
            idx = saved(view.nodes[i], "indices")
            if idx is None or idx.shape != indices.shape or not torch.equal(idx, indices.to(idx.device)):
                continue
        found.append(torch.autograd.graph.GradientEdge(view.nodes[i], 0))
    return found


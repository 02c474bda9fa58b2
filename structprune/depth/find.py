"""Which modules are residual blocks that depth pruning may remove whole.

A candidate is an entry of a repeated stack (an ``nn.ModuleList`` or ``nn.Sequential`` with at least two
entries) that

- returns a tensor (or a tuple whose first element is one) of the shape of its first input tensor, so
  the stack still fits together without it, and
- adds its input back onto what it computes: in the captured graph (:mod:`structprune.graph.capture`,
  read through each node's ``nn_module_stack``), an ``add`` inside the block has one operand that is a
  tensor from outside the block (possibly through identity-like ops: ``to``, ``clone``, dropout...) and
  one computed inside it.

A block whose shortcut is transformed (torchvision's ``downsample``) fails both tests: removing it would
change shapes. When the whole model cannot be captured, or a block is a leaf of the captured graph, a
weaker test stands in for the second one: the block is one of at least two entries of its stack of the
same class, and that class is not a plain ``torch.nn`` layer (a stack of ``nn.Linear`` is an MLP, not
residual blocks). Where both a block and a module inside it qualify, the innermost wins: a stage of
residual blocks is not itself removed whole.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import fx, nn

from ..errors import ExampleInputError, TraceError
from ..graph.capture import Inputs, Trace, capture, eval_mode, output_tensors
from ..graph.shapes import META_KEY, TensorMeta, propagate_shapes
from ..ops import has_module_rule, shape_function_for, traced_forward_for
from ..options import require_prunable

_ADDS = {operator.add, operator.iadd, torch.add}
_ATEN_ADDS = {"aten.add.Tensor", "aten.add_.Tensor"}
# ops whose output carries their first operand's values (a dtype cast counts: it is how mixed precision keeps
# the residual stream in float32)
_IDENTITY_METHODS = {"to", "type", "float", "double", "half", "bfloat16", "contiguous", "clone", "detach", "type_as"}
_IDENTITY_FUNCTIONS = {torch.clone, torch.detach, nn.functional.dropout}
_ATEN_IDENTITIES = {"aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten._to_copy.default",
                    "aten.clone.default", "aten.alias.default", "aten.contiguous.default", "aten.detach.default",
                    "aten.dropout.default", "aten.lift_fresh_copy.default"}
_IDENTITY_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd)
# torch.nn classes that are residual blocks; every other torch.nn class is a plain layer
_TORCH_BLOCKS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@dataclass(frozen=True)
class Entry:
    """One entry of a stack: the module at ``path``, stored under ``key`` at ``position`` of the stack at ``stack``."""

    path: str
    stack: str
    key: str
    position: int


@dataclass
class Candidates:
    """The residual blocks of a model for one example input, and what was learned finding them."""

    blocks: List[Entry]
    stacks: Dict[str, int]  # stack path -> number of entries
    outputs: List[Tuple[int, ...]]  # shapes of the model's output tensors on the example input
    notes: List[str] = field(default_factory=list)

    @property
    def paths(self) -> List[str]:
        return [block.path for block in self.blocks]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def stack_entries(model: nn.Module) -> List[Entry]:
    """Every entry of every ``ModuleList``/``Sequential`` with at least two entries, in module order."""
    entries: List[Entry] = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = [(key, child) for key, child in module._modules.items() if child is not None]
        if len(children) < 2:
            continue
        entries.extend(Entry(_join(path, key), path, key, i) for i, (key, _) in enumerate(children))
    return entries


def first_tensor(value: Any) -> Optional[torch.Tensor]:
    """The first tensor of a module's output (a tensor, a tuple, a ``ModelOutput``...), or None."""
    try:
        tensors = output_tensors(value)
    except TraceError:
        return None
    return tensors[0] if tensors else None


def block_input(args: tuple, kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
    """A block's input stream: its first positional tensor, else ``hidden_states=``, else its first tensor keyword."""
    for value in args:
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _shapes(model: nn.Module, inputs: Inputs, entries: List[Entry]
            ) -> Tuple[Dict[str, set], List[Tuple[int, ...]]]:
    """Run the example input once: entry path -> the set of (input shape, output shape) of its calls, and the shapes
    of the model's outputs."""
    seen: Dict[str, set] = {}

    def hook(path: str):
        def record(module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
            x, y = block_input(args, kwargs), first_tensor(output)
            shapes = (tuple(x.shape) if x is not None else None, tuple(y.shape) if y is not None else None)
            seen.setdefault(path, set()).add(shapes)
        return record

    handles = [model.get_submodule(entry.path).register_forward_hook(hook(entry.path), with_kwargs=True)
               for entry in entries]
    try:
        fresh = inputs.cloned()
        with eval_mode(model), torch.no_grad():
            try:
                output = model(*fresh.args, **fresh.kwargs)
            except Exception as error:
                raise ExampleInputError(f"the model does not run on the example input: {type(error).__name__}: "
                                        f"{error}") from error
    finally:
        for handle in handles:
            handle.remove()
    return seen, [tuple(t.shape) for t in output_tensors(output)]


def _module_paths(node: fx.Node) -> Set[str]:
    """Paths of every module whose forward is running when ``node`` runs."""
    stack = node.meta.get("nn_module_stack") or {}
    return {value[0] for value in stack.values() if isinstance(value, tuple) and value}


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADDS or str(node.target) in _ATEN_ADDS
    return node.op == "call_method" and node.target in ("add", "add_")


def _is_identity(node: fx.Node, trace: Trace) -> bool:
    if node.op == "call_function":
        return node.target in _IDENTITY_FUNCTIONS or str(node.target) in _ATEN_IDENTITIES
    if node.op == "call_method":
        return node.target in _IDENTITY_METHODS
    if node.op == "call_module":
        try:
            return isinstance(trace.module.get_submodule(str(node.target)), _IDENTITY_MODULES)
        except AttributeError:
            return False
    return False


def _source(node: Any, inside: Set[fx.Node], trace: Trace) -> Any:
    """Follow identity-like ops inside the block back to where their value comes from."""
    while isinstance(node, fx.Node) and node in inside and _is_identity(node, trace) and node.args \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _shape_is(node: fx.Node, shape: Optional[Tuple[int, ...]]) -> bool:
    """Does the node's value have ``shape``? (True when shapes could not be propagated: nothing to compare.)"""
    meta = node.meta.get(META_KEY)
    return not isinstance(meta, TensorMeta) or shape is None or tuple(meta.shape) == shape


def _adds_its_input(inside: Set[fx.Node], trace: Trace, shape: Optional[Tuple[int, ...]]) -> bool:
    """Does an add inside the block sum a tensor of the input's ``shape`` from outside the block (its input) with one
    computed inside? (The shape keeps out an attention mask made outside and added to scores made inside.)"""
    for node in inside:
        if not _is_add(node):
            continue
        operands = [*node.args[:2], *(node.kwargs[k] for k in ("input", "other") if k in node.kwargs)]
        # a parameter or constant (get_attr) is not an input
        sources = [_source(a, inside, trace) for a in operands]
        nodes = [a for a in sources if isinstance(a, fx.Node) and a.op != "get_attr"]
        if len(nodes) != 2 or (nodes[0] in inside) == (nodes[1] in inside):
            continue
        outside = nodes[0] if nodes[1] in inside else nodes[1]
        if _shape_is(outside, shape):
            return True
    return False


def _one_shape(calls: set) -> Optional[Tuple[int, ...]]:
    """The input shape of a block's calls, when they all had the same (None: several, nothing to compare with)."""
    return next(iter(calls))[0] if len(calls) == 1 else None


def _plain_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.") and not isinstance(module, _TORCH_BLOCKS)


def _same_class_siblings(model: nn.Module, entry: Entry) -> bool:
    stack = model.get_submodule(entry.stack)
    cls = type(model.get_submodule(entry.path))
    return sum(type(child) is cls for child in stack._modules.values()) >= 2


def find_blocks(model: nn.Module, example_input: Any, tracer: str = "auto") -> Candidates:
    """The residual blocks of ``model`` (see the module docstring), in module order."""
    require_prunable(model)
    inputs = Inputs.from_example(example_input)
    entries = stack_entries(model)
    stacks: Dict[str, int] = {}
    for entry in entries:
        stacks[entry.stack] = stacks.get(entry.stack, 0) + 1
    seen, outputs = _shapes(model, inputs, entries)
    # the stack fits together without the block: every call maps its input's shape to itself
    fitting = [e for e in entries if e.path in seen and all(x is not None and x == y for x, y in seen[e.path])]
    notes: List[str] = []
    inside: Dict[str, Set[fx.Node]] = {e.path: set() for e in fitting}
    trace: Optional[Trace] = None
    if fitting:
        try:
            trace = capture(model, inputs, has_module_rule, tracer=tracer, stand_in=traced_forward_for)
        except TraceError as error:
            notes.append(f"the model's graph could not be captured ({str(error).splitlines()[0]}); residual "
                         f"blocks were recognised by shape and class alone, without seeing their shortcut")
    if trace is not None:
        try:  # shapes tell the block's input from other tensors made outside it; the test runs without them too
            with eval_mode(model):
                propagate_shapes(trace, trace.run_args(inputs), shape_function_for)
        except Exception as error:
            notes.append(f"shapes could not be propagated through the captured graph ({type(error).__name__}); "
                         f"any tensor from outside a block added to one computed inside counted as its shortcut")
        for node in trace.graph.nodes:
            for path in _module_paths(node) & inside.keys():
                inside[path].add(node)
    leaves = {str(n.target) for n in trace.graph.nodes if n.op == "call_module"} if trace is not None else set()
    blocks, unseen = [], []
    for entry in fitting:
        module = model.get_submodule(entry.path)
        # a leaf node (or no node at all: inside another leaf) hides the block's shortcut
        opaque = trace is None or entry.path in leaves or not inside[entry.path]
        if opaque:
            if _same_class_siblings(model, entry) and not _plain_layer(module):
                blocks.append(entry)
                unseen.append(entry.path)
        elif trace is not None and _adds_its_input(inside[entry.path], trace, _one_shape(seen[entry.path])):
            blocks.append(entry)
    if unseen and trace is not None:
        notes.append(f"{', '.join(unseen)}: not traced into (leaf modules of the captured graph); taken as residual "
                     f"blocks by their shape and class")
    # the innermost wins: a stage made of residual blocks is not a block to remove whole
    paths = [b.path for b in blocks]
    blocks = [b for b in blocks if not any(p.startswith(b.path + ".") for p in paths)]
    return Candidates(blocks, stacks, outputs, notes)


def residual_blocks(model: nn.Module, example_input: Any, *, tracer: str = "auto") -> List[str]:
    """Paths of the residual blocks depth pruning may remove whole, in module order.

    A candidate is an entry of an ``nn.ModuleList`` or ``nn.Sequential`` (of at least two entries)
    whose output (the first tensor of a tuple output) has the shape of its first input, and whose
    computation adds that input back (a residual connection, found in the captured graph). Blocks
    whose shortcut changes shapes (torchvision's ``downsample``) are not candidates.

    Args:
        model: any ``nn.Module``; it is run once and captured with torch.fx (torch.export as a
            fallback). When neither can capture it, a block counts if it is one of at least two
            entries of its stack of the same (non-``torch.nn``) class.
        example_input: a tensor, a tuple of positional arguments, or a dict of keyword arguments.
        tracer: ``"auto"``, ``"fx"`` or ``"export"``.

    Returns:
        Module paths such as ``["model.layers.0", ..., "model.layers.31"]``.
    """
    return find_blocks(model, example_input, tracer).paths

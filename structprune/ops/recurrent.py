"""Recurrent layers: ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells.

A hidden unit j of one layer and direction owns row j of every gate block of ``weight_ih``,
``weight_hh`` and both biases (LSTM: i, f, g, o; GRU: r, z, n; RNN: one block), and column j of
``weight_hh``, the recurrence that reads it back. Zeroing all of them keeps the unit's state at zero
(every gate sees 0: sigmoid gives 0.5, tanh 0, so the cell and hidden state stay 0 from a zero
start), so removing the unit is exact. With ``proj_size`` (LSTM), ``weight_hr`` maps the H cells to
P outputs: its columns follow the cells, its rows are a second structure that ``weight_hh``'s
columns and the next layer read.

Layer k > 0 reads the concatenation of layer k-1's directions, so its ``weight_ih`` columns follow
their units block by block. The output's last axis is the last layer's directions, concatenated.
One ``hidden_size`` (and ``proj_size``) serves every layer and direction, and ``h_n``/``c_n`` stack
them all along their first axis: unit j of every layer and direction is one coupled unit, removed
from all of them together.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
from torch import nn

from ..graph.labels import AxisLabel
from .context import RuleContext
from .registry import register_op, rule

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
CELL_GATES = {nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}


def _gated_rows(ctx: RuleContext, rows: AxisLabel, units: AxisLabel, gates: int, hidden: int) -> None:
    """Row ``g * hidden + j`` of a gate-stacked tensor follows unit ``j``, for every gate ``g``."""
    if rows is None or units is None:
        ctx.unify(units, rows, hidden)  # an unlabelled side freezes the other
        return
    for gate in range(gates):
        ctx.unify(rows[gate * hidden:(gate + 1) * hidden], units, hidden)


def _last_axis(meta, axis: AxisLabel):
    return (None,) * (meta.ndim - 1) + (axis,)


@rule(nn.LSTM, nn.GRU, nn.RNN)
def recurrent_module(ctx: RuleContext, node):
    """Hidden units of every layer and direction; layer inputs follow the layer (or tensor) before."""
    module: Any = ctx.module
    gates = GATES[module.mode]
    directions = 2 if module.bidirectional else 1
    suffixes = ["", "_reverse"][:directions]
    hidden, proj = module.hidden_size, getattr(module, "proj_size", 0)
    x_label = ctx.tlabel(ctx.arg(0, "input"))
    previous: Optional[List[AxisLabel]] = None  # the outputs of layer k-1, one per direction
    units_of: List[AxisLabel] = []
    outputs_of: List[AxisLabel] = []
    for layer in range(module.num_layers):
        current = []
        for suffix in suffixes:
            name = f"_l{layer}{suffix}"
            units = ctx.module_param(f"weight_ih{name}", 0)
            units = None if units is None else units[:hidden]
            _gated_rows(ctx, ctx.module_param(f"weight_ih{name}", 0), units, gates, hidden)
            _gated_rows(ctx, ctx.module_param(f"weight_hh{name}", 0), units, gates, hidden)
            for bias in (f"bias_ih{name}", f"bias_hh{name}"):
                if getattr(module, bias, None) is not None:
                    _gated_rows(ctx, ctx.module_param(bias, 0), units, gates, hidden)
            output = units
            if proj:
                ctx.unify(ctx.module_param(f"weight_hr{name}", 1), units, hidden)
                output = ctx.module_param(f"weight_hr{name}", 0)
                ctx.mark_producer(output)
            ctx.unify(ctx.module_param(f"weight_hh{name}", 1), output, proj or hidden)
            columns = ctx.module_param(f"weight_ih{name}", 1)
            if layer == 0:
                ctx.unify(x_label[-1] if x_label else None, columns, module.input_size)
            else:
                assert previous is not None
                width = proj or hidden
                for d, source in enumerate(previous):
                    ctx.unify(None if columns is None else columns[d * width:(d + 1) * width], source, width)
            ctx.mark_producer(units)
            current.append(output)
            units_of.append(units)
            outputs_of.append(output)
        previous = current
    assert previous is not None
    # one hidden_size (and proj_size) serves every layer and direction: unit j goes from all of them
    units = ctx.unify_all(units_of, hidden)
    outputs = ctx.unify_all(outputs_of, proj or hidden)
    out_meta = ctx.out
    return [_last_axis(out_meta[0], _concat(previous)), _states(ctx, module, units, outputs, out_meta[1])]


def _concat(parts: List[AxisLabel]) -> AxisLabel:
    present = [p for p in parts if p is not None]
    return np.concatenate(present) if len(present) == len(parts) else None


def _states(ctx: RuleContext, module: Any, units: AxisLabel, outputs: AxisLabel, state_meta) -> list:
    """Labels of ``h_n`` (and ``c_n``), whose last axis is every layer's outputs (cells); initial states
    passed in follow them."""
    hidden, proj = module.hidden_size, getattr(module, "proj_size", 0)
    given = ctx.arg(1, "hx")
    if isinstance(module, nn.LSTM):
        if isinstance(given, (tuple, list)):
            for state, axis, size in zip(given, (outputs, units), (proj or hidden, hidden)):
                label = ctx.tlabel(state)
                ctx.unify(label[-1] if label else None, axis, size)
        return [_last_axis(state_meta[0], outputs), _last_axis(state_meta[1], units)]
    if given is not None:
        label = ctx.tlabel(given)
        ctx.unify(label[-1] if label else None, outputs, hidden)
    return _last_axis(state_meta, outputs)


def _state_labels(ctx: RuleContext, states: list) -> list:
    """Tensor labels of the states passed to a cell: tensors, or one node holding the previous call's
    ``(h, c)`` tuple."""
    labels = []
    for state in states:
        meta = ctx.meta(state)
        if isinstance(meta, (tuple, list)):
            items = ctx.label(state)
            items = items if isinstance(items, list) and len(items) == len(meta) else [None] * len(meta)
            labels += [item if isinstance(item, tuple) else (None,) * m.ndim for item, m in zip(items, meta)]
        else:
            labels.append(ctx.tlabel(state))
    return labels


def cell(ctx: RuleContext, x, states: list, w_ih: tuple, w_hh: tuple, b_ih: tuple, b_hh: tuple, gates: int,
         lstm: bool):
    """One step of a recurrent cell: units own their gate rows and ``weight_hh`` column; the states
    passed in and out follow them. Weights and biases come as tensor labels (one entry per axis)."""
    if len(w_ih) != 2 or len(w_hh) != 2:
        ctx.freeze_inputs("recurrent cell without 2-D weights")
        return ctx.unlabeled_output()
    hidden = ctx.meta(ctx.out[0] if lstm else ctx.out).shape[-1]
    units = w_hh[1]  # the recurrence reads each unit back through its column
    for rows in (w_ih[0], w_hh[0]) + tuple(b[0] for b in (b_ih, b_hh) if b):
        _gated_rows(ctx, rows, units, gates, hidden)
    x_label = ctx.tlabel(x)
    ctx.unify(x_label[-1] if x_label else None, w_ih[1], ctx.meta(x).shape[-1])
    ctx.mark_producer(units)
    for label in _state_labels(ctx, states):
        ctx.unify(label[-1] if label else None, units, hidden)
    if lstm:
        return [_last_axis(ctx.out[0], units), _last_axis(ctx.out[1], units)]
    return _last_axis(ctx.out, units)


@rule(nn.LSTMCell, nn.GRUCell, nn.RNNCell)
def recurrent_cell(ctx: RuleContext, node):
    """``nn.LSTMCell``/``nn.GRUCell``/``nn.RNNCell`` called on ``(input, state)``."""
    module: Any = ctx.module
    given = ctx.arg(1, "hx")
    states = list(given) if isinstance(given, (tuple, list)) else [] if given is None else [given]
    weights = [ctx.module_param(name, 0) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    labels = [(weights[0], ctx.module_param("weight_ih", 1)), (weights[1], ctx.module_param("weight_hh", 1)),
              (weights[2],) if weights[2] is not None else (), (weights[3],) if weights[3] is not None else ()]
    gates = next(count for cls, count in CELL_GATES.items() if isinstance(module, cls))
    return cell(ctx, ctx.arg(0, "input"), states, labels[0], labels[1], labels[2], labels[3], gates,
                isinstance(module, nn.LSTMCell))


def _aten_cell(gates: int, lstm: bool):
    def rule_fn(ctx: RuleContext, node):  # (input, hx, w_ih, w_hh, b_ih=None, b_hh=None)
        given = ctx.arg(1)
        states = list(given) if isinstance(given, (tuple, list)) else [given]
        weights = [ctx.tlabel(ctx.arg(i)) if ctx.arg(i) is not None else () for i in (2, 3, 4, 5)]
        return cell(ctx, ctx.arg(0), states, weights[0], weights[1], weights[2], weights[3], gates, lstm)
    rule_fn.__doc__ = f"torch.export's {'LSTM' if lstm else 'GRU' if gates == 3 else 'RNN'} cell: see :func:`cell`."
    return rule_fn


for _name, _gates, _lstm in (("lstm_cell", 4, True), ("gru_cell", 3, False), ("rnn_tanh_cell", 1, False),
                             ("rnn_relu_cell", 1, False)):
    rule(f"aten.{_name}")(_aten_cell(_gates, _lstm))


def update_recurrent(module: Any, old: Dict[str, tuple]) -> None:
    """Sizes from the sliced tensors; the flat weight list cuDNN reads is rebuilt."""
    module.input_size = module.weight_ih_l0.shape[1]
    proj = getattr(module, "proj_size", 0)
    if proj:
        module.proj_size, module.hidden_size = module.weight_hr_l0.shape
    else:
        module.hidden_size = module.weight_hh_l0.shape[1]
    module._init_flat_weights()


def update_cell(module: Any, old: Dict[str, tuple]) -> None:
    module.input_size = module.weight_ih.shape[1]
    module.hidden_size = module.weight_hh.shape[1]


register_op(nn.LSTM, nn.GRU, nn.RNN, update=update_recurrent, width="hidden_size")
register_op(nn.LSTMCell, nn.GRUCell, nn.RNNCell, update=update_cell, width="hidden_size")

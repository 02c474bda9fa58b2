"""Views of a dependency graph for people: Graphviz DOT text of the channel-space graph."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only an annotation here: the caller has imported networkx
    import networkx as nx


def to_dot(g: nx.Graph) -> str:
    """Graphviz DOT text of the channel-space graph: one node per space, grouped by colour."""
    def quote(text) -> str:
        escaped = str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'

    palette = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5"]
    lines = ["graph channels {", "  node [shape=box, style=filled, fontsize=10];"]
    for node, data in g.nodes(data=True):
        colour = palette[data["group"] % len(palette)] if data["prunable"] else "#d9d9d9"
        label = f"{data['tensor']}[{data['dim']}] x{data['size']}\ngroup {data['group']}"
        lines.append(f"  {node} [label={quote(label)}, fillcolor={quote(colour)}];")
    for u, v, data in g.edges(data=True):
        lines.append(f"  {u} -- {v} [tooltip={quote(data['ops'])}];")
    lines.append("}")
    return "\n".join(lines) + "\n"

"""Draw the channel-space graph of the stem and first stage of torchvision's ResNet-18 into docs/graph.png.

Layers run left to right in model order. Every node is a channel space (one axis of one parameter):
a circle is an axis of output channels (a conv's filters, a BatchNorm's weight or bias), a square the
input-channel axis of a conv's weight. The colour is the group (channels pruned together) and the
edge style the op that couples two spaces; the legend explains both.
"""
import os

import matplotlib
import networkx as nx
import torch
import torchvision
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

import structprune as sp

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

graph = sp.DependencyGraph(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
g = graph.to_networkx()
keep = [n for n, d in g.nodes(data=True) if not d["tensor"].startswith(("layer2", "layer3", "layer4", "fc"))
        and "running" not in d["tensor"] and "num_batches" not in d["tensor"]]
sub = g.subgraph(keep)
layers = list(dict.fromkeys(sub.nodes[n]["tensor"].rsplit(".", 1)[0] for n in sub))  # model order


def place(node):
    """Column: the layer, in model order. Row: output channels on top (a BatchNorm's bias below its
    weight), a conv's input channels at the bottom."""
    data = sub.nodes[node]
    layer, kind = data["tensor"].rsplit(".", 1)
    row = 0.0 if data["dim"] == 1 else (1.1 if kind == "bias" else 2.0)
    return layers.index(layer), row


pos = {n: place(n) for n in sub}
labels = {n: "{}\n{}, dim {}".format(*sub.nodes[n]["tensor"].rsplit(".", 1), sub.nodes[n]["dim"]) for n in sub}

# one colour per group, described by what it holds
groups = {grp.id: grp for grp in graph.groups}
palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
group_ids = list(dict.fromkeys(sub.nodes[n]["group"] for n in sorted(sub, key=lambda n: pos[n])))
colour = {gid: palette[k % len(palette)] for k, gid in enumerate(group_ids)}


def describe(gid):
    grp = groups[gid]
    producers = [tensor.rsplit(".", 1)[0] for tensor, dim in grp.members if dim == 0 and "conv" in tensor]
    if len(producers) > 1:
        what = f"residual stream: {', '.join(producers)},\ntheir BatchNorms and the convs reading them"
    elif producers:
        what = f"{producers[0]}'s filters, its BatchNorm\nand the next conv's inputs"
    else:
        what = "the image's channels: the model's input,\nwhich no layer produces"
    return f"{what} ({f'prunable, {grp.size} channels' if grp.prunable else 'frozen'})"


def edge_kind(u, v):
    ops = " ".join(sorted(sub.edges[u, v]["ops"]))
    return "add" if "add" in ops else ("bn" if "BatchNorm" in ops else "conv")


EDGES = {"bn": dict(style="solid", width=1.8, colour="#555555", rad=0.0,
                    text="BatchNorm: its weight and bias follow the channels it normalises"),
         "conv": dict(style="dashed", width=1.4, colour="#555555", rad=0.25,
                      text="conv: its input channels are the channels it reads"),
         "add": dict(style="solid", width=3.0, colour="black", rad=-0.35,
                     text="residual add: the two summed outputs keep the same channels")}

fig, (ax, key) = plt.subplots(2, 1, figsize=(11, 8.6), height_ratios=[3.1, 1.3], layout="constrained")
for kind, style in EDGES.items():
    edges = [(u, v) for u, v in sub.edges if edge_kind(u, v) == kind]
    nx.draw_networkx_edges(sub, pos, edgelist=edges, ax=ax, style=style["style"], width=style["width"],
                           edge_color=style["colour"], arrows=True, arrowstyle="-", node_size=700,
                           connectionstyle=f"arc3,rad={style['rad']}")
for shape, dim in (("o", 0), ("s", 1)):
    nodes = [n for n in sub if sub.nodes[n]["dim"] == dim]
    nx.draw_networkx_nodes(sub, pos, nodelist=nodes, ax=ax, node_shape=shape, node_size=700,
                           node_color=[colour[sub.nodes[n]["group"]] for n in nodes], edgecolors="black")
for n, (x, y) in pos.items():
    ax.annotate(labels[n], (x, y), xytext=(0, -19), textcoords="offset points", ha="center", va="top", fontsize=10,
                bbox=dict(boxstyle="round,pad=0.1", facecolor="white", edgecolor="none", alpha=0.85), zorder=5)

groups_legend = key.legend(
    handles=[Patch(facecolor=colour[gid], edgecolor="black", label=describe(gid)) for gid in group_ids],
    loc="upper left", fontsize=10, frameon=False, labelspacing=0.9,
    title="colour: group (channels pruned together)", title_fontsize=11, alignment="left")
key.add_artist(groups_legend)
kinds = [Line2D([], [], marker="o", linestyle="", markersize=12, markerfacecolor="white", markeredgecolor="black",
                label="output channels: a conv's filters,\na BatchNorm's weight or bias (dim 0)"),
         Line2D([], [], marker="s", linestyle="", markersize=11, markerfacecolor="white", markeredgecolor="black",
                label="input channels of a conv (its weight's dim 1)")]
kinds += [Line2D([], [], linestyle=style["style"], linewidth=style["width"], color=style["colour"],
                 label=style["text"]) for style in EDGES.values()]
key.legend(handles=kinds, loc="upper right", fontsize=10, frameon=False, labelspacing=0.9,
          title="shape: kind of axis; line: the op coupling two axes", title_fontsize=11, alignment="left")
ax.set_xlim(-0.6, len(layers) - 0.4)
ax.set_ylim(-0.55, 2.75)
ax.axis("off")
key.axis("off")
ax.set_title("ResNet-18, stem and stage 1: channel spaces coloured by group", fontsize=14)
fig.savefig(os.path.join(os.path.dirname(os.path.abspath(__file__)), "graph.png"), dpi=100)

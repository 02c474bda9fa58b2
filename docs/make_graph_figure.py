"""Draw the channel-space graph of the first stage of torchvision's ResNet-18 into docs/graph.png."""
import os

import matplotlib
import networkx as nx
import torch
import torchvision

import structprune as sp

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

graph = sp.DependencyGraph(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
g = graph.to_networkx()
keep = [n for n, d in g.nodes(data=True) if not d["tensor"].startswith(("layer2", "layer3", "layer4", "fc"))
        and "running" not in d["tensor"] and "num_batches" not in d["tensor"]]
sub = g.subgraph(keep)
colours = [sub.nodes[n]["group"] for n in sub]
labels = {n: f"{sub.nodes[n]['tensor'].replace('.weight', '').replace('.bias', ' b')}[{sub.nodes[n]['dim']}]"
          for n in sub}
plt.figure(figsize=(11, 7))
pos = nx.spring_layout(sub, seed=3, k=0.9)
nx.draw_networkx(sub, pos, node_color=colours, cmap="tab10", labels=labels, font_size=7, node_size=350,
                 edge_color="#999999")
plt.axis("off")
plt.title("ResNet-18, stem and stage 1: channel spaces coloured by group")
plt.tight_layout()
plt.savefig(os.path.join(os.path.dirname(os.path.abspath(__file__)), "graph.png"), dpi=110)

"""What is coupled: capture the graph, propagate shapes, walk it with the op rules, solve the couplings."""

"""When and how often to prune: schedules, soft pruning, lottery tickets, sparsity regularisers."""

"""What to remove: the planner (ratios, scopes, rounding), budgets (params, MACs) and the meta-device dry run."""

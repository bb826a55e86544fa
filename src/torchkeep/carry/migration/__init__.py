"""Optimizer state and EMA copies carried by parameter name through the weights' plan."""

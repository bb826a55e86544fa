"""Carry weights into a changed model: the plan, structural matching, adapters, the report, and
optimizer/EMA state migration through the same plan. Works on names, shapes and tensors only."""

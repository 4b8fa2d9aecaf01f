"""Use cases as plain async functions over a unit of work (cosmicpython's service layer)."""

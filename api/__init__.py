"""The HTTP read side and booking holds (FastAPI)."""

"""Optional face alignment with insightface (imported lazily, only when a node uses it)."""

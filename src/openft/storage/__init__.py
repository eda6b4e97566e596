"""Metadata (SQLAlchemy) and content-addressed blobs. Knows nothing of torch or HTTP."""

"""HTTP API (FastAPI): thin routes over storage, datasets and inference. Never trains."""

"""Dashboard: static pages that call only the public /v1 API (same as the SDK and CLI)."""

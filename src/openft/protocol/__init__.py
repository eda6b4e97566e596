"""OpenAI wire types (pydantic only). One module per resource, field names as the spec."""

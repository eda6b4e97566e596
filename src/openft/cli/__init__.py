"""Command line: ``openft serve | worker | keys | validate | files | jobs | chat | export``."""

"""Applies enrollment events to the read model and answers metric queries from it."""

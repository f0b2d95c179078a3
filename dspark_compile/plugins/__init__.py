"""Custom operators: a written specification, a reference, and the implementations tested against it."""

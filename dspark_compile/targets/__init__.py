"""Backends behind one small interface: each says what it needs, builds, and how to load what it built."""

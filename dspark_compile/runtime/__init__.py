"""Host-side runtime: the decode loop and its verify-length policies."""

"""Post-build tools: they run a finished build (`profile`, `calibrate`), they are not compiler passes."""

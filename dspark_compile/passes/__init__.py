"""Compiler passes: one file, one job each; `dspark_compile/pipeline.py` lists them in order."""

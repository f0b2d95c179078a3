"""Serving around a build: text in and out (``text``), the request/response layer of the Triton model
(``llm_io``) and the bundled server (``serve``)."""

"""Bundled model directories (installed as `dlsr_infer._weights`)."""

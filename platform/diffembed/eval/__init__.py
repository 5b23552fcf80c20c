"""Retrieval evaluation: metrics (pytrec_eval) and exact dense retrieval with the Embedder."""

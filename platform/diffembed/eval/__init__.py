"""Retrieval evaluation: metrics (pytrec_eval), BEIR-layout datasets, LongEmbed-style synthetic tasks
(passkey, needle), exact or Qdrant-backed retrieval, and the evaluation job (`runner.run_evaluation`)."""

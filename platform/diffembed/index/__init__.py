"""The Qdrant vector store shared by the batch-embedding job and the retrieval service.

`config.StoreConfig` says where and how vectors are stored, `store.QdrantStore` writes chunk records
idempotently and searches them (dense, BM25 sparse or hybrid), `sparse` builds the BM25 vectors.
"""

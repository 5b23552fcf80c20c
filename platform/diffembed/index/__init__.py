"""The vector store shared by the batch-embedding job, the retrieval service, evaluation and the demo.

`config.StoreConfig` says where and how vectors are stored; `store` holds the one store interface
(`VectorStore`, `open_store`) and the point layout; `edge` (Qdrant Edge, embedded, the default) and `server`
(a Qdrant server through qdrant-client) implement it; `fingerprint` names the embedding function a collection
was made with; `sparse` builds the BM25 vectors both backends store.
"""

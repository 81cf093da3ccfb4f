"""A LlamaIndex vector store (llama-index-core BasePydanticVectorStore) over msad.

    from llama_index.core import StorageContext, VectorStoreIndex
    from msa_memory.llamaindex_store import MsadVectorStore
    store = MsadVectorStore(addr="127.0.0.1:7420", collection="li")
    index = VectorStoreIndex.from_documents(
        docs, storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=...)
    index.as_retriever(similarity_top_k=3).retrieve("question")

One node = one msad document with one routing row (the node's embedding; see
msa_memory.vectors for geometry, string ids and metadata); the node's text is the
document's text, the rest of the node (metadata, relationships) is stored as JSON
by llama-index's own node_to_metadata_dict. Similarities are cosines.

The collection is created at the first add, with the first embedding's dimension
(or ``dim=``); its model field is ``llamaindex:d<dim>`` (or ``model=``).

Not available, and refused with NotImplementedError rather than emulated:
metadata filters, doc_ids / node_ids restrictions of a query and query modes
other than DEFAULT (msad's Route cannot filter yet: issue 13, deliverable 3).
delete(ref_doc_id) lists the collection and reads each node's metadata (O(n)).
"""

import re
from typing import Any, List, Optional, Sequence

from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.schema import BaseNode, MetadataMode
from llama_index.core.vector_stores.types import (BasePydanticVectorStore, MetadataFilters,
                                                  VectorStoreQuery, VectorStoreQueryMode,
                                                  VectorStoreQueryResult)
from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict

from msa_client import Client, MsaError

from .vectors import open_vector_memory

__all__ = ["MsadVectorStore"]

_NO_FILTER = ("%s is not available: msad's Route cannot filter yet "
              "(issue 13, deliverable 3)")


class MsadVectorStore(BasePydanticVectorStore):
    """LlamaIndex vector store in one msad collection."""

    stores_text: bool = True
    flat_metadata: bool = False
    addr: str = "127.0.0.1:7420"
    collection: str = "llamaindex"
    model: Optional[str] = None
    dim: Optional[int] = None

    _client: Any = PrivateAttr()
    _token: Optional[str] = PrivateAttr(default=None)
    _mem: Any = PrivateAttr(default=None)

    def __init__(self, addr: str = "127.0.0.1:7420", collection: str = "llamaindex",
                 dim: Optional[int] = None, model: Optional[str] = None,
                 token: Optional[str] = None, client: Any = None, **kw: Any) -> None:
        super().__init__(addr=addr, collection=collection, dim=dim, model=model, **kw)
        self._token = token
        self._client = client or Client(addr, token=token)
        try:                                     # an existing collection fixes dim/model
            info = self._client.describe(collection)
        except MsaError as e:
            if e.name != "NOT_FOUND":
                raise
            info = None
        if info is not None:
            m = info["schema"]["model"]
            if self.model is None:
                self.model = m
            got = re.search(r":d(\d+)$", m)
            if self.dim is None and got:
                self.dim = int(got.group(1))
        if self.dim is not None:
            self._open(self.dim)

    @classmethod
    def class_name(cls) -> str:
        return "MsadVectorStore"

    @property
    def client(self) -> Any:
        return self._client

    def _open(self, dim: int):
        if self._mem is None:
            self.dim = int(dim)
            if self.model is None:
                self.model = "llamaindex:d%d" % self.dim
            self._mem = open_vector_memory(self.addr, self.collection, self.dim, self.model,
                                           client=self._client)
        return self._mem

    # -- writes --------------------------------------------------------------------
    def add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> List[str]:
        nodes = list(nodes)
        if not nodes:
            return []
        vecs = [n.get_embedding() for n in nodes]
        mem = self._open(len(vecs[0]))
        ids = [n.node_id for n in nodes]
        texts = [n.get_content(metadata_mode=MetadataMode.NONE) for n in nodes]
        metas = [node_to_metadata_dict(n, remove_text=True, flat_metadata=self.flat_metadata)
                 for n in nodes]
        mem.upsert(ids, texts, vecs, metas)
        return ids

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Deletes every node of this source document (a scan of the collection)."""
        if self._mem is None:
            return
        ids = [s for s, _, m in self._mem.iter_all()
               if isinstance(m, dict) and m.get("ref_doc_id") == ref_doc_id]
        self._mem.delete_many(ids)

    def delete_nodes(self, node_ids: Optional[List[str]] = None,
                     filters: Optional[MetadataFilters] = None, **delete_kwargs: Any) -> None:
        if filters is not None:
            raise NotImplementedError(_NO_FILTER % "a metadata filter")
        if self._mem is None:
            return
        if node_ids is None:
            self._mem.clear()
        else:
            self._mem.delete_many(list(node_ids))

    def clear(self) -> None:
        if self._mem is not None:
            self._mem.clear()

    # -- reads ---------------------------------------------------------------------
    def _node(self, text, meta):
        return metadata_dict_to_node(meta, text=text)

    def get_nodes(self, node_ids: Optional[List[str]] = None,
                  filters: Optional[MetadataFilters] = None) -> List[BaseNode]:
        if filters is not None:
            raise NotImplementedError(_NO_FILTER % "a metadata filter")
        if self._mem is None:
            return []
        rows = (self._mem.iter_all() if node_ids is None else self._mem.get_many(list(node_ids)))
        return [self._node(t, m) for _, t, m in rows]

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        if query.filters is not None:
            raise NotImplementedError(_NO_FILTER % "a metadata filter")
        if query.doc_ids or query.node_ids:
            raise NotImplementedError(_NO_FILTER % "restricting a query to doc_ids/node_ids")
        if query.mode != VectorStoreQueryMode.DEFAULT:
            raise NotImplementedError("query mode %s: only DEFAULT (dense) is supported"
                                      % query.mode)
        if query.query_embedding is None:
            raise ValueError("query_embedding is required")
        if self._mem is None:
            return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
        hits = self._mem.search_vector(query.query_embedding, int(query.similarity_top_k))
        return VectorStoreQueryResult(nodes=[self._node(t, m) for _, _, t, m in hits],
                                      similarities=[float(s) for _, s, _, _ in hits],
                                      ids=[i for i, _, _, _ in hits])

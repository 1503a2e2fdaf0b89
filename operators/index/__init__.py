"""Gallery index for re-ID embeddings: build, extend, persist and search a FAISS index.

The index answers "which gallery images look most like this person" with inner products of
L2-normalised embeddings (= cosine similarity). One idea per module, as faiss ``contrib/`` and
autofaiss split an index library:

* :mod:`.plan`: which factory for a gallery size and memory budget (faiss wiki guidelines);
* :mod:`.embeddings`: streaming and validating ``reid embed`` Parquet tables;
* :mod:`.store`: ``index.json``, index files by generation, the id map;
* :mod:`.commit`: a generation's files, then its manifest, then the stale files removed;
* :mod:`.node_cache`: node-local copies of a committed index, memory-mapped;
* :mod:`.indexes`: faiss index objects and per-call search parameters;
* :mod:`.build`: :func:`build_index` and :func:`add_to_index`, each a list of phases (plan, train,
  add shards, merge, tune, commit) that an executor runs;
* :mod:`.executor`: where the phases run: in this process, or as Ray tasks (``workers > 1``);
* :mod:`.train`: the trained, empty index every shard encodes with (fixed training threads);
* :mod:`.shards`: which rows a build indexes, cut into shards, and the merge of shard indexes;
* :mod:`.encode`: one shard encoded with the trained index, its files left for the merge;
* :mod:`.merge`: the shards merged, the defaults tuned, the generation committed;
* :mod:`.refine`: full-precision vectors beside the index, memory-mapped, for re-ranking;
* :mod:`.tune`: recall against exact search and the ``nprobe`` (and re-rank factor) that reach a
  target;
* :mod:`.gallery`: :class:`GalleryIndex`, open and search;
* :mod:`.search_stage`: the batch search job's actor (Ray Data stage).

Reference implementation: faiss (Johnson, Douze, Jégou, "Billion-scale similarity search with
GPUs", 2017; Douze et al., "The Faiss library", 2024). Figures: ``docs/BENCHMARKS.md``.
"""

from vbatch.operators.index.build import add_to_index, build_index
from vbatch.operators.index.embeddings import (
    EmbeddingBatch,
    TableStats,
    iter_embeddings,
    sample_embeddings,
    scan_embeddings,
)
from vbatch.operators.index.gallery import GalleryIndex
from vbatch.operators.index.plan import (
    IndexPlan,
    choose_factory,
    choose_nlist,
    parse_bytes,
    rabitq_code_bytes,
)
from vbatch.operators.index.store import IndexInfo, read_info

__all__ = [
    "EmbeddingBatch",
    "GalleryIndex",
    "IndexInfo",
    "IndexPlan",
    "TableStats",
    "add_to_index",
    "build_index",
    "choose_factory",
    "choose_nlist",
    "iter_embeddings",
    "parse_bytes",
    "rabitq_code_bytes",
    "read_info",
    "sample_embeddings",
    "scan_embeddings",
]

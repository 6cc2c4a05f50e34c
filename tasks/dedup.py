"""Near-duplicate questions: MinHash of a question's word pairs and an LSH index on SQLite (flat memory at any
corpus size). The QA stage drops near-duplicates across the dataset; the split stage's leakage gate uses the same
measure across the train/eval boundary."""

from __future__ import annotations

import base64
from functools import lru_cache

from tasks.text import normalise


def minhash(text: str, num_perm: int):
    """MinHash of a normalised question's word pairs (single words for a one-word question), as a LeanMinHash (the
    values without the permutations)."""
    from datasketch import LeanMinHash, MinHash

    words = normalise(text).split()
    shingles = {" ".join(words[i:i + 2]) for i in range(max(1, len(words) - 1))}
    m = MinHash(num_perm=num_perm, **_permutations(num_perm))
    m.update_batch([s.encode() for s in shingles])
    return LeanMinHash(m)


def minhash_to_json(m) -> str:
    """A LeanMinHash as a JSON string (a document's results are cached as JSON): datasketch's own byte layout (seed,
    scheme, values) in base64, 0.7 kB at 128 permutations."""
    buf = bytearray(m.bytesize())
    m.serialize(buf)
    return base64.b64encode(buf).decode()


def minhash_from_json(text: str):
    from datasketch import LeanMinHash

    return LeanMinHash.deserialize(base64.b64decode(text))


@lru_cache(maxsize=4)
def _permutations(num_perm: int) -> dict:
    """The hash permutations, drawn once: a MinHash draws its own on every construction (the same ones, from the
    same seed), 70% of its cost; at 60,000 questions that was 10 s of every QA run."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm)
    return {"permutations": m.permutations, "scheme": m.scheme}


def question_key(p: dict) -> str:
    """The question with its paper's title as one word: a long title shared by two questions of the same paper
    must not make them look alike, and the same question about two papers is two questions."""
    return p["question"].replace(p.get("title") or "\0", f" paper{p.get('doc_id', '')[:12]} ")


class NearDuplicates:
    """MinHash LSH index: `seen(m)` is True when an indexed MinHash (see `minhash`) is at least `threshold` similar.

    The index lives in a private temporary SQLite database (SQLite's "" file: on disk once past its 2 MB page
    cache, deleted on close), so the QA stage's memory stays flat at any corpus size. datasketch's in-memory
    MinHashLSH grew by 241 MB at 59,000 kept questions; its Redis/Cassandra storages need a server. The
    bands are datasketch's (`MinHashLSH` picks them for the threshold), so the same questions are found."""

    def __init__(self, threshold: float, num_perm: int):
        import sqlite3

        from datasketch import MinHashLSH

        self.threshold = threshold
        self.bands = MinHashLSH(threshold=threshold, num_perm=num_perm).hashranges
        # One transaction, never committed: the file is thrown away when the index is.
        self.db = sqlite3.connect("", isolation_level=None)
        self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; "
                              "CREATE TABLE band (key INTEGER, id INTEGER, PRIMARY KEY (key, id)) WITHOUT ROWID; "
                              "CREATE TABLE hash (id INTEGER PRIMARY KEY, hashvalues BLOB); BEGIN")
        self.candidates = (f"SELECT hashvalues FROM hash WHERE id IN "
                           f"(SELECT id FROM band WHERE key IN ({','.join('?' * len(self.bands))}))")

    def _keys(self, m) -> list[int]:
        # A band's key is Python's hash of its values: fixed within this process, which is the index's lifetime; a
        # collision only adds a candidate, which the estimate below rejects.
        return [hash((i, m.hashvalues[a:b].tobytes())) for i, (a, b) in enumerate(self.bands)]

    def seen(self, m) -> bool:
        import numpy as np
        from datasketch import LeanMinHash

        # LSH finds candidates; the MinHash estimate confirms, so the threshold is the one in params.
        return any(m.jaccard(LeanMinHash(seed=m.seed, hashvalues=np.frombuffer(blob, m.hashvalues.dtype),
                                         scheme=m.scheme)) >= self.threshold
                   for (blob,) in self.db.execute(self.candidates, self._keys(m)))

    def add(self, m) -> None:
        row = self.db.execute("INSERT INTO hash (hashvalues) VALUES (?)", (m.hashvalues.tobytes(),)).lastrowid
        self.db.executemany("INSERT INTO band VALUES (?, ?)", [(k, row) for k in self._keys(m)])

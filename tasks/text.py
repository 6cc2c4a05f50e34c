"""Text helpers the stages share: sentences, section names, normalised questions."""

from __future__ import annotations

import re

# A sentence ends at . ! ? followed by a space and a capital/digit/bracket; common abbreviations do not end one
# (each look-behind ends with the abbreviation's dot: it is tested where the space begins).
_SENTENCE_END = re.compile(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\bet al\.)(?<!\bvs\.)(?<!\bFig\.)(?<!\bEq\.)(?<=[.!?])\s+"
                           r"(?=[A-Z0-9(\[])")


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


_SECTION_NUMBER = re.compile(r"^(?:[A-Z]|\d+)(?:\.\d+)*\.?\s+")


def bare_section(section: str) -> str:
    """A heading without its number, as a reader names it: "3.2 Method" → "Method", "A.1 Proofs" → "Proofs"."""
    return _SECTION_NUMBER.sub("", section).strip()


def normalise(question: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", question.lower()).split())

"""Text corpora: the demo corpus that ships with every Python, and text files from a directory."""

from __future__ import annotations

import pydoc_data.topics
from pathlib import Path

HELD_OUT_FRACTION = 0.05


def demo_corpus() -> list[str]:
    """The Python documentation topics (``pydoc_data.topics``, ~460 KB), one document per topic, in a fixed order."""
    topics = pydoc_data.topics.topics
    return [topics[name] for name in sorted(topics)]


def read_corpus(path: str | Path) -> list[str]:
    """Every ``*.txt`` file under ``path`` (or the one file ``path``), sorted by name; empty files are skipped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus not found: {path}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.txt") if p.is_file())
    documents = [text for text in (p.read_text(encoding="utf-8", errors="replace") for p in files) if text.strip()]
    if not documents:
        raise ValueError(f"corpus is empty: no non-empty *.txt file under {path}")
    return documents


def load_corpus(source: str) -> list[str]:
    """The pipeline's corpus parameter: ``""`` for the demo corpus, an ``http(s)://`` URL of one text file,
    or a file or directory path (``file://`` allowed; in a cluster, a mounted volume)."""
    if not source:
        return demo_corpus()
    if source.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(source, timeout=60) as response:
            text = response.read().decode("utf-8", errors="replace")
        if not text.strip():
            raise ValueError(f"corpus is empty: {source}")
        return [text]
    return read_corpus(source.removeprefix("file://"))


def split_documents(documents: list[str], held_out_fraction: float = HELD_OUT_FRACTION) -> tuple[str, str]:
    """Split the concatenated corpus into (train, held-out) text by characters, held-out at the end."""
    text = "\n\n".join(documents)
    cut = int(len(text) * (1.0 - held_out_fraction))
    return text[:cut], text[cut:]

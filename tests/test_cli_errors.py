"""The CLI's answers to bad input before anything loads: one line on stderr, exit 2, nothing left behind; and an
--out that would mix two runs is refused (or, with --overwrite, the old run's files go first)."""

from __future__ import annotations

import json

import pytest

import fedadapt
from fedadapt.cli import main

TRIVIAL = "benchmarks/trivial.toml"


def one_line_error(capsys, rc: int, needle: str) -> None:
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"fedadapt {fedadapt.__version__}"


@pytest.mark.parametrize("case", ["negative threads", "out is a file", "out holds a run",
                                  "out holds other files, even with --overwrite"])
def test_bad_simulate_arguments_are_refused_before_loading_and_leave_nothing(tmp_path, capsys, case):
    out = tmp_path / "out"
    args, needle = ["--threads", "-1"], "--threads must be 0 (all cores) or a positive count, got -1"
    if case == "out is a file":
        out.write_text("keep me")
        args, needle = [], "is a file, not a folder"
    elif case == "out holds a run":
        out.mkdir()
        (out / "config.toml").write_text("old run")
        args, needle = [], "already holds a run: give a new folder, or --overwrite"
    elif case.startswith("out holds other files"):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        args, needle = ["--overwrite"], "not a run directory"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    one_line_error(capsys, main(["simulate", TRIVIAL, "--out", str(out), *args]), needle)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing removed
    if out.is_file():
        assert out.read_text() == "keep me"


def test_overwrite_replaces_the_old_run_and_only_its_files(tmp_path):
    out = tmp_path / "run"
    assert main(["simulate", TRIVIAL, "--out", str(out), "--set", "rounds=2", "--threads", "1"]) == 0
    (out / "curves.png").write_bytes(b"old plot")
    (out / "my-notes.txt").write_text("mine")
    assert main(["simulate", TRIVIAL, "--out", str(out), "--set", "rounds=1", "--threads", "1", "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["rounds"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (out / "curves.png").exists() and (out / "my-notes.txt").read_text() == "mine"


def test_report_plots_the_rounds_before_a_cut_last_line_and_names_a_bad_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [json.dumps({"round": r, "loss": 1.0 / r, "accuracy": 0.5, "train_loss": 1.0}) for r in (1, 2)]
    (run / "metrics.jsonl").write_text("\n".join(rows) + '\n{"round": 3, "lo')
    assert main(["report", str(run)]) == 0
    assert "last line is cut off; plotting the 2 rounds before it" in capsys.readouterr().err
    assert (run / "curves.png").is_file()
    (run / "metrics.jsonl").write_text(rows[0] + "\nnot json\n" + rows[1] + "\n")
    one_line_error(capsys, main(["report", str(run)]), "metrics.jsonl: line 2 is not JSON")


def test_an_os_error_on_a_users_path_is_one_line(tmp_path, capsys, monkeypatch):
    from fedadapt.simulation import report

    def unreadable(run_dir):
        raise PermissionError(13, "Permission denied", str(run_dir / "metrics.jsonl"))

    monkeypatch.setattr(report, "read_metrics", unreadable)
    one_line_error(capsys, main(["report", str(tmp_path)]), f"Permission denied: {tmp_path / 'metrics.jsonl'}")


def test_a_port_in_use_is_one_line_before_the_database_exists(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = main(["server", "start", "--insecure", "--database", f"sqlite:///{tmp_path / 'fedadapt.db'}",
                   "--address", f"127.0.0.1:{port}"])
    one_line_error(capsys, rc, f"cannot listen on 127.0.0.1:{port}: Address already in use")
    assert list(tmp_path.iterdir()) == []  # no database, no blob dir


def test_a_failed_registration_writes_no_credentials(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'fedadapt.db'}"
    assert main(["clients", "add", "bob", "--database", db, "--out", str(tmp_path / "bob")]) == 0
    capsys.readouterr()
    one_line_error(capsys, main(["clients", "add", "bob", "--database", db, "--out", str(tmp_path / "bob2")]),
                   "client 'bob' is already registered")
    assert not (tmp_path / "bob2").exists() and (tmp_path / "bob" / "token").is_file()


@pytest.mark.parametrize("action", ["submit", "list", "get", "stop", "resume", "download"])
def test_every_run_action_that_prints_a_result_takes_format_json(tmp_path, capsys, action):
    """Accepted by the parser (exit 3: nothing listens on the port), not refused as an unknown argument (2)."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = {"submit": [TRIVIAL], "list": [], "download": ["run-x", "--out", str(tmp_path / "d")]}.get(action, ["run-x"])
    rc = main(["run", action, *args, "--format", "json", "--insecure", "--coordinator", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 3 and "is not reachable" in err, err


def test_bundled_scenarios_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    from fedadapt.core.config import SCENARIOS, load_config, scenario_path

    monkeypatch.chdir(tmp_path)  # an empty directory: no simulations/ here
    assert scenario_path("quickstart") == SCENARIOS / "quickstart.toml" == scenario_path("quickstart.toml")
    assert load_config("chat-tiny", ["rounds=1"]).rounds == 1
    (tmp_path / "quickstart.toml").write_text('name = "mine"\n')  # a file of that name here wins
    assert load_config("quickstart.toml").name == "mine"
    one_line_error(capsys, main(["simulate", "nosuch"]), "config file 'nosuch' does not exist (bundled scenarios: ")
    one_line_error(capsys, main(["simulate", str(tmp_path)]), "is a folder; give a scenario .toml file")


def test_every_command_has_an_example_that_its_own_parser_accepts():
    import argparse
    import shlex

    from fedadapt.cli import build_parser

    parser = build_parser()

    def leaves(p, path=()):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, p
        for s in subs:
            for name, sub in s.choices.items():
                yield from leaves(sub, (*path, name))

    commands = list(leaves(parser))
    assert len(commands) >= 18
    for path, sub in commands:
        assert sub.epilog and sub.epilog.startswith("example: fedadapt "), path
        argv = shlex.split(sub.epilog.removeprefix("example: fedadapt "))
        assert argv[: len(path)] == list(path), (path, argv)
        parser.parse_args(argv)  # every option it shows exists (argparse exits 2 otherwise)

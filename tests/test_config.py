import pytest

from fedadapt.core.config import RunConfig, load_config
from fedadapt.core.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def test_defaults_and_file_values(tmp_path):
    cfg = load_config(write(tmp_path, 'rounds = 3\n[train]\nlr = 1\n[adapter]\ntarget_modules = ["q_proj"]\n'))
    assert isinstance(cfg, RunConfig)
    assert cfg.rounds == 3 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.adapter.target_modules == ["q_proj"] and cfg.adapter.rank == 8


def test_overrides_parse_toml_literals(tmp_path):
    cfg = load_config(write(tmp_path, "rounds = 3\n"),
                      ["rounds=2", "seed=3", "train.optimizer=adam", 'adapter.target_modules=["a","b"]',
                       "strategy.server_lr=0.5"])
    assert (cfg.rounds, cfg.seed, cfg.train.optimizer) == (2, 3, "adam")
    assert cfg.adapter.target_modules == ["a", "b"]
    assert cfg.strategy == {"name": "fedavg", "server_lr": 0.5}


@pytest.mark.parametrize("text, needle", [
    ("rouds = 3\n", "unknown config key 'rouds' (did you mean 'rounds'?)"),
    ("[adapter]\nrnak = 3\n", "unknown config key 'adapter.rnak' (did you mean 'adapter.rank'?)"),
    ("[train]\nlr = 'fast'\n", "'train.lr' must be float"),
    ("rounds = true\n", "'rounds' must be int"),
    ("rounds = 0\n", "'rounds' must be positive"),
    ("[data]\npartition = 'random'\n", "'data.partition' must be one of"),
    ("rounds = \n", "invalid TOML"),
])
def test_bad_configs_name_the_problem(tmp_path, text, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_override_typo_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.learning_rate'"):
        load_config(write(tmp_path, ""), ["train.learning_rate=0.1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(write(tmp_path, ""), ["rounds"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")

"""A run's configuration -> what running it needs, built once, the same for the simulator, a coordinator and
the Flower interop: the task's data, the model with its adapter, the strategy and its client recipe under
the run's [privacy], the clients' partitions and the held-out sets the server evaluates on.

`check` refuses at config time, before anything is loaded, what cannot run where it is asked to.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fedadapt.core.config import RunConfig
from fedadapt.core.errors import ConfigError, DataError
from fedadapt.core.rng import derive_seed
from fedadapt.data import Dataset, TaskData
from fedadapt.data.tasks import client_partitions, input_dim, load_task
from fedadapt.models.build import build_model
from fedadapt.models.causal_lm import ChatFeatures
from fedadapt.models.classifier import Features
from fedadapt.models.loading import LoadedModel
from fedadapt.privacy import compat
from fedadapt.strategies import private
from fedadapt.strategies.base import ClientRecipe, GlobalState, ModelSpec, RunSettings, ServerStrategy, Task
from fedadapt.strategies.registry import available, build, strategy_class
from fedadapt.training import generate as generation
from fedadapt.training.loop import evaluate

from . import demo_lm
from .executor import Executor

WHERE = {"simulate": "the simulator", "coordinator": "a coordinator", "flower": "the Flower interop"}


def check(cfg: RunConfig, where: str = "simulate") -> None:
    """Raise ConfigError, in one line, for what `cfg` cannot run on `where`: strategy options, [privacy]
    against what the strategy supports, and the simulator-only sections elsewhere."""
    strategy, _ = build(cfg.strategy, settings(cfg))  # options are checked now, not when the run starts
    why = strategy.unsupported_tasks.get(cfg.model.task)
    if why:
        can = [n for n in available() if cfg.model.task not in strategy_class(n).unsupported_tasks]
        raise ConfigError(f"strategy {strategy.name!r} cannot train the {cfg.model.task} task: {why}; use "
                          f"{', '.join(can)}")
    compat.check(cfg, strategy.privacy_support())
    if where == "simulate":
        return
    if cfg.attack.kind != "none" and cfg.attack.fraction > 0:
        raise ConfigError(f"[attack] (kind {cfg.attack.kind!r}, fraction {cfg.attack.fraction:g}) is a simulation "
                          f"feature (fedadapt simulate); {WHERE[where]} cannot run it: remove the [attack] section")
    if cfg.availability.pattern != "always":
        raise ConfigError(f"[availability] (pattern {cfg.availability.pattern!r}) simulates which virtual clients "
                          f"answer (fedadapt simulate); with {WHERE[where]} the clients that connect are the ones "
                          "available: remove the [availability] section")
    if where == "flower" and (cfg.privacy.dp != "none" or cfg.privacy.secure_aggregation):
        raise ConfigError("privacy (DP, secure aggregation) is not supported through Flower yet")


def settings(cfg: RunConfig, num_clients: int = 0) -> RunSettings:
    return RunSettings(cfg.seed, cfg.rounds, cfg.clients_per_round, dataclasses.asdict(cfg.train), num_clients)


def strategy(cfg: RunConfig, num_clients: int, salt: str) -> tuple[ServerStrategy, ClientRecipe]:
    """The run's strategy and recipe under its [privacy] (`salt` names the run in secure-aggregation masks)."""
    server, recipe = build(cfg.strategy, settings(cfg, num_clients))
    return private.wrap(server, recipe, cfg.privacy, server.settings, salt)


@dataclass
class Run:
    cfg: RunConfig
    task: TaskData
    loaded: LoadedModel
    spec: ModelSpec  # the adapter state every client starts from
    strategy: ServerStrategy
    recipe: ClientRecipe
    executor: Executor  # the run's model and recipe, for clients in this process and the server's evaluation
    clients: dict[str, Features]  # the virtual clients' partitions ({} on a coordinator)
    eval_subset: Features  # fixed seeded subset evaluated every round
    test: Features
    test_unseen: Features | None

    @property
    def model(self):
        return self.loaded.model

    def evaluate(self, data: Features, state: GlobalState) -> dict[str, float]:
        """The global model of `state` on `data` (the server's evaluation)."""
        return self.executor.evaluate(self._task(state), data)

    def generate(self, data: ChatFeatures, state: GlobalState) -> tuple[dict[str, float], list[dict]]:
        """Causal-lm: the global model's greedy answers to (a seeded sample of `eval.generate` of) the held-out
        prompts, scored (ROUGE-L, exact match), and the samples for generations.jsonl."""
        sample = data.sample(self.cfg.eval.generate, derive_seed(self.cfg.seed, "generate"))
        self.executor.recipe.prepare(self.model, self._task(state))
        answers = generation.generate(self.model, self.loaded.tokenizer, sample.prompts, self.cfg.eval.max_new_tokens,
                                      self.cfg.eval.batch_size)
        return (generation.score(answers, sample.answers),
                generation.samples(self.loaded.tokenizer, sample.prompts, sample.answers, answers))

    def evaluate_base(self, data: Features | ChatFeatures) -> dict[str, float]:
        """The model as it stands, before any round (adapters start as the identity: the base model)."""
        return evaluate(self.model, data, self.cfg.eval.batch_size)

    def _task(self, state: GlobalState) -> Task:
        return Task("evaluate", state.round, {"batch_size": self.cfg.eval.batch_size}, state.tensors)

    def spec_for_clients(self) -> dict[str, Any]:
        """What a coordinator tells client daemons about the run (JSON-ready): they build the same model."""
        return run_spec(self.cfg, self.task.train.label_names, input_dim(self.task))


def run_spec(cfg: RunConfig, label_names: list[str], width: int) -> dict[str, Any]:
    return {"config": cfg.to_dict(), "label_names": list(label_names), "input_dim": width}


def model_config(cfg: RunConfig) -> RunConfig:
    """`cfg` with a built-in base that is built locally (the demo LM, `shakespeare-lm`) resolved to its folder;
    the run keeps the name (what a coordinator sends to daemons, who resolve it on their machine)."""
    if cfg.model.source != demo_lm.NAME:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, source=str(demo_lm.demo_lm_dir())))


def featurize(loaded: LoadedModel, data: Dataset) -> Features | ChatFeatures:
    return loaded.featurize(data.features, data.labels)


def load(cfg: RunConfig, *, partitions: bool = True, num_clients: int | None = None, salt: str | None = None) -> Run:
    """Load the run's data and model and build its strategy. `partitions`: featurize every client's share
    (the simulator, Flower); `num_clients`: N for strategies that divide by all clients (default: the
    partitions); `salt`: the run's name in secure-aggregation masks (default: cfg.name)."""
    task = load_task(cfg)
    loaded = build_model(model_config(cfg), task.train.num_classes, input_dim(task))
    spec = ModelSpec({n: p.detach().clone() for n, p in loaded.model.named_parameters() if p.requires_grad})
    clients = {}
    if partitions:
        for cid, idx in client_partitions(cfg, task).items():
            clients[cid] = featurize(loaded, task.train.subset(idx))
            if len(clients[cid]) == 0:  # causal-lm: every conversation truncated away
                raise DataError(f"client {cid!r} has no conversation with a response token left within "
                                f"model.max_length = {cfg.model.max_length}; raise it")
    test = featurize(loaded, task.test)
    if len(test) == 0:
        raise DataError(f"dataset {cfg.data.dataset!r} has no test examples; raise data.test_fraction")
    eval_subset = test.sample(cfg.eval.max_examples, derive_seed(cfg.seed, "eval"))
    unseen = task.test_unseen
    test_unseen = featurize(loaded, unseen) if unseen is not None and len(unseen) else None
    if cfg.eval.final_max_examples > 0:
        test = test.sample(cfg.eval.final_max_examples, derive_seed(cfg.seed, "final"))
        if test_unseen is not None:
            test_unseen = test_unseen.sample(cfg.eval.final_max_examples, derive_seed(cfg.seed, "final-unseen"))
    server, recipe = strategy(cfg, len(clients) if num_clients is None else num_clients,
                              cfg.name if salt is None else salt)
    return Run(cfg, task, loaded, spec, server, recipe, Executor(loaded.model, recipe), clients, eval_subset, test,
               test_unseen)

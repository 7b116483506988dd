"""A strategy and its recipe under the run's [privacy] section: client DP-SGD, central DP, secure aggregation.

`wrap` returns a server strategy and a client recipe that behave like the inner ones, plus:

- client DP: each train task carries the DP settings; the client runs DP-SGD (privacy/client_dp.py), keeps
  its own ledger, refuses a task that would take it past its budget (the result says why, the engine
  rejects it with that reason, the round goes on), and reports epsilon spent. The server records the
  ledger in the round metrics (`privacy/epsilon/<client>`) and stops asking exhausted clients.
- central DP: the server clips each client's update, adds noise to the sum (privacy/central_dp.py) and
  accounts each round at its real sampling rate; when the budget would be exceeded no task is sent.
- secure aggregation: tasks name the round's participants and their public keys; clients upload
  pairwise-masked fixed-point tensors (privacy/secagg.py) and the server unmasks only their sum
  sum_k w_k x_k. The weight w_k is the client's number of examples, 1, or a number the server sends
  (`strategy.client_weights`, e.g. FedAU's participation weight: it is applied on the client). The
  strategy's declared hooks (strategies/base.py) say how:

      recipe.summand(tensors, task, w) -> (Tensors, w')           what one client adds to the masked sum
      strategy.sum_contract(state) -> Contract                    its shapes, before masking
      strategy.aggregate_sum(rnd, total, w_total, results, state) the round from sum_k w_k x_k alone
      strategy.sums_uploads(state) -> bool                        a round whose aggregate is a plain sum

  By default every result then carries the weighted mean (in a summing round, the sum once), so a
  strategy's own aggregation is unchanged. A participant missing from a round discards that round
  (secagg.py's policy): no result is recorded for anyone, so FedAU counts the round as absent for all.

In a simulation one recipe serves every virtual client (keys seeded, ledgers in memory); a client daemon
gives its recipe its own key and its ledger file (client/state.py), and declares the public key at Join.

This module glues privacy/ (client_dp, central_dp, secagg, ledger) to the strategy protocol and knows no
strategy by name; it lives here because privacy/ imports no strategy.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedadapt.core.codec import Contract, TensorSpec
from fedadapt.core.config import PrivacyConfig
from fedadapt.core.errors import ConfigError
from fedadapt.privacy import secagg
from fedadapt.privacy.central_dp import CentralDP
from fedadapt.privacy.client_dp import Accounts
from fedadapt.privacy.ledger import Ledger
from fedadapt.training.loop import make_optimizer, train_config

from .base import ClientInfo, ClientResult, GlobalState, RoundOutcome, RunSettings, StrategyBase, Task, Tensors

EPS_KEY = "privacy/epsilon/"  # round metric per client: epsilon spent after this round


def wrap(strategy, recipe, cfg: PrivacyConfig, settings: RunSettings, run_salt: str = ""):
    """The strategy and recipe to run under `cfg` (the same objects when privacy is off)."""
    if cfg.dp == "none" and not cfg.secure_aggregation:
        return strategy, recipe
    return PrivateStrategy(strategy, cfg, settings, run_salt), PrivateRecipe(recipe, settings.seed)


class PrivateStrategy(StrategyBase):
    def __init__(self, inner, cfg: PrivacyConfig, settings: RunSettings, run_salt: str):
        super().__init__(inner.options, settings)
        self.inner, self.cfg = inner, cfg
        self.name = inner.name
        self.salt = f"fedadapt:{run_salt}:{settings.seed}"
        self.public_keys: dict[str, str] = {}  # client -> X25519 public key (hex); also read from capabilities
        self.epsilons: dict[str, float] = {}  # client DP: last epsilon each client reported
        self.exhausted: set[str] = set()  # client DP: clients that said they cannot afford another round
        self.central = CentralDP(cfg, settings.seed, settings.clients_per_round, settings.num_clients,
                                 settings.rounds) if cfg.dp == "central" else None
        self._round: dict[str, Any] = {}  # what configure decided for the round being run

    @property
    def known_probabilities(self) -> dict[str, float] | None:  # the simulator's oracle reaches the inner strategy
        return self.inner.known_probabilities

    @known_probabilities.setter
    def known_probabilities(self, p: dict[str, float] | None) -> None:
        self.inner.known_probabilities = p

    def privacy_support(self):
        return self.inner.privacy_support()

    # ---------------------------------------------------------------- protocol
    def init_state(self, spec):
        return self.inner.init_state(spec)

    def configure(self, rnd: int, clients: list[ClientInfo], state: GlobalState) -> dict[str, Task]:
        self._round = {"rnd": rnd}
        if self.cfg.dp == "client":
            clients = [c for c in clients if c.client_id not in self.exhausted]
        if self.cfg.secure_aggregation:  # a client daemon without a key (an old one) cannot take part
            clients = [c for c in clients if self._key_of(c)]
        if self.central is not None and clients and not self.central.affordable(len(clients)):
            self._round["note"] = 1.0  # budget reached: the round trains nobody
            return {}
        tasks = self.inner.configure(rnd, clients, state)
        if self.central is not None and tasks:
            self._round["central"] = self.central.plan(len(tasks), len(clients))
        peers = self._peers(tasks, clients) if self.cfg.secure_aggregation else {}
        sum_round = bool(tasks) and self.inner.sums_uploads(state)
        fixed = (self.inner.client_weights(rnd, list(tasks), state) or {}) if peers else {}
        self._round.update(peers=peers, sum_round=sum_round, weights=fixed)
        for cid, task in tasks.items():
            task.config["privacy_client"] = cid
            if self.cfg.dp == "client":
                task.config["privacy"] = {"epsilon": self.cfg.epsilon, "delta": self.cfg.delta,
                                          "noise_multiplier": self.cfg.noise_multiplier,
                                          "max_grad_norm": self.cfg.max_grad_norm,
                                          "planned_rounds": self.cfg.planned_rounds or self.settings.rounds,
                                          "accountant": self.cfg.accountant}
            if peers:
                weight = "one" if sum_round else fixed.get(cid, "examples" if self.inner.weighted_by_examples()
                                                           else "one")
                task.config["secagg"] = {"peers": peers, "salt": self.salt, "frac_bits": self.cfg.secagg_frac_bits,
                                         "weight": weight}
        return tasks

    def upload_contract(self, state: GlobalState) -> Contract:
        return self._masked(state) or self.inner.upload_contract(state)

    def task_contract(self, state: GlobalState, task: Task) -> Contract:
        return self._masked(state) or self.inner.task_contract(state, task)

    def aggregate(self, rnd: int, results: list[ClientResult], state: GlobalState) -> RoundOutcome:
        metrics: dict[str, float] = {}
        if self.cfg.dp == "client":
            for r in results:
                if "dp_epsilon" in r.metrics:
                    self.epsilons[r.client_id] = r.metrics["dp_epsilon"]
                    metrics[EPS_KEY + r.client_id] = r.metrics["dp_epsilon"]
                if r.metrics.get("dp_exhausted"):
                    self.exhausted.add(r.client_id)
            if self.epsilons:
                metrics["privacy/epsilon_max"] = max(self.epsilons.values())
            metrics["privacy/exhausted_clients"] = float(len(self.exhausted))
        if self.cfg.secure_aggregation:
            peers = self._round.get("peers", {})
            tag = secagg.setup_tag(self.salt, rnd, peers)  # an upload masked for another setup counts as missing
            missing = sorted(set(peers) - {r.client_id for r in results if r.metrics.get("secagg_tag") == tag})
            if missing:  # their masks are in the others' uploads: the sum is unusable (secagg.py's policy)
                return RoundOutcome(GlobalState(state.tensors, state.aux, rnd),
                                    {**metrics, "secagg_discarded": 1.0, "secagg_missing": float(len(missing))})
            outcome = self.inner.aggregate_sum(rnd, *self._unmask(results), results, state)
        else:
            if self.central is not None:
                results, released = self._central(rnd, results, state)
                metrics.update(released)
            outcome = self.inner.aggregate(rnd, results, state)
        outcome.metrics.update(metrics)
        return outcome

    def refused(self, client_id: str, metrics: dict[str, float]) -> None:
        """A client that refused its task at its budget is not asked again."""
        if self.cfg.dp == "client" and metrics.get("dp_exhausted"):
            self.exhausted.add(client_id)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(),
                "privacy": {"epsilons": self.epsilons, "exhausted": sorted(self.exhausted),
                            "central": self.central.ledger.to_dict() if self.central is not None else None}}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.inner.load_state_dict(d.get("inner", {}))
        p = d.get("privacy", {})
        self.epsilons = {k: float(v) for k, v in p.get("epsilons", {}).items()}
        self.exhausted = set(p.get("exhausted", []))
        if self.central is not None and p.get("central"):
            self.central.ledger = Ledger.from_dict(p["central"])

    # ---------------------------------------------------------------- helpers
    def _masked(self, state: GlobalState) -> Contract | None:
        """Under secure aggregation every client uploads its summand as masked int64 (None: no masks)."""
        if not self.cfg.secure_aggregation:
            return None
        return {k: TensorSpec(tuple(s.shape), secagg.MASKED) for k, s in self.inner.sum_contract(state).items()}

    def _key_of(self, c: ClientInfo) -> str | None:
        """A client's public key: the simulator's key directory, or what its daemon declared at Join."""
        return self.public_keys.get(c.client_id) or c.capabilities.get("secagg_key")

    def _peers(self, tasks: dict[str, Task], clients: list[ClientInfo]) -> dict[str, str]:
        known = {c.client_id: self._key_of(c) for c in clients}
        lacking = sorted(cid for cid in tasks if not known.get(cid))
        if lacking:
            raise ConfigError(f"secure aggregation: client {lacking[0]!r} has no registered public key")
        return {cid: known[cid] for cid in tasks}

    def _unmask(self, results: list[ClientResult]) -> tuple[Tensors, float]:
        """sum_k w_k x_k (fp64) and sum_k w_k, with the weights the tasks asked the clients to apply."""
        total = secagg.unmask_sum([r.tensors for r in results], self.cfg.secagg_frac_bits, torch.float64)
        fixed = self._round.get("weights", {})
        if self._round.get("sum_round"):
            w = float(len(results))
        elif fixed:
            w = math.fsum(fixed[r.client_id] for r in results)
        else:
            w = float(sum(r.num_examples for r in results) if self.inner.weighted_by_examples() else len(results))
        return total, w

    def _central(self, rnd: int, results: list[ClientResult], state: GlobalState):
        """The inner strategy's view of the round under central DP: each result carries the noised mean model
        (in a summing round the first carries the noised sum, the others zeros)."""
        uploads = [r.tensors for r in results]
        if self._round.get("sum_round"):
            total, metrics = self.central.release(rnd, uploads, self._round["central"], None)
            zeros = {k: torch.zeros_like(v) for k, v in total.items()}
            carried = [total if i == 0 else zeros for i in range(len(results))]
        else:
            mean, metrics = self.central.release(rnd, uploads, self._round["central"], state.tensors)
            carried = [mean] * len(results)
        return [ClientResult(r.client_id, r.num_examples, t, r.metrics) for r, t in zip(results, carried)], metrics


class PrivateRecipe:
    """Client side: DP-SGD with a ledger per client and budget refusal, then masking for secure aggregation.

    One recipe may serve many virtual clients (the simulator), so ledgers and keys are kept per client id; a
    client daemon passes its own key, its ledger file and its cap (client/state.py).
    """

    def __init__(self, inner, seed: int | None = None, key: Any = None, ledger_file: Any = None,
                 max_epsilon: float | None = None):
        self.inner = inner
        self.keys = secagg.Keys(key, seed)
        self.accounts = Accounts(make_optimizer, ledger_file, max_epsilon)

    def public_key(self, client: str) -> str:
        return self.keys.public(client)

    def prepare(self, model, task: Task) -> None:
        self.inner.prepare(model, task)

    def evaluate(self, model, data, task: Task) -> dict[str, float]:
        return self.inner.evaluate(model, data, task)

    def train(self, model, data, task: Task, privacy: Any = None) -> ClientResult:
        me = str(task.config.get("privacy_client", ""))
        dp = None
        if "privacy" in task.config:
            dp, refusal = self.accounts.begin(me, task.config["privacy"],
                                              lambda d: self.inner.dp_plan(d, len(data), task))
            if dp is None:
                return ClientResult("", len(data), {}, refusal)
        if "secagg" in task.config and task.config["secagg"]["peers"].get(me) != self.public_key(me):
            return ClientResult("", len(data), {}, {"refused": "secure aggregation: the round names another public "
                                                              "key for this client (its key file was replaced?)"})
        result = self.inner.train(model, data, task, privacy=dp)
        if dp is not None:
            result.metrics.update(self.accounts.end(dp, dp.plan_for(len(data), train_config(task.config))))
        if "secagg" in task.config:
            sa = task.config["secagg"]
            weight = {"examples": float(result.num_examples), "one": 1.0}.get(sa["weight"], sa["weight"])
            tensors, weight = self.inner.summand(result.tensors, task, float(weight))
            result.tensors = secagg.mask(tensors, float(weight), me=me, key=self.keys.of(me), peers=sa["peers"],
                                         rnd=task.round, salt=sa["salt"].encode(), frac_bits=int(sa["frac_bits"]))
            result.metrics["secagg_tag"] = secagg.setup_tag(sa["salt"], task.round, sa["peers"])
        return result


def epsilon_metrics(strategy_metrics: dict[str, float]) -> dict[str, float]:
    """The per-client epsilons of a round record's strategy metrics (for reports and `run follow`)."""
    return {k[len(EPS_KEY):]: v for k, v in strategy_metrics.items() if k.startswith(EPS_KEY) and math.isfinite(v)}

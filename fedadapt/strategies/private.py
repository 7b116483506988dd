"""A strategy and its recipe under the run's [privacy] section: client DP-SGD, central DP, secure aggregation.

`wrap` returns a server strategy and a client recipe that behave like the inner ones, plus:

- client DP: each train task carries the DP settings; the client runs DP-SGD (privacy/dpsgd.py), keeps
  its own ledger, refuses a task that would take it past its budget (the result says why, the engine
  rejects it with that reason, the round goes on), and reports epsilon spent. The server records the
  ledger in the round metrics (`privacy/epsilon/<client>`) and stops asking exhausted clients.
- central DP: the server clips each client's update, adds noise to the sum (privacy/central.py) and
  accounts each round at its real sampling rate; when the budget would be exceeded no task is sent.
- secure aggregation: tasks name the round's participants and their public keys; clients upload
  pairwise-masked fixed-point tensors (privacy/secagg.py) and the server unmasks only their sum
  sum_k w_k x_k. The weight w_k is the client's number of examples, 1, or a number the server sends
  (FedAU's participation weight: it is applied on the client). A strategy whose upload is not itself a
  summand (rankings, sparse tables, seed/scalar pairs) says how to make one, and how to step from the sum:

      recipe.summand(tensors, task, w) -> Tensors                 the dense w-weighted form of one upload
      strategy.sum_contract(state) -> Contract                    its shapes, before masking
      strategy.aggregate_sum(rnd, total, w_total, results, state) the round from sum_k w_k x_k alone

  Any other strategy gets results that all carry the weighted mean (or, in Fed-SB's init round, the sum
  once), so its own aggregation is unchanged. A participant missing from a round discards that round
  (secagg.py's policy): no result is recorded for anyone, so FedAU counts the round as absent for all.

In a simulation one recipe serves every virtual client (keys seeded, ledgers in memory); a client daemon
gives its recipe its own key and its ledger file (client/state.py), and declares the public key at Join.

This module glues privacy/ to the strategy protocol, so it lives here (privacy/ imports no strategy).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from fedadapt.client.trainer import make_optimizer, train_config
from fedadapt.core.codec import Contract, TensorSpec
from fedadapt.core.config import PrivacyConfig
from fedadapt.core.errors import ConfigError
from fedadapt.core.rng import derive_seed, generator
from fedadapt.privacy import central, secagg
from fedadapt.privacy.dpsgd import ClientDP, DPSettings
from fedadapt.privacy.ledger import Ledger, calibrate

from .base import ClientInfo, ClientResult, GlobalState, RoundOutcome, RunSettings, Task, Tensors

EPS_KEY = "privacy/epsilon/"  # round metric per client: epsilon spent after this round
BUDGET_SLACK = 1e-9  # relative: calibrated noise lands on the budget up to float rounding


def wrap(strategy, recipe, cfg: PrivacyConfig, settings: RunSettings, run_salt: str = ""):
    """The strategy and recipe to run under `cfg` (the same objects when privacy is off)."""
    if cfg.dp == "none" and not cfg.secure_aggregation:
        return strategy, recipe
    return PrivateStrategy(strategy, cfg, settings, run_salt), PrivateRecipe(recipe, settings.seed)


class PrivateStrategy:
    def __init__(self, inner, cfg: PrivacyConfig, settings: RunSettings, run_salt: str):
        self.inner, self.cfg, self.settings = inner, cfg, settings
        self.name = inner.name
        self.salt = f"fedadapt:{run_salt}:{settings.seed}"
        self.public_keys: dict[str, str] = {}  # client -> X25519 public key (hex); also read from capabilities
        self.epsilons: dict[str, float] = {}  # client DP: last epsilon each client reported
        self.exhausted: set[str] = set()  # client DP: clients that said they cannot afford another round
        self.central = Ledger(cfg.epsilon, cfg.delta, cfg.accountant) if cfg.dp == "central" else None
        self._round: dict[str, Any] = {}  # what configure decided for the round being run

    # ---------------------------------------------------------------- protocol
    def init_state(self, spec):
        return self.inner.init_state(spec)

    def configure(self, rnd: int, clients: list[ClientInfo], state: GlobalState) -> dict[str, Task]:
        self._round = {"rnd": rnd}
        if self.cfg.dp == "client":
            clients = [c for c in clients if c.client_id not in self.exhausted]
        if self.cfg.secure_aggregation:  # a client daemon without a key (an old one) cannot take part
            clients = [c for c in clients if self._key_of(c)]
        if self.central is not None and clients:
            z = self._central_noise()
            q = min(1.0, self.settings.clients_per_round / len(clients))
            if self.central.would_spend(z, q, 1) > self.cfg.epsilon * (1 + BUDGET_SLACK):
                self._round["note"] = 1.0  # budget reached: the round trains nobody
                return {}
        tasks = self.inner.configure(rnd, clients, state)
        if self.central is not None and tasks:
            self._round["central"] = (self._central_noise(), min(1.0, len(tasks) / len(clients)),
                                      min(self.settings.clients_per_round, len(clients)))
        peers = self._peers(tasks, clients) if self.cfg.secure_aggregation else {}
        sum_round = any(t.config.get("fedsb_phase") == "init" for t in tasks.values())
        self._round.update(peers=peers, sum_round=sum_round)
        fixed = self.inner.client_weights(rnd, list(tasks), state) if peers and hasattr(
            self.inner, "client_weights") else {}
        self._round["weights"] = fixed
        for cid, task in tasks.items():
            task.config["privacy_client"] = cid
            if self.cfg.dp == "client":
                task.config["privacy"] = {"epsilon": self.cfg.epsilon, "delta": self.cfg.delta,
                                          "noise_multiplier": self.cfg.noise_multiplier,
                                          "max_grad_norm": self.cfg.max_grad_norm,
                                          "planned_rounds": self.cfg.planned_rounds or self.settings.rounds,
                                          "accountant": self.cfg.accountant}
            if peers:
                weight = "one" if sum_round else fixed.get(cid, "examples" if self._by_examples() else "one")
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
            total, w_total = self._unmask(results, state)
            if hasattr(self.inner, "aggregate_sum") and not self._round.get("sum_round"):
                outcome = self.inner.aggregate_sum(rnd, total, w_total, results, state)
                outcome.metrics.update(metrics)
                return outcome
            results = self._as_results(total, w_total, results, state)
        if self.central is not None:
            results, extra = self._central(rnd, results, state)
            metrics.update(extra)
        outcome = self.inner.aggregate(rnd, results, state)
        outcome.metrics.update(metrics)
        return outcome

    def refused(self, client_id: str, metrics: dict[str, float]) -> None:
        """The engine's report of a client that refused its task: one at its budget is not asked again."""
        if self.cfg.dp == "client" and metrics.get("dp_exhausted"):
            self.exhausted.add(client_id)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(),
                "privacy": {"epsilons": self.epsilons, "exhausted": sorted(self.exhausted),
                            "central": self.central.to_dict() if self.central is not None else None}}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.inner.load_state_dict(d.get("inner", {}))
        p = d.get("privacy", {})
        self.epsilons = {k: float(v) for k, v in p.get("epsilons", {}).items()}
        self.exhausted = set(p.get("exhausted", []))
        if self.central is not None and p.get("central"):
            self.central = Ledger.from_dict(p["central"])

    # ---------------------------------------------------------------- helpers
    def _summed(self, state: GlobalState) -> Contract:
        """The shapes and dtypes of what the clients sum (before masking)."""
        return getattr(self.inner, "sum_contract", self.inner.upload_contract)(state)

    def _masked(self, state: GlobalState) -> Contract | None:
        """Under secure aggregation every client uploads the summed tensors as masked int64 (None: no masks)."""
        if not self.cfg.secure_aggregation:
            return None
        return {k: TensorSpec(tuple(s.shape), secagg.MASKED) for k, s in self._summed(state).items()}

    def _by_examples(self) -> bool:
        return getattr(getattr(self.inner, "options", None), "weighting", "uniform") == "examples"

    def _key_of(self, c: ClientInfo) -> str | None:
        """A client's public key: the simulator's key directory, or what its daemon declared at Join."""
        return self.public_keys.get(c.client_id) or c.capabilities.get("secagg_key")

    def _peers(self, tasks: dict[str, Task], clients: list[ClientInfo]) -> dict[str, str]:
        known = {c.client_id: self._key_of(c) for c in clients}
        lacking = sorted(cid for cid in tasks if not known.get(cid))
        if lacking:
            raise ConfigError(f"secure aggregation: client {lacking[0]!r} has no registered public key")
        return {cid: known[cid] for cid in tasks}

    def _unmask(self, results: list[ClientResult], state: GlobalState) -> tuple[Tensors, float]:
        """sum_k w_k x_k (fp64) and sum_k w_k, with the weights the tasks asked the clients to apply."""
        total = secagg.unmask_sum([r.tensors for r in results], self.cfg.secagg_frac_bits, torch.float64)
        fixed = self._round.get("weights", {})
        if self._round.get("sum_round"):
            w = float(len(results))
        elif fixed:
            w = math.fsum(fixed[r.client_id] for r in results)
        else:
            w = float(sum(r.num_examples for r in results) if self._by_examples() else len(results))
        return total, w

    def _as_results(self, total: Tensors, w: float, results: list[ClientResult], state: GlobalState):
        """The inner strategy's view of the round: every result carries the weighted mean (in a sum round,
        the first carries the sum and the others zeros), which its own weighted average turns back into
        the aggregate."""
        dtypes = {k: s.dtype for k, s in self.inner.upload_contract(state).items()}
        if self._round.get("sum_round"):
            zeros = {k: torch.zeros_like(v, dtype=dtypes[k]) for k, v in total.items()}
            first = {k: v.to(dtypes[k]) for k, v in total.items()}
            return [ClientResult(r.client_id, r.num_examples, first if i == 0 else zeros, r.metrics)
                    for i, r in enumerate(results)]
        mean = {k: (v / w).to(dtypes[k]) for k, v in total.items()}
        return [ClientResult(r.client_id, r.num_examples, mean, r.metrics) for r in results]

    def _central_noise(self) -> float:
        if self.cfg.noise_multiplier > 0:
            return self.cfg.noise_multiplier
        n = self.settings.num_clients
        if n <= 0:
            raise ConfigError("privacy.dp = 'central' with a calibrated noise needs the number of clients; "
                              "give privacy.noise_multiplier instead")
        q = min(1.0, self.settings.clients_per_round / n)
        return calibrate(self.cfg.epsilon, self.cfg.delta, q, self.cfg.planned_rounds or self.settings.rounds,
                         self.cfg.accountant)

    def _central(self, rnd: int, results: list[ClientResult], state: GlobalState):
        z, q, denominator = self._round["central"]
        gen = generator(derive_seed(self.settings.seed, "central-dp", rnd))
        c = self.cfg.max_grad_norm
        if self._round.get("sum_round"):  # Fed-SB init gradients: a noised sum of clipped gradients
            total, extra = central.noised_sum([r.tensors for r in results], c, z, gen)
            zeros = {k: torch.zeros_like(v) for k, v in total.items()}
            out = [ClientResult(r.client_id, r.num_examples, total if i == 0 else zeros, r.metrics)
                   for i, r in enumerate(results)]
        else:  # updates against the global state; mean over the expected participants (fixed denominator)
            deltas = [{k: v - state.tensors[k] for k, v in r.tensors.items()} for r in results]
            total, extra = central.noised_sum(deltas, c, z, gen)
            mean = {k: state.tensors[k] + v / denominator for k, v in total.items()}
            out = [ClientResult(r.client_id, r.num_examples, mean, r.metrics) for r in results]
        self.central.record(z, q, 1)
        spent = self.central.spent
        return out, {**extra, "privacy/epsilon": spent, "privacy/noise_multiplier": z, "privacy/sample_rate": q}


class PrivateRecipe:
    """Client side: DP-SGD with a ledger per client and budget refusal, then masking for secure aggregation.

    One recipe may serve many virtual clients (the simulator), so ledgers and keys are kept per client id.
    """

    def __init__(self, inner, seed: int | None = None, key: Any = None, ledger_file: Any = None,
                 max_epsilon: float | None = None):
        self.inner = inner
        self.seed = seed  # simulation: keys derived from (seed, client) so runs are reproducible
        self.ledgers: dict[str, Ledger] = {}
        self.keys: dict[str, Any] = {}
        self.key = key  # a client daemon's own persistent key (client/state.py), whatever its client id
        self.ledger_file = ledger_file  # a client daemon's ledger on disk (client/state.py): survives restarts
        self.max_epsilon = max_epsilon  # a daemon's own cap over all its runs (client/state.py); None: none

    def public_key(self, client: str) -> str:
        return secagg.public_hex(self._key(client))

    def _key(self, client: str):
        if self.key is not None:
            return self.key
        if client not in self.keys:
            raw = None
            if self.seed is not None:
                raw = derive_seed(self.seed, "secagg-key", client).to_bytes(8, "little") * 4
            self.keys[client] = secagg.new_key(raw)
        return self.keys[client]

    def prepare(self, model, task: Task) -> None:
        self.inner.prepare(model, task)

    def evaluate(self, model, data, task: Task) -> dict[str, float]:
        return self.inner.evaluate(model, data, task)

    def train(self, model, data, task: Task, privacy: Any = None) -> ClientResult:
        me = str(task.config.get("privacy_client", ""))
        dp = None
        if "privacy" in task.config:
            s = DPSettings.from_task(task.config["privacy"])
            ledger = self._ledger(me, s)
            budget, whose = self._budget(s.epsilon)
            after = math.inf
            if budget > 0:  # a daemon's cap that leaves less than the run's budget: noise is calibrated to it
                dp = ClientDP(dataclasses.replace(s, epsilon=min(s.epsilon, budget)), ledger, make_optimizer)
                cfg = train_config(task.config)
                init = task.config.get("fedsb_phase") == "init"
                p = dp.plan_init(len(data), int(task.config["fedsb_samples"]), cfg) if init else dp.plan_for(len(data), cfg)
                after = ledger.would_spend(p.noise_multiplier, p.sample_rate, p.steps)
            if after > budget * (1 + BUDGET_SLACK):
                why = (f"privacy budget exhausted: epsilon {ledger.spent:.3f} of {budget:g} spent{whose}, this "
                       f"round would reach {after:.3f}")
                return ClientResult("", len(data), {}, {"refused": why, "dp_epsilon": ledger.spent,
                                                        "dp_exhausted": 1.0})
        if "secagg" in task.config and task.config["secagg"]["peers"].get(me) != self.public_key(me):
            return ClientResult("", len(data), {}, {"refused": "secure aggregation: the round names another public "
                                                              "key for this client (its key file was replaced?)"})
        result = self.inner.train(model, data, task, privacy=dp)
        if dp is not None:
            if self.ledger_file is not None:
                self.ledger_file.save(dp.ledger)  # before the update can leave this machine
            nxt = dp.plan_for(len(data), train_config(task.config))
            result.metrics.update(dp_epsilon=dp.ledger.spent, dp_delta=dp.settings.delta,
                                  dp_exhausted=float(dp.ledger.would_spend(nxt.noise_multiplier, nxt.sample_rate,
                                                                           nxt.steps) > budget * (1 + BUDGET_SLACK)))
        if "secagg" in task.config:
            sa = task.config["secagg"]
            weight = {"examples": float(result.num_examples), "one": 1.0}.get(sa["weight"], sa["weight"])
            if hasattr(self.inner, "summand"):  # e.g. rankings -> rank positions: what sums to the aggregate
                tensors, weight = self.inner.summand(result.tensors, task, float(weight)), 1.0
            else:
                tensors = result.tensors
            result.tensors = secagg.mask(tensors, float(weight), me=me, key=self._key(me), peers=sa["peers"],
                                         rnd=task.round, salt=sa["salt"].encode(), frac_bits=int(sa["frac_bits"]))
            result.metrics["secagg_tag"] = secagg.setup_tag(sa["salt"], task.round, sa["peers"])
        return result

    def _budget(self, run_epsilon: float) -> tuple[float, str]:
        """The epsilon this run may reach: the run's budget, or less if the daemon's own cap minus what its
        other runs spent is smaller (with a note for the refusal message)."""
        if self.max_epsilon is None or self.ledger_file is None:
            return run_epsilon, ""
        left = max(0.0, self.max_epsilon - self.ledger_file.spent_elsewhere())
        if left >= run_epsilon:
            return run_epsilon, ""
        return left, f" (this client's cap --max-epsilon {self.max_epsilon:g} minus {self.max_epsilon - left:.3f} " \
                     "spent in its other runs)"

    def _ledger(self, me: str, s: DPSettings) -> Ledger:
        if me not in self.ledgers:
            saved = self.ledger_file.load() if self.ledger_file is not None else None
            self.ledgers[me] = saved or Ledger(s.epsilon, s.delta, s.accountant)
        return self.ledgers[me]


def epsilon_metrics(strategy_metrics: dict[str, float]) -> dict[str, float]:
    """The per-client epsilons of a round record's strategy metrics (for reports and `run follow`)."""
    return {k[len(EPS_KEY):]: v for k, v in strategy_metrics.items() if k.startswith(EPS_KEY) and math.isfinite(v)}

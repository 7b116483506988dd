"""ClientApp: node `partition-id` k is the scenario's k-th client (sorted ids); it trains with the strategy's recipe."""
from pathlib import Path

from fedadapt.flower.app import make_client_app

app = make_client_app(scenario=str(Path(__file__).with_name("scenario.toml")))

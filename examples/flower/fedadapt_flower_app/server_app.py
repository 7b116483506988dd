"""ServerApp: the scenario's fedadapt strategy (FedadaptStrategy) for its rounds, on whatever nodes the grid has."""
from pathlib import Path

from fedadapt.flower.app import make_server_app

app = make_server_app(scenario=str(Path(__file__).with_name("scenario.toml")))

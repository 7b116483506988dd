"""Flower 1.42 interop: every fedadapt strategy as a Flower Message-API Strategy, clients as a ClientApp.

    strategy.py  FedadaptStrategy: a ServerStrategy behind Flower's configure/aggregate_train/evaluate
    client.py    client_app(load): a fedadapt client (model, data, recipe) as a ClientApp
    app.py       a fedadapt scenario TOML as a ServerApp + ClientApp pair (what examples/flower runs)
    simulate.py  `python -m fedadapt.flower.simulate SCENARIO`: that pair on Flower's simulation runtime
    wire.py      tasks/results in Flower messages (fedadapt's safetensors payload, JSON metadata)

Needs `flwr` 1.42: `pip install "fedadapt[flower]"`. Import the submodules; this package imports no
Flower code by itself.
"""

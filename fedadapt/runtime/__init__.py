"""What every way of running a federation shares, written once.

    setup.py     a RunConfig -> a Run: model, strategy and recipe (under [privacy]), data, evaluation
    engine.py    the round engine: configure, send through a Transport, validate, aggregate, record
    executor.py  one task on one client: prepare, train or evaluate, check, encode

The coordinator (fedadapt.server), the client daemon (fedadapt.client), the simulator
(fedadapt.simulation) and the Flower interop (fedadapt.flower) all build on these; nothing here knows
gRPC, Ray or Flower.
"""

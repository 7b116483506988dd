"""fedadapt scenario as a Flower app: the ServerApp and ClientApp come from fedadapt.flower.app."""

"""Field updates: a model store a daemon owns, and the update that publishes only a better model. Above training
and deploy: an update trains (training) and exports (deploy)."""

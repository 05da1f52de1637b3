"""Federated fine-tuning across devices on Flower (see README, "Fleets")."""

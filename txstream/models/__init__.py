"""Model artifacts, the RunInference model handler and training."""

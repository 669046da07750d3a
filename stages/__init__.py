"""Training: stage plans, the resumable loop, the semi-supervised regime, data, evaluation."""

"""From a trained model to a validated bundle."""

"""Search: an Optuna outer loop over hybrid PEFT configurations."""

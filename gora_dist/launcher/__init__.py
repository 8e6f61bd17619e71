"""The training launcher behind ``launch/train.py`` (config, data, models, engines, checkpoints)."""

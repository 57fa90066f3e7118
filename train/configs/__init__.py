"""Training config files: `get_config(arg)` each; see clapjax.train.config."""

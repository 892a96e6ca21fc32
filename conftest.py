"""pytest setup for the whole repository."""

# The command modules each define absl flags (--config, --workdir) at import,
# as absl mains do; one process cannot import two of them, so doctest
# collection skips them (tests run them as subprocesses instead).
collect_ignore_glob = ['dplh_jax/hyperface/cli/*.py']
